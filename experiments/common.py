"""Shared pieces of the subcommands: options, error handling, model set-up, summaries."""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from toolkit.errors import ToolkitError
from toolkit.hooks import SITES
from toolkit.stats import rate_summary

# markup off: messages, table cells and titles carry user text (file names such as ``prompts[test].jsonl``, hints
# such as ``[d_model]``) that Rich would otherwise read as markup; styles are applied with rich.text.Text.
console = Console(stderr=True, markup=False)
out = Console(width=None if sys.stdout.isatty() else 120, markup=False)  # wide tables when piped


def styled(label: str, style: str, rest: str = "") -> Text:
    """``label`` in ``style`` followed by plain ``rest`` (no markup is parsed in either)."""
    return Text.assemble((label, style), rest)

# ---------------------------------------------------------------------------------------------- options
ModelOpt = typer.Option(None, "--model", "-m", help="Hugging Face id, local folder or .gguf file "
                        "[default: the offline Qwen2.5-Coder-0.5B-Instruct Q4_K_M]")
DtypeOpt = typer.Option("auto", "--dtype", help="compute dtype: auto (bfloat16 on CUDA and on CPUs with native "
                        "bfloat16, else float32; $REFUSAL_TOOLKIT_AUTO_DTYPE overrides it), float32, bfloat16, "
                        "float16. Statistics run in float32 or wider; run.json records the dtype")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N, mps, xpu")
BatchOpt = typer.Option(16, "--batch-size", "-b", min=1, help="prompts per forward pass")
NameOpt = typer.Option(None, "--name", help="run name under runs/<command>/ [default: timestamp]")
ForceOpt = typer.Option(False, "--force", help="replace an existing run of the same name")
SEED_MAX = 2**32 - 1  # the widest range every RNG used here (torch, numpy, scipy) accepts
SeedOpt = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="random seed (recorded; greedy decoding is deterministic)")
SystemOpt = typer.Option(None, "--system", help="system prompt [default: the chat template's own behaviour]")
GenOpt = typer.Option(12, "--gen-tokens", min=0, help="greedy completion length judged by the refusal markers")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress bars")
SiteOpt = typer.Option(None, "--site", help=f"hook site: {', '.join(SITES)} [default: the direction's site, "
                       "else resid_pre]")
PositionsOpt = typer.Option("post", "--positions", help="where to add: post (post-instruction tokens of the "
                            "prompt), last, all (every position of every pass, generated tokens included), or "
                            "negative indices like '-1,-3'")
ScaleOpt = typer.Option("resid", "--scale", help="s in x + alpha*s*r_hat: unit (1), raw (the direction's own "
                        "norm) or resid (mean residual norm at that layer over post-instruction tokens)")

#: engine parameter -> command-line flag where the flag is not ``--`` + the name with ``_`` as ``-``
PARAM_FLAGS = {"filter_by": "--filter", "max_pairs": "--pairs"}


def flag_of(param: str) -> str:
    """The command-line flag of an engine parameter (:class:`ToolkitError`'s ``param``): ``gen_tokens`` ->
    ``--gen-tokens`` unless :data:`PARAM_FLAGS` says otherwise."""
    return PARAM_FLAGS.get(param, "--" + param.replace("_", "-"))


def cli_message(e: ToolkitError) -> str:
    """An engine error as the CLI prints it: ``--flag: message`` for an error about one parameter, and every
    parameter the message names in backquotes (```force```) as its flag."""
    import re

    text = re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag_of(m.group(1)), e.message)
    return f"{flag_of(e.param)}: {text}" if e.param else text


def finite(*, gt: float | None = None, ge: float | None = None, le: float | None = None, lt: float | None = None):
    """A Typer callback for a float option that must be finite (NaN and infinities are refused: a NaN threshold
    compares false with everything and would silently disable a filter) and within the given bounds.

    Raises:
        typer.BadParameter: printed as one ``error:`` line with exit code 2, before any work.
    """
    import math

    parts = [f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
             f"< {lt:g}" if lt is not None else "", f"<= {le:g}" if le is not None else ""]
    want = " and ".join(p for p in parts if p)

    def check(value):
        if value is None:
            return value
        ok = (math.isfinite(value) and (gt is None or value > gt) and (ge is None or value >= ge)
              and (lt is None or value < lt) and (le is None or value <= le))
        if not ok:
            raise typer.BadParameter(f"must be a finite number{' ' + want if want else ''}, got {value:g}")
        return value

    return check


def handle_errors(fn):
    """Turn :class:`ToolkitError` (bad input) into one line on stderr and exit code 2, never a traceback; an error
    about an engine parameter is printed as ``error: --flag: message`` (:func:`flag_of`)."""

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


@dataclass
class Session:
    """A loaded model, its chat format, a runner and the refusal-opener ids."""

    lm: object
    fmt: object
    runner: object
    refusal_ids: list[int]


def open_session(model: str | None, dtype: str, device: str, batch_size: int, system: str | None,
                 quiet: bool, seed: int = 0, device_map: str | None = None) -> Session:
    """Load the model and build the runner (the slow part of every command)."""
    import torch

    from toolkit.models import load_model
    from toolkit.runner import Runner
    from toolkit.scoring import refusal_token_ids
    from toolkit.templates import ChatFormat

    torch.manual_seed(seed)
    _quiet_libraries()
    with console.status(f"loading model {model or 'default'}"):
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    fmt = ChatFormat(lm.tokenizer, system=system)
    runner = Runner(lm, fmt, batch_size=batch_size, progress=not quiet and sys.stderr.isatty())
    ids = refusal_token_ids(lm.tokenizer)
    d = lm.describe()
    console.print(f"model {d['id']} ({d['architecture']}, {d['n_layers']} layers, d_model {d['d_model']}, "
                  f"{d['dtype']}, {d['device']}); refusal tokens {ids}", highlight=False)
    return Session(lm, fmt, runner, ids)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


@contextlib.contextmanager
def sweep_bar(runner, total: int, desc: str, quiet: bool):
    """One progress bar over the points of a sweep (``total`` passes), with the runner's per-pass bars muted."""
    from tqdm.auto import tqdm

    progress, runner.progress = runner.progress, False
    bar = tqdm(total=total, desc=desc, unit="pass", disable=quiet, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
        runner.progress = progress


def summary_row(set_name: str, split: str | None, condition: str, refusals, scores, kl=None) -> dict:
    """One row of a run's ``summary.csv``: refusal rate with Wilson 95 % interval, mean score, mean KL."""
    row = {"set": set_name, "split": split or "all", "condition": condition}
    if refusals is not None:
        s = rate_summary(list(refusals))
        row.update({"n": s["n"], "refusals": s["k"], "refusal_rate": s["rate"], "ci_low": s["ci_low"],
                    "ci_high": s["ci_high"]})
    else:
        row.update({"n": len(scores), "refusals": None, "refusal_rate": None, "ci_low": None, "ci_high": None})
    row["mean_score"] = float(pd.Series(scores).mean())
    row["mean_kl"] = float(pd.Series(kl).mean()) if kl is not None else None
    return row


def print_summary(df: pd.DataFrame, title: str, extra_cols: tuple[str, ...] = ()) -> None:
    """Print a summary table (refusal rate [95 % CI], mean score, KL) to stdout."""
    t = Table(title=title, title_justify="left")
    cols = list(extra_cols) + ["set", "split", "condition", "n", "refusal rate [95% CI]", "mean score", "KL"]
    for c in cols:
        t.add_column(c, justify="right" if c in ("n", "mean score", "KL") else "left")
    for _, r in df.iterrows():
        rate = "-" if pd.isna(r.get("refusal_rate")) else f"{r['refusal_rate']:.2f}"
        if rate != "-" and not pd.isna(r.get("ci_low")):
            rate += f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        kl = "-" if pd.isna(r.get("mean_kl")) else f"{r['mean_kl']:.3f}"
        score = "-" if pd.isna(r.get("mean_score")) else f"{r['mean_score']:.2f}"
        vals = [str(r[c]) for c in extra_cols] + [str(r["set"]), str(r["split"]), str(r["condition"]),
                                                   "-" if pd.isna(r["n"]) else str(int(r["n"])), rate, score, kl]
        t.add_row(*vals)
    out.print(t)
