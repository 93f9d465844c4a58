"""``refusal score``: per-prompt logit refusal score and marker judgement on one or more prompt sets."""

from __future__ import annotations

import time

import pandas as pd
import typer

from toolkit.errors import ToolkitError
from toolkit.evaluation import evaluate, judged
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run

from .common import (BatchOpt, DeviceOpt, DtypeOpt, ForceOpt, GenOpt, ModelOpt, NameOpt, QuietOpt, SeedOpt,
                     SystemOpt, console, handle_errors, open_session, print_summary, summary_row)


@handle_errors
def score(
    sets: list[str] = typer.Argument(None, help="prompt sets: harmful, harmless, borderline, or files "
                                     "(.jsonl/.json/.csv/.tsv/.txt) [default: harmful harmless]"),
    split: str = typer.Option("test", "--split", help="train, val, test or all (files without splits: all)"),
    column: str = typer.Option(None, "--column", help="field/column holding the prompt in user files"),
    limit: int = typer.Option(None, "--limit", min=1, help="score only the first N prompts of each set"),
    gen_tokens: int = GenOpt,
    model: str = ModelOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, batch_size: int = BatchOpt,
    system: str = SystemOpt, name: str = NameOpt, force: bool = ForceOpt, seed: int = SeedOpt, quiet: bool = QuietOpt,
):
    """Score refusals: logit refusal score (Arditi et al.) and marker judge on greedy completions.

    Writes runs/score/NAME/ with scores.csv (one row per prompt), summary.csv (refusal rate with Wilson 95 %
    interval, mean score per set) and run.json.
    """
    sets = sets or ["harmful", "harmless"]
    loaded = []
    for s in sets:
        ps = load_prompt_set(s, column)
        loaded.append(ps.select(split).head(limit))
    loaded = distinct_names(loaded)
    if gen_tokens < 0:
        raise ToolkitError("--gen-tokens must be >= 0")
    with Run("score", name, force) as run:
        ses = open_session(model, dtype, device, batch_size, system, quiet, seed)
        rows, summary = [], []
        for ps in loaded:
            t0 = time.time()
            ev = evaluate(ses.runner, ses.runner.encode(ps.prompts), judged(ses.refusal_ids), gen_tokens=gen_tokens, desc=ps.name)
            run.time(f"score_{ps.name}", time.time() - t0)
            for i, r in enumerate(ps.records):
                rows.append({"set": ps.name, "id": r["id"], "category": r["category"], "split": r["split"],
                             "score": float(ev.scores[i]),
                             "refusal": None if ev.refusals is None else bool(ev.refusals[i]),
                             "completion": None if ev.completions is None else ev.completions[i]})
            summary.append(summary_row(ps.name, ps.split, "baseline", ev.refusals, ev.scores))
        df, sm = pd.DataFrame(rows), pd.DataFrame(summary)
        run.write_csv("scores.csv", df)
        run.write_csv("summary.csv", sm)
        final = run.finish(model=ses.lm.describe(), prompt_sets=[p.describe() for p in loaded], seed=seed,
                           params={"split": split, "gen_tokens": gen_tokens, "refusal_token_ids": ses.refusal_ids,
                                   "system": system, "batch_size": batch_size, "limit": limit},
                           results={"summary": sm.to_dict(orient="records")})
    print_summary(sm, f"refusal score: {final}")
    console.print(f"wrote {final}")

