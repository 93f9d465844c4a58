"""Errors as the command line shows them: an engine :class:`~toolkit.errors.ToolkitError` is one ``error:`` line
(its parameter printed as the command's flag) and exit code 2; Ctrl-C is ``interrupted`` and exit code 130."""

from __future__ import annotations

import functools
import re

import typer

from toolkit.errors import ToolkitError

from .output import console, styled

#: engine parameter -> command-line flag where the flag is not ``--`` + the name with ``_`` as ``-``
PARAM_FLAGS = {"filter_by": "--filter", "max_pairs": "--pairs"}


def param_flag(param: str) -> str:
    """The command-line flag of an engine parameter (:class:`ToolkitError`'s ``param``): ``gen_tokens`` ->
    ``--gen-tokens`` unless :data:`PARAM_FLAGS` says otherwise."""
    return PARAM_FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(e: ToolkitError) -> str:
    """An engine error as the CLI prints it: ``--flag: message`` for an error about one parameter, and every
    parameter the message names in backquotes (```force```) as its flag."""
    text = re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: param_flag(m.group(1)), e.message)
    return f"{param_flag(e.param)}: {text}" if e.param else text


def handle_errors(fn):
    """Turn :class:`ToolkitError` (bad input) into one line on stderr and exit code 2, never a traceback; an error
    about an engine parameter is printed as ``error: --flag: message`` (:func:`param_flag`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolkitError as e:
            console.print(styled("error:", "bold red", " " + " ".join(cli_message(e).split())), highlight=False,
                          soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print(styled("interrupted", "bold red"))
            raise typer.Exit(130) from None

    return wrapper
