"""The ``refusal`` console script's entry point, kept free of heavy imports.

Importing the commands loads pandas, torch and transformers (seconds); a Ctrl-C during that start-up would print a
``KeyboardInterrupt`` traceback if it came before the commands' own handling. Here it is caught around the imports
too, so an interrupt at any moment prints one ``interrupted`` line and exits with code 130, and SIGTERM (``kill``, a
scheduler's time limit) exits like an error, so a half-written run folder is removed as it is on Ctrl-C.
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Run the ``refusal`` command line; exit code 130 on Ctrl-C at any point, 128 + 15 on SIGTERM."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        from .cli import app

        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
