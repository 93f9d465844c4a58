"""Summaries of steering sweeps.

``refusal steer``: per point (direction, layer, alpha, set, part) means and rates with intervals, the steered
direction against the random and orthogonal-random bands, and monotonicity in alpha. Input is the sweep's
per-prompt table: one row per direction kind (``learned``, ``random``, ``orthogonal``, and ``conditional``: the
steered direction under CAST's gate, :func:`cast_table`), direction index, layer,
alpha, set, part and prompt, with ``score`` and, when completions were generated, ``refusal``, ``degenerate`` and
``coherence``.

``refusal dose-response``: per alpha and role rates with Wilson intervals, logistic fits, ED50s with bootstrap
intervals and the therapeutic index (:func:`summarise_doses`, :func:`fit_curves`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .steering import monotone_range

KEYS = ["kind", "direction_index", "layer", "alpha", "set", "part"]


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Per direction, layer, alpha, set and part: mean score with its t interval, refusal and degenerate rates with
    Wilson intervals, and mean coherence (when completions were generated)."""
    from .stats import mean_summary, rate_summary

    rows = []
    for key, g in df.groupby(KEYS, sort=False):
        row = dict(zip(KEYS, key))
        m = mean_summary(g["score"].to_numpy(float))
        row.update({"n": m["n"], "mean_score": m["mean"], "score_ci_low": m["ci_low"], "score_ci_high": m["ci_high"]})
        if g["refusal"].notna().all():
            for col in ("refusal", "degenerate"):
                s = rate_summary(g[col].astype(bool).tolist())
                row.update({f"{col}_rate": s["rate"], f"{col}_ci_low": s["ci_low"], f"{col}_ci_high": s["ci_high"]})
            row["mean_coherence"] = float(np.nanmean(g["coherence"].to_numpy(float))) \
                if g["coherence"].notna().any() else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def band_table(summary: pd.DataFrame, rates: bool) -> pd.DataFrame:
    """The steered direction's mean per (layer, set, part, alpha) beside the random and orthogonal-random bands:
    the random directions' mean, 2.5th and 97.5th percentiles of their per-direction means, the empirical
    two-sided p-value of the learned effect (vs alpha 0) among the random effects, and whether it lies outside."""
    from .stats import random_control

    metrics = ["mean_score"] + (["refusal_rate"] if rates else [])
    main = summary[summary.kind == "learned"]
    rows = []
    for (layer, set_, part), g in main.groupby(["layer", "set", "part"], sort=False):
        base = g[g.alpha == 0]
        for _, lr in g.iterrows():
            row = {"layer": layer, "set": set_, "part": part, "alpha": lr["alpha"]}
            for m in metrics:
                row[m] = lr[m]
                b0 = float(base[m].iloc[0]) if len(base) else float("nan")
                for kind in ("random", "orthogonal"):
                    rs = summary[(summary.kind == kind) & (summary.layer == layer) & (summary.set == set_)
                                 & (summary.part == part)]
                    at = rs[rs.alpha == lr["alpha"]][m].to_numpy(float)
                    if len(at) == 0:
                        continue
                    pfx = f"{m}_{kind}"
                    row[f"{pfx}_mean"] = float(at.mean())
                    row[f"{pfx}_low"] = float(np.percentile(at, 2.5))
                    row[f"{pfx}_high"] = float(np.percentile(at, 97.5))
                    if lr["alpha"] != 0 and len(base):
                        ctl = random_control(float(lr[m]) - b0, at - b0)
                        row[f"{pfx}_p"] = ctl["p_value"]
                        row[f"{pfx}_p_t"] = ctl["p_parametric"]
                        row[f"{pfx}_outside"] = bool(ctl["exceeds_band"])
            rows.append(row)
    return pd.DataFrame(rows)


def cast_table(summary: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Conditional activation steering (CAST, Lee et al. 2024) beside unconditional steering of the same direction.

    One row per (layer, set, part, alpha): ``gate_rate`` (share of the set's prompts whose gate is open, from the
    per-prompt ``gated`` column), ``n``, and for each metric of ``summary`` (``mean_score``; ``refusal_rate`` when
    completions were judged) its value under unconditional steering (kind ``learned``) as
    ``<metric>_unconditional`` and under conditional steering (kind ``conditional``) as ``<metric>_conditional``;
    at alpha 0 both are the unsteered baseline.

    Args:
        summary: :func:`summarise` of ``df``.
        df: the per-prompt table with kinds ``learned`` and ``conditional`` and the column ``gated`` (bool).

    Raises:
        ToolkitError: no conditional rows or no ``gated`` column.
    """
    from .errors import ToolkitError

    if "gated" not in df.columns or not (df["kind"] == "conditional").any():
        raise ToolkitError("the sweep has no conditional steering rows")
    metrics = [m for m in ("mean_score", "refusal_rate") if m in summary.columns and summary[m].notna().any()]
    per_prompt = df[df["kind"] == "conditional"].drop_duplicates(["set", "part", "id"])
    gate = per_prompt.groupby(["set", "part"], sort=False)["gated"].agg(lambda g: float(g.astype(bool).mean()))
    keys = ["layer", "set", "part", "alpha"]
    side = {}
    for kind, label in (("learned", "unconditional"), ("conditional", "conditional")):
        s = summary[summary["kind"] == kind].set_index(keys)[metrics]
        side[label] = s.rename(columns={m: f"{m}_{label}" for m in metrics})
    cond = summary[summary["kind"] == "conditional"][keys + ["n"]].set_index(keys)
    out = cond.join(side["unconditional"]).join(side["conditional"]).reset_index()
    out.insert(4, "gate_rate", [gate[(s, p)] for s, p in zip(out["set"], out["part"])])
    cols = keys + ["gate_rate", "n"] + [f"{m}_{label}" for m in metrics for label in ("unconditional", "conditional")]
    return out[cols]


def monotonicity(summary: pd.DataFrame) -> list[dict]:
    """For the steered direction per (layer, set, part): Spearman's rho of mean score against alpha (scipy) and
    the widest alpha interval around 0 on which the mean score never decreases."""
    from scipy.stats import spearmanr

    out_rows = []
    main = summary[summary.kind == "learned"]
    for (layer, set_, part), g in main.groupby(["layer", "set", "part"], sort=False):
        g = g.sort_values("alpha")
        rho = float(spearmanr(g.alpha, g.mean_score).statistic) if len(g) > 2 else float("nan")
        lo, hi = monotone_range(g.alpha.tolist(), g.mean_score.tolist())
        out_rows.append({"layer": int(layer), "set": set_, "part": part, "spearman_rho": rho,
                         "monotone_from": lo, "monotone_to": hi})
    return out_rows


def summarise_doses(df: pd.DataFrame) -> pd.DataFrame:
    """Per alpha and role (harmful, benign, and ``all`` for both sets together): refusal and degenerate rates with
    Wilson 95 % intervals, mean coherence (nats/token, t interval) and mean refusal score."""
    from .stats import mean_summary, rate_summary

    rows = []
    groups = [(a, role, g) for (a, role), g in df.groupby(["alpha", "role"], sort=True)]
    groups += [(a, "all", g) for a, g in df.groupby("alpha", sort=True)]
    for a, role, g in groups:
        row = {"alpha": a, "role": role, "n": len(g)}
        for col in ("refusal", "degenerate"):
            s = rate_summary(g[col].astype(bool).tolist())
            row.update({f"{col}_rate": s["rate"], f"{col}_ci_low": s["ci_low"], f"{col}_ci_high": s["ci_high"]})
        c = mean_summary(g["coherence"].dropna().to_numpy(float))
        row.update({"coherence": c["mean"], "coherence_ci_low": c["ci_low"], "coherence_ci_high": c["ci_high"],
                    "mean_score": float(g["score"].mean())})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["role", "alpha"], kind="stable").reset_index(drop=True)


def _outcomes(df: pd.DataFrame, role: str, alphas: list[float]) -> np.ndarray:
    """``[n_prompts, n_alphas]`` refusal outcomes of one role (prompts observed at every dose)."""
    t = df[df.role == role].pivot(index="id", columns="alpha", values="refusal")
    return t[alphas].to_numpy(bool)


def fit_curves(df: pd.DataFrame, alphas: list[float], n_resamples: int, seed: int):
    """Logistic fits, ED50s with bootstrap intervals per role, and the therapeutic index.

    Returns:
        (fits table, ``{role: {"intercept", "slope", "ed50"}}`` for the plot, therapeutic-index dict).
    """
    from .stats import bootstrap_ed50, logistic_fit, therapeutic_index

    lo, hi = min(alphas), max(alphas)
    rows, curves, ys = [], {}, {}
    for role in ("harmful", "benign"):
        y = _outcomes(df, role, alphas)
        ys[role] = y
        fit = logistic_fit(np.tile(alphas, y.shape[0]), y.reshape(-1))
        b = bootstrap_ed50(alphas, y, lo, hi, n_resamples=n_resamples, seed=seed)
        rows.append({"role": role, "measure": "refusal" if role == "harmful" else "over-refusal",
                     "intercept": fit.intercept, "slope": fit.slope, "se_slope": fit.se_slope,
                     "converged": fit.converged, "fit_status": fit.status, "ed50": b["ed50"], "reason": b["reason"],
                     "ci_low": b["ci_low"], "ci_high": b["ci_high"], "n_inside": b["n_inside"],
                     "n_resamples": b["n_resamples"], "method": b["method"]})
        curves[role] = {"intercept": fit.intercept, "slope": fit.slope, "ed50": b["ed50"]}
    ti = therapeutic_index(alphas, ys["harmful"], ys["benign"], lo, hi, n_resamples=n_resamples, seed=seed)
    return pd.DataFrame(rows), curves, ti
