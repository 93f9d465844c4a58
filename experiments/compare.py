"""``refusal compare``: one table across runs (terminal and CSV)."""

from __future__ import annotations

from typing import Annotated

import pandas as pd
from pydantic import Field

from toolkit.errors import ToolkitError
from toolkit.runs import Run, check_same_judge, judge_key, judge_of, load_run, read_run_table

from .shared import Cli, RunOptions, command, console, print_summary


COMPARABLE = ("score", "extract", "ablate")  # run kinds whose summary.csv has rows per set and condition


class CompareConfig(RunOptions):
    """The options of ``refusal compare``."""

    # not from $REFUSAL_RUNS: that variable names the runs folder
    runs: Annotated[list[str], Cli(argument=True, env=False)] = Field(
        ..., description="run folders (runs/<command>/<name>) to put side by side")
    allow_mixed_judges: bool = Field(False, description="put runs judged by different refusal judges side by side "
                                     "(the table then names each row's judge)")


@command(CompareConfig)
def compare(cfg: CompareConfig):
    """Put the summaries of several score, extract or ablate runs in one table: refusal rate with Wilson 95 %
    interval, mean refusal score and KL per set and condition. Runs judged by different refusal judges (name,
    version or judge model) are refused unless --allow-mixed-judges is given.

    Writes runs/compare/NAME/comparison.csv and run.json.
    """
    frames, sources, metas = [], [], []
    for spec in cfg.runs:
        folder, meta = load_run(spec)
        metas.append((str(folder), meta))
        if meta.get("command") not in COMPARABLE:
            raise ToolkitError(f"{folder} is a '{meta.get('command')}' run; compare reads {', '.join(COMPARABLE)} "
                               "runs (their summary.csv has one row per set and condition)")
        path = folder / "summary.csv"
        if not path.is_file():
            raise ToolkitError(f"run {folder} has no summary.csv to compare")
        df = read_run_table(path, "summary")
        missing = [c for c in ("set", "split", "condition", "n") if c not in df.columns]
        if missing or df.empty:
            raise ToolkitError(f"{path}: not a summary table (missing column {missing[0]!r})" if missing
                               else f"{path}: the summary has no rows")
        for col in ("n", "refusals", "refusal_rate", "ci_low", "ci_high", "mean_score", "mean_kl"):
            if col in df.columns:
                try:
                    df[col] = pd.to_numeric(df[col])
                except (ValueError, TypeError):
                    raise ToolkitError(f"{path}: column {col!r} holds values that are not numbers") from None
        df.insert(0, "run", f"{meta['command']}/{meta.get('name', folder.name)}")
        df.insert(1, "model", (meta.get("model") or {}).get("id"))
        df.insert(2, "judge", judge_key(judge_of(meta)))
        frames.append(df)
        sources.append({"run": str(folder), "command": meta["command"], "model": meta.get("model"),
                        "judge": judge_of(meta),
                        "prompt_sets": meta.get("prompt_sets"), "git_commit": meta.get("git_commit")})
    check_same_judge(metas, cfg.allow_mixed_judges)
    table = pd.concat(frames, ignore_index=True)
    for col in ("n", "refusal_rate", "ci_low", "ci_high", "mean_score", "mean_kl"):
        if col not in table:
            table[col] = None
    with Run("compare", cfg.name, cfg.force) as run:
        run.write_csv("comparison.csv", table)
        final = run.finish(model=None, prompt_sets=[], seed=None, params=cfg.params(),
                           results={"sources": sources, "rows": len(table)})
    print_summary(table, f"comparison: {final}", extra_cols=("run",))
    console.print(f"wrote {final}/comparison.csv")
