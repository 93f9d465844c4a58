"""The ``refusal`` command line (Typer). Each subcommand lives in its own module of :mod:`experiments`."""

from __future__ import annotations

import typer

from .ablate import ablate
from .compare import compare
from .cones import cones
from .dose_response import dose_response
from .extract import extract
from .patch import patch
from .geometry import geometry
from .imprint import imprint_cmd
from .plot_residuals import plot_residuals
from .score import score
from .stats import stats_app
from .steer import steer

app = typer.Typer(
    name="refusal",
    help="refusal-toolkit: measure refusals, extract refusal directions, ablate and steer with them, locate "
         "refusal (patching), analyse its geometry (cones, imprints, residual geometry and plots), compare runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("score")(score)
app.command("extract")(extract)
app.command("ablate")(ablate)
app.command("compare")(compare)
app.add_typer(stats_app, name="stats")
app.command("steer")(steer)
app.command("dose-response")(dose_response)
app.command("patch")(patch)
app.command("cones")(cones)
app.command("geometry")(geometry)
app.command("imprint")(imprint_cmd)
app.command("plot-residuals")(plot_residuals)


def main() -> None:
    """Console-script entry point. SIGTERM (e.g. ``kill``, a scheduler's time limit) exits like an error, so the
    half-written run folder is removed as it is on Ctrl-C."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    app()


if __name__ == "__main__":
    main()
