"""Direction estimators side by side: extract runs (one per `--method`, same model and prompts) in one table with
the chosen layer (and as a fraction of depth), validation refusal by the marker judge with its Wilson interval,
harmless KL, bypass score, cosine with difference-in-means at the same layer and position and with the
difference-in-means run's chosen direction, and the probe's cross-validated accuracy at the chosen layer.

    python scripts/estimator_table.py runs/extract/est-* --out runs/estimators.csv --markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.directions import Direction  # noqa: E402
from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.estimators import cosine  # noqa: E402
from toolkit.runs import load_run  # noqa: E402
from toolkit.stats import rate_ci  # noqa: E402


def estimator_row(folder: Path, meta: dict, reference: Direction | None) -> dict:
    """One table row from an extract run (``reference``: the difference-in-means run's chosen direction)."""
    res = meta.get("results") or {}
    ch = res.get("chosen") or {}
    model = meta.get("model") or {}
    n_layers = model.get("n_layers")
    n_val = next((p.get("n") for p in meta.get("prompt_sets", []) if p.get("split") == "val"), None)
    d = Direction.resolve(str(folder))
    rate = ch.get("judge_refusal")
    lo = hi = None
    if rate is not None and rate == rate and n_val:
        _, lo, hi = rate_ci(round(rate * n_val), int(n_val))
    cos_ref = None
    if reference is not None and reference.model_hash == d.model_hash:
        cos_ref = float(cosine(d.vector, reference.vector))
    return {"model": model.get("id"), "method": (res.get("estimator") or {}).get("method", "diff-means"),
            "run": folder.name, "layer": ch.get("layer"), "pos": ch.get("pos"),
            "depth": round(ch["layer"] / n_layers, 3) if n_layers and ch.get("layer") is not None else None,
            "val_refusal": rate, "ci_low": lo, "ci_high": hi,
            "baseline_refusal": (res.get("baseline") or {}).get("harmful_val_refusal"), "kl": ch.get("kl"),
            "bypass": ch.get("bypass"), "induce": ch.get("induce"), "cos_dim_same_site": ch.get("cos_diff_means"),
            "cos_dim_chosen": cos_ref, "probe_accuracy": ch.get("probe_accuracy"),
            "seconds": (meta.get("timings") or {}).get("total")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="extract run folders")
    ap.add_argument("--out", type=Path, help="write the table as CSV here")
    ap.add_argument("--markdown", action="store_true", help="print Markdown instead of plain text")
    a = ap.parse_args(argv)
    try:
        loaded = [load_run(r, "extract") for r in a.runs]
        refs = {}
        for folder, meta in loaded:
            if (meta.get("results") or {}).get("estimator", {}).get("method", "diff-means") == "diff-means":
                d = Direction.resolve(str(folder))
                refs.setdefault(d.model_hash, d)
        rows = []
        for folder, meta in loaded:
            h = (meta.get("model") or {}).get("hash")
            rows.append(estimator_row(folder, meta, refs.get(h)))
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    df = pd.DataFrame(rows)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(a.out, index=False)
    show = df.drop(columns=["run"])
    print(show.to_markdown(index=False, floatfmt=".3f") if a.markdown else show.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
