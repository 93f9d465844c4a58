"""The ``refusal`` command line (Typer). Each subcommand lives in its own module of :mod:`experiments`."""

from __future__ import annotations

import typer

from .ablate import ablate
from .compare import compare
from .extract import extract
from .score import score

app = typer.Typer(
    name="refusal",
    help="refusal-toolkit: measure refusals, extract refusal directions, ablate them, compare runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("score")(score)
app.command("extract")(extract)
app.command("ablate")(ablate)
app.command("compare")(compare)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
