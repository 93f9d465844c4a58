"""What the commands print: the two consoles, styled labels, the sweep progress bar and the summary table of
refusal rates, scores and KL."""

from __future__ import annotations

import contextlib
import sys

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from toolkit.stats import rate_summary

# markup off: messages, table cells and titles carry user text (file names such as ``prompts[test].jsonl``, hints
# such as ``[d_model]``) that Rich would otherwise read as markup; styles are applied with rich.text.Text.
console = Console(stderr=True, markup=False)
out = Console(width=None if sys.stdout.isatty() else 120, markup=False)  # wide tables when piped


def styled(label: str, style: str, rest: str = "") -> Text:
    """``label`` in ``style`` followed by plain ``rest`` (no markup is parsed in either)."""
    return Text.assemble((label, style), rest)


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


def judge_columns(ev, i: int) -> dict:
    """The per-prompt judge columns of prompt ``i`` of an :class:`toolkit.evaluation.Evaluation`: ``refusal``,
    ``verdict``, ``confidence``, the marker judge beside another (``refusal_markers``) and each window's verdict
    (``refusal@W``); empty where nothing was generated."""
    row = {}
    for key in sorted(ev.values, key=_window_order):
        if key.startswith(("refusal", "verdict", "confidence")):
            v = ev.values[key][i]
            row[key] = v if isinstance(v, str) else (bool(v) if key.startswith("refusal") else float(v))
    return row


def _window_order(key: str):
    base, _, w = key.partition("@")
    return (base, int(w) if w.isdigit() else 10 ** 9)


def evaluation_row(set_name: str, split: str | None, condition: str, ev, kl=None) -> dict:
    """:func:`summary_row` of an evaluation, plus the judge's ``other_rate`` (verdict ``other``: off-topic,
    evasive, empty or degenerate), the marker judge's rate beside another judge (``refusal_rate_markers``), the
    refusal rate at each window (``refusal_rate@W``) and ``window_changed``: the share of prompts whose verdict
    at the longest window differs from that at the next shorter one (near 0: a longer completion would likely
    change little)."""
    row = summary_row(set_name, split, condition, ev.refusals, ev.values["score"], kl)
    if ev.refusals is None:
        return row
    if "verdict" in ev.values:
        row["other_rate"] = float(np.mean(ev.values["verdict"] == "other"))
    if "refusal_markers" in ev.values:
        row["refusal_rate_markers"] = float(np.mean(ev.values["refusal_markers"]))
    ws = sorted(int(k.split("@")[1]) for k in ev.values if k.startswith("refusal@"))
    for w in ws:
        row[f"refusal_rate@{w}"] = float(np.mean(ev.values[f"refusal@{w}"]))
    if len(ws) > 1:
        row["window_changed"] = float(np.mean(ev.values[f"refusal@{ws[-1]}"] != ev.values[f"refusal@{ws[-2]}"]))
    return row


def print_summary(df: pd.DataFrame, title: str, extra_cols: tuple[str, ...] = ()) -> None:
    """Print a summary table (refusal rate [95 % CI], mean score, KL) to stdout, with the judge's ``other`` rate,
    the marker judge's rate beside another judge, and the window check (share of verdicts that changed between the
    two longest windows) where the summary has them."""
    t = Table(title=title, title_justify="left")
    more = [(c, h) for c, h in (("other_rate", "other"), ("refusal_rate_markers", "markers"),
                                ("window_changed", "window changed")) if c in df.columns and df[c].notna().any()]
    cols = list(extra_cols) + ["set", "split", "condition", "n", "refusal rate [95% CI]"] + [h for _, h in more] + \
        ["mean score", "KL"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("set", "split", "condition", "refusal rate [95% CI]") or
                     c in extra_cols else "right")
    for _, r in df.iterrows():
        rate = "-" if pd.isna(r.get("refusal_rate")) else f"{r['refusal_rate']:.2f}"
        if rate != "-" and not pd.isna(r.get("ci_low")):
            rate += f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        kl = "-" if pd.isna(r.get("mean_kl")) else f"{r['mean_kl']:.3f}"
        score = "-" if pd.isna(r.get("mean_score")) else f"{r['mean_score']:.2f}"
        vals = [str(r[c]) for c in extra_cols] + [str(r["set"]), str(r["split"]), str(r["condition"]),
                                                   "-" if pd.isna(r["n"]) else str(int(r["n"])), rate]
        vals += ["-" if pd.isna(r.get(c)) else f"{r[c]:.2f}" for c, _ in more]
        t.add_row(*vals, score, kl)
    out.print(t)
