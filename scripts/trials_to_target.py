"""Trials-to-target of optimize runs: the first trial (in trial order) whose validation refusal rate and KL reach a
target, and the best refusal at the KL limit after each budget, for runs side by side (e.g. with and without
--warm-start).

    python scripts/trials_to_target.py runs/optimize/cold runs/optimize/warm --refusal 0.1 --kl 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd


def trials_to_target(trials: pd.DataFrame, refusal: float, kl: float) -> int | None:
    """1-based count of trials until the first one with ``refusal <= refusal`` and ``kl <= kl``; None if none."""
    t = trials.sort_values("trial").reset_index(drop=True)
    hit = t[(t["refusal"] <= refusal) & (t["kl"] <= kl)]
    return None if hit.empty else int(hit.index[0]) + 1


def best_by_budget(trials: pd.DataFrame, kl: float, budgets) -> dict:
    """Lowest refusal among the first ``b`` trials with KL <= ``kl``, for each budget ``b`` (NaN: none)."""
    t = trials.sort_values("trial").reset_index(drop=True)
    out = {}
    for b in budgets:
        ok = t.iloc[:b]
        ok = ok[ok["kl"] <= kl]
        out[b] = float(ok["refusal"].min()) if len(ok) else float("nan")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="optimize run folders")
    ap.add_argument("--refusal", type=float, default=0.1, help="target validation refusal rate (at most)")
    ap.add_argument("--kl", type=float, default=0.1, help="KL limit (nats)")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        trials = pd.read_csv(run / "trials.csv")
        meta = json.loads((run / "run.json").read_text())
        warm = meta["params"].get("warm_start")
        n = len(trials)
        budgets = sorted({b for b in (5, 10, 20, 40, n) if b <= n})
        best = best_by_budget(trials, args.kl, budgets)
        rows.append({"run": run.name, "model": meta["model"]["id"], "warm_start": warm or "-", "trials": n,
                     "baseline_refusal": meta["results"]["baseline"].get("refusal"),
                     "trials_to_target": trials_to_target(trials, args.refusal, args.kl),
                     **{f"best@{b}": v for b, v in best.items()},
                     "seconds_per_trial": round(float(trials["seconds"].mean()), 1)})
    df = pd.DataFrame(rows)
    print(f"target: validation refusal <= {args.refusal} with first-token KL <= {args.kl} nats")
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
