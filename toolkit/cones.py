"""Concept cones (OBLITERATUS's method, with intervals and a null) as tables, and the ablation test of the category
directions. The distributions come from :func:`toolkit.geometry.cone_distributions`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .errors import ToolkitError
from .geometry import cone_label, permutation_p, polyhedral_share
from .prompts import PromptSet
from .stats import basic_interval, cohen_d, mean_summary, percentile_interval, rate_summary


def separation(h: torch.Tensor, g: torch.Tensor) -> np.ndarray:
    """Per layer, how far apart two sets lie along their difference-in-means direction: Cohen's d of the
    projections onto ``unit(mean_h - mean_g)`` (pooled standard deviation, :func:`toolkit.stats.cohen_d`); 0 where
    the projections do not vary. ``[n_h, L, d], [n_g, L, d] -> [L]`` float64."""
    r = h.double().mean(0) - g.double().mean(0)
    u = r / r.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    ph, pg = (h.double() * u).sum(-1), (g.double() * u).sum(-1)  # [n, L]
    d = cohen_d(ph.numpy(), pg.numpy(), axis=0)
    # no spread at all (layer 0, where the post-instruction tokens' embeddings are identical): no separation
    return np.nan_to_num(np.atleast_1d(d), nan=0.0)


def pick_layer(layers: list[int], sep: np.ndarray, n_layers: int, max_frac: float = 0.8) -> int:
    """The layer with the largest separation among layers below ``max_frac`` of the depth (else among all)."""
    ok = [i for i, l in enumerate(layers) if l < max_frac * n_layers] or list(range(len(layers)))
    return layers[max(ok, key=lambda i: sep[i])]


def cone_tables(dist: dict, layers: list[int], norms: np.ndarray, pooled: torch.Tensor, sep: np.ndarray,
                cat_dirs: torch.Tensor) -> dict:
    """Tidy tables from :func:`toolkit.geometry.cone_distributions`: per layer, per layer x category, per pair.

    Intervals are basic bootstrap intervals (:func:`toolkit.stats.basic_interval`); null bands are the 2.5th
    and 97.5th percentiles of the random-split figures; p-values are one-sided permutation p-values.

    Args:
        dist: the distributions (``categories``, ``sizes``, ``point``, ``boot``, ``null``).
        layers: the ``L`` analysed layers.
        norms: mean residual norm per layer ``[L]``; pooled: pooled direction ``[L, d]`` float64; sep: ``[L]``;
        cat_dirs: category directions ``[k, L, d]`` float64 (for each one's cosine with the pooled direction).

    Returns:
        ``{"cones": per layer, "categories": per layer x category, "pairs": per layer x category pair}`` (pandas
        DataFrames, the ``cones.csv``, ``categories.csv`` and ``pairs.csv`` of a cones run).
    """
    cats, sizes, P, B, N = dist["categories"], dist["sizes"], dist["point"], dist["boot"], dist["null"]
    k = len(cats)

    bounds = {"mean_abs_cos": (0, 1), "dim": (1, k), "strength": (0, np.inf), "specificity": (0, 1), "cos": (-1, 1)}

    def ci(key):  # basic intervals can leave a figure's range: clip to it
        lo, hi = basic_interval(P[key], B[key]) if B else (None, None)
        if lo is None:
            return np.full_like(P[key], np.nan), np.full_like(P[key], np.nan)
        return np.clip(lo, *bounds[key]), np.clip(hi, *bounds[key])

    def band(key):
        lo, hi = percentile_interval(N[key]) if N else (None, None)
        return (lo, hi) if lo is not None else (np.full_like(P[key], np.nan), np.full_like(P[key], np.nan))

    (cl, ch), (dl, dh), (nl, nh), (ml, mh) = ci("mean_abs_cos"), ci("dim"), band("mean_abs_cos"), band("dim")
    if N:
        p_cos = permutation_p(P["mean_abs_cos"], N["mean_abs_cos"], lower=True)
        p_dim = permutation_p(P["dim"], N["dim"], lower=False)
        null_poly = polyhedral_share(N["mean_abs_cos"], N["dim"])
    rows = []
    for i, l in enumerate(layers):
        row = {"layer": l, "n_categories": k, "mean_abs_cos": P["mean_abs_cos"][i], "cos_ci_low": cl[i],
               "cos_ci_high": ch[i], "cos_null_low": nl[i], "cos_null_high": nh[i], "dim": P["dim"][i],
               "dim_ci_low": dl[i], "dim_ci_high": dh[i], "dim_null_low": ml[i], "dim_null_high": mh[i],
               "p_cos_below_null": p_cos[i] if N else np.nan, "p_dim_above_null": p_dim[i] if N else np.nan,
               "null_polyhedral_share": null_poly[i] if N else np.nan,
               "pooled_strength": float(pooled[i].norm()),
               "pooled_strength_rel": float(pooled[i].norm()) / float(norms[i]), "separation_d": float(sep[i])}
        if B and N:
            row["label"], row["reason"] = cone_label((cl[i], ch[i]), (dl[i], dh[i]), p_cos[i], p_dim[i], null_poly[i])
        else:
            row["label"], row["reason"] = "unlabelled", "labels need both --boot and --null"
        rows.append(row)
    (sl, sh), (pl, ph), (_, snh) = ci("strength"), ci("specificity"), band("specificity")
    crow = []
    for i, l in enumerate(layers):
        u = pooled[i] / pooled[i].norm()
        for j, c in enumerate(cats):
            crow.append({"layer": l, "category": c, "n": sizes[j], "strength": P["strength"][i, j],
                         "strength_ci_low": sl[i, j], "strength_ci_high": sh[i, j],
                         "strength_rel": P["strength"][i, j] / float(norms[i]), "specificity": P["specificity"][i, j],
                         "specificity_ci_low": pl[i, j], "specificity_ci_high": ph[i, j],
                         "specificity_null_high": snh[i, j],
                         "cos_pooled": float(cat_dirs[j, i] @ u / cat_dirs[j, i].norm())})
    (ql, qh) = ci("cos")
    prow = []
    for i, l in enumerate(layers):
        for a in range(k):
            for b in range(a + 1, k):
                prow.append({"layer": l, "a": cats[a], "b": cats[b], "cos": P["cos"][i, a, b],
                             "ci_low": ql[i, a, b], "ci_high": qh[i, a, b]})
    return {"cones": pd.DataFrame(rows), "categories": pd.DataFrame(crow), "pairs": pd.DataFrame(prow)}


def ablation_test(runner, refusal_ids: list[int], harmful: PromptSet, harmless: PromptSet, cats: list[str],
                  single: torch.Tensor, cat_dirs: torch.Tensor, layer: int, seed: int) -> pd.DataFrame:
    """Refusal score of each category's held-out prompts (and harmless KL) under four conditions: no ablation,
    the single pooled direction, the span of all category directions, and the single direction plus random
    directions up to the same dimension (a control for removing more dimensions). Ablation is directional
    ablation of the subspace at every layer (:func:`toolkit.interventions.subspace_ablation`); scores are the
    logit refusal score of the last prompt position, KL is against the unablated harmless logits.

    Args:
        runner: a :class:`toolkit.runner.Runner`; refusal_ids: the refusal-opener token ids.
        harmful: held-out harmful prompts with a ``category`` per prompt (only ``cats`` are scored).
        harmless: held-out harmless prompts (for the KL and the harmless score).
        cats: the analysed categories, in the order of ``cat_dirs``.
        single: the pooled direction ``[d_model]``; cat_dirs: category directions ``[k, d_model]``.
        layer: the layer the directions come from (recorded in the table); seed: seeds the random directions.

    Returns:
        One row per condition and category (plus ``all harmful`` and ``all harmless``): mean score with its t
        interval, the share of scores > 0 with its Wilson interval, and the mean KL (harmless row).

    Raises:
        ToolkitError: no harmful prompt of the analysed categories.
    """
    from .evaluation import RefusalScore, evaluate
    from .interventions import subspace_ablation
    from .steering import random_directions

    r, Gs = runner, harmless
    Hs = harmful.subset([i for i, rec in enumerate(harmful.records) if rec["category"] in cats])
    if len(Hs) == 0:
        raise ToolkitError(f"the ablation test found no {harmful.split or 'all'} prompts of the analysed categories")
    eh, eg = r.encode(Hs.prompts), r.encode(Gs.prompts)
    extra, _ = random_directions(len(cats) - 1, single.shape[0], seed, orthogonal_to=single.float())
    conds = {"none": None, "single": single[None].float(), "categories": cat_dirs.float(),
             f"single+{len(cats) - 1} random": torch.cat([single[None].float(), extra.float()])}
    score = RefusalScore(tuple(refusal_ids))
    base_g = evaluate(r, eg, [score], desc="harmless, ablate none")
    rows = []
    for cname, vecs in conds.items():
        sh = evaluate(r, eh, [score], desc=f"harmful, ablate {cname}",
                      intervention=None if vecs is None else subspace_ablation(r.model, vecs)).scores
        ev_g = evaluate(r, eg, [score], desc=f"harmless, ablate {cname}",
                        intervention=subspace_ablation(r.model, vecs)) if vecs is not None else base_g
        sg, kl = ev_g.scores, ev_g.kl_from(base_g)
        dim = 0 if vecs is None else int(min(len(vecs), vecs.shape[0]))
        cat_of = np.array([rec["category"] for rec in Hs.records])
        for c in cats + ["all harmful"]:
            m = cat_of == c if c != "all harmful" else np.ones(len(cat_of), bool)
            ms, rs = mean_summary(sh[m]), rate_summary(list(sh[m] > 0))
            rows.append({"condition": cname, "layer": layer, "dims": dim, "set": Hs.name, "category": c,
                         "n": int(m.sum()), "mean_score": ms["mean"], "score_ci_low": ms["ci_low"],
                         "score_ci_high": ms["ci_high"], "refusal_rate_score": rs["rate"], "rate_ci_low": rs["ci_low"],
                         "rate_ci_high": rs["ci_high"], "mean_kl": np.nan})
        ms = mean_summary(sg)
        rows.append({"condition": cname, "layer": layer, "dims": dim, "set": Gs.name, "category": "all harmless",
                     "n": len(sg), "mean_score": ms["mean"], "score_ci_low": ms["ci_low"],
                     "score_ci_high": ms["ci_high"], "refusal_rate_score": float((sg > 0).mean()),
                     "rate_ci_low": np.nan, "rate_ci_high": np.nan, "mean_kl": float(kl.mean())})
    return pd.DataFrame(rows)
