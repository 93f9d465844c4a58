"""``refusal score``: per-prompt logit refusal score and marker judgement on one or more prompt sets."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import pandas as pd
from pydantic import Field

from toolkit.evaluation import evaluate, judged
from toolkit.judges import parse_windows
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run

from .shared import (Cli, JudgeOptions, ModelOptions, RunOptions, command, console, evaluation_row, judge_columns,
                     print_summary)


class ScoreConfig(ModelOptions, JudgeOptions, RunOptions):
    """The options of ``refusal score``."""

    sets: Annotated[Optional[list[str]], Cli(argument=True)] = Field(
        None, description="prompt sets: harmful, harmless, borderline, or files (.jsonl/.json/.csv/.tsv/.txt) "
        "[default: harmful harmless]")
    split: str = Field("test", description="train, val, test or all (files without splits: all)")
    column: Optional[str] = Field(None, description="field/column holding the prompt in user files")
    limit: Optional[int] = Field(None, ge=1, description="score only the first N prompts of each set")
    gen_tokens: int = Field(12, ge=0, description="greedy completion length judged by the refusal judge (0: the "
                            "logit refusal score only)")


@command(ScoreConfig)
def score(cfg: ScoreConfig):
    """Score refusals: logit refusal score (Arditi et al.) and the chosen judge's verdicts on greedy completions,
    judged at the full completion and at shorter windows.

    Writes runs/score/NAME/ with scores.csv (one row per prompt: score, refusal, verdict, confidence, the marker
    judge beside another judge, refusal@W per window, completion), summary.csv (refusal rate with Wilson 95 %
    interval, other rate, rate per window, mean score per set) and run.json (with the judge's name, version and
    model hash).
    """
    windows = parse_windows(cfg.windows, cfg.gen_tokens)
    loaded = []
    for s in cfg.sets or ["harmful", "harmless"]:
        ps = load_prompt_set(s, cfg.column)
        loaded.append(ps.select(cfg.split).head(cfg.limit))
    loaded = distinct_names(loaded)
    with Run("score", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        judge = cfg.open_judge(quiet=cfg.quiet) if cfg.gen_tokens else None
        rows, summary = [], []
        for ps in loaded:
            t0 = time.time()
            ev = evaluate(ses.runner, ses.runner.encode(ps.prompts),
                          judged(ses.refusal_ids, judge, ps.prompts, windows), gen_tokens=cfg.gen_tokens,
                          desc=ps.name)
            run.time(f"score_{ps.name}", time.time() - t0)
            for i, r in enumerate(ps.records):
                rows.append({"set": ps.name, "id": r["id"], "category": r["category"], "split": r["split"],
                             "score": float(ev.scores[i]),
                             "refusal": None if ev.refusals is None else bool(ev.refusals[i]),
                             **judge_columns(ev, i),
                             "completion": None if ev.completions is None else ev.completions[i]})
            summary.append(evaluation_row(ps.name, ps.split, "baseline", ev))
        df, sm = pd.DataFrame(rows), pd.DataFrame(summary)
        run.write_csv("scores.csv", df)
        run.write_csv("summary.csv", sm)
        final = run.finish(model=ses.lm.describe(), prompt_sets=[p.describe() for p in loaded], seed=cfg.seed,
                           params=cfg.params(refusal_token_ids=ses.refusal_ids, windows=list(windows)),
                           results={"summary": sm.to_dict(orient="records")},
                           judge=judge.describe() if judge is not None else None)
    print_summary(sm, f"refusal score: {final}")
    console.print(f"wrote {final}")
