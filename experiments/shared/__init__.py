"""What every subcommand shares, and the only module of :mod:`experiments` a command imports besides
:mod:`toolkit`: the typed option configurations (:mod:`.config`), errors as the command line shows them
(:mod:`.errors`), opening a model session (:mod:`.session`) and what commands print (:mod:`.output`). No command
imports another command.
"""

from .config import (NOT_COMPARED, SEED_MAX, Cli, CommandConfig, DirectionSpec, FiniteFloat, Invalid, JudgeOptions, ModelOptions,
                     PromptPosition, RunOptions, Site, SteerPositions, SteerScale, SteerSite, command, load_config)
from .errors import PARAM_FLAGS, cli_message, handle_errors, param_flag
from .output import (console, evaluation_row, judge_columns, out, print_summary, styled, summary_row,
                     sweep_bar)
from .session import Session, open_session

__all__ = ["NOT_COMPARED", "SEED_MAX", "Cli", "CommandConfig", "DirectionSpec", "FiniteFloat", "Invalid",
           "JudgeOptions", "ModelOptions", "PromptPosition", "RunOptions", "Site", "SteerPositions", "SteerScale", "SteerSite",
           "command", "load_config", "PARAM_FLAGS", "cli_message", "handle_errors", "param_flag", "console", "out",
           "print_summary", "styled", "summary_row", "evaluation_row", "judge_columns", "sweep_bar", "Session", "open_session"]
