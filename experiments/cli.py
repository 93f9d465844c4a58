"""The ``refusal`` command line (Typer). Each subcommand lives in its own module of :mod:`experiments`."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from .ablate import ablate
from .compare import compare
from .cones import cones
from .depth import depth
from .dose_response import dose_response
from .export import export
from .extract import extract
from .patch import patch
from .geometry import geometry
from .imprint import imprint_cmd
from .judge import judge
from .judge_eval import judge_eval
from .models import models
from .optimize import optimize
from .plot_residuals import plot_residuals
from .score import score
from .stats import stats_app
from .steer import steer



class RefusalGroup(TyperGroup):
    """The top-level command group: Click's own usage errors (a value that is not an integer, a missing option, an
    unknown option) are printed like the toolkit's, as one ``error:`` line with exit code 2, instead of a box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:  # Click's exceptions (Typer vendors Click; this is their public base)
            if type(e).__name__ == "NoArgsIsHelpError":  # `refusal` or `refusal stats` alone: the help
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            msg = " ".join((e.format_message() if hasattr(e, "format_message") else str(e)).split())
            typer.echo(f"error: {msg}{hint}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="refusal",
    cls=RefusalGroup,
    help="refusal-toolkit: measure refusals (judges checked against human labels), extract refusal directions (six "
         "estimators), ablate them (everywhere, per attention head, or as weight edits) and steer with them "
         "(conditionally too; with damage measures), export them as llama.cpp/repeng control vectors, locate "
         "refusal (patching), analyse its geometry (cones, imprints, residual geometry and plots), compare runs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("score")(score)
app.command("extract")(extract)
app.command("ablate")(ablate)
app.command("compare")(compare)
app.command("judge")(judge)
app.add_typer(stats_app, name="stats")
app.command("steer")(steer)
app.command("dose-response")(dose_response)
app.command("patch")(patch)
app.command("cones")(cones)
app.command("geometry")(geometry)
app.command("imprint")(imprint_cmd)
app.command("depth")(depth)
app.command("plot-residuals")(plot_residuals)
app.command("judge-eval")(judge_eval)
app.command("optimize")(optimize)
app.command("models")(models)
app.command("export")(export)


def main() -> None:
    """Console-script entry point (see :func:`experiments.entry.main`, which the ``refusal`` script calls)."""
    from .entry import main as entry_main

    entry_main()


if __name__ == "__main__":
    main()
