"""Comparing models of different widths and depths: imprint figures with a prompt-sampling spread, and depths as
fractions of the model.

Directions of models of different widths cannot be compared, but the alignment-imprint figures
(:func:`toolkit.geometry.imprint`, OBLITERATUS's "alignment imprint") can. This project's addition: a figure's
sampling spread from two disjoint halves of the prompts (:func:`toolkit.prompts.PromptSet.half`, a seeded hash
split by prompt id, :func:`toolkit.steering.hash_split`), so that a difference between two models can be read
beside how much the same model's figure moves when its prompts are redrawn.

* value of a figure for a model = the mean of its two halves' values; spread = ``|half A - half B|``.
  Why ``|a - b|``: for two independent half-sample estimates with standard deviation ``s_h`` each, ``a - b`` has
  standard deviation ``sqrt(2) s_h``, and the mean of the halves has ``s_h / sqrt(2)``, so ``E|a - b| =
  sqrt(2/pi) * sqrt(2) s_h ~ 1.6`` standard deviations of the value: a single-draw, rough scale of the sampling
  error, not an interval.
* a difference between models is flagged *within sampling spread* when ``|diff| <= spread_a + spread_b``
  (:func:`within_spread`). The sum (not the root of the sum of squares) is the conservative choice: with one pair
  of halves per model each spread is itself a one-draw estimate, so the rule only marks differences that are
  clearly not larger than what redrawing prompts does; it is not a significance test.
* depth fraction of a layer (:func:`depth_fraction`): the share of the model's blocks that have run at the hook
  site read, so ``resid_pre`` of layer ``L`` (block ``L``'s input, after ``L`` blocks) is ``L / n``, a site inside
  block ``L`` (``resid_mid``, ``attn_out``, ``mlp_out``, a head's ``z``) is ``(L + 0.5) / n`` and ``resid_post``
  is ``(L + 1) / n``. The same rule for every site makes a patching peak and a direction layer comparable across
  models of 24, 28 or 30 layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from .errors import ToolkitError

#: the part of block ``L`` done at each hook site, added to ``L`` before dividing by the number of layers
SITE_OFFSET = {"resid_pre": 0.0, "resid_mid": 0.5, "attn_out": 0.5, "mlp_out": 0.5, "z": 0.5, "resid_post": 1.0}

#: imprint figures counted in layers of one model (not comparable across depths): left out of cross-model
#: differences; ``peak_depth`` (:func:`depth_fraction` of ``peak_layer``) stands in for ``peak_layer``
ABSOLUTE_FIGURES = ("peak_layer",)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def figure_spread(half_a: Mapping[str, float], half_b: Mapping[str, float]) -> pd.DataFrame:
    """Per figure, the value and sampling spread of one model from the figures of two disjoint prompt halves.

    Args:
        half_a, half_b: ``{figure: value}`` (float64 numbers; NaN or None for a figure a half lacks), e.g. the
            output of :func:`toolkit.geometry.imprint` for each half.

    Returns:
        One row per figure present in both (in ``half_a``'s order): ``figure``, ``half_a``, ``half_b``,
        ``value`` = ``(half_a + half_b) / 2`` and ``spread`` = ``|half_a - half_b|`` (NaN where either is missing).

    Raises:
        ToolkitError: the two halves share no figure.
    """
    common = [f for f in half_a if f in half_b]
    if not common:
        raise ToolkitError("the two halves have no figure in common")
    rows = []
    for f in common:
        a, b = half_a[f], half_b[f]
        ok = _finite(a) and _finite(b)
        rows.append({"figure": f, "half_a": float(a) if _finite(a) else math.nan,
                     "half_b": float(b) if _finite(b) else math.nan,
                     "value": (float(a) + float(b)) / 2 if ok else math.nan,
                     "spread": abs(float(a) - float(b)) if ok else math.nan})
    return pd.DataFrame(rows)


def within_spread(diff: float, spread_a: float, spread_b: float) -> bool | None:
    """Whether a difference between two models is within their sampling spreads: ``|diff| <= spread_a +
    spread_b`` (see the module docstring for why the sum). None when a spread or the difference is unknown (NaN):
    without both spreads there is nothing to compare against.

    Raises:
        ToolkitError: a negative spread.
    """
    if any(_finite(s) and s < 0 for s in (spread_a, spread_b)):
        raise ToolkitError(f"spreads must be >= 0, got {spread_a} and {spread_b}")
    if not (_finite(diff) and _finite(spread_a) and _finite(spread_b)):
        return None
    return abs(diff) <= spread_a + spread_b


def model_differences(models: pd.DataFrame) -> pd.DataFrame:
    """Every pair of models, figure by figure: the difference beside the two spreads and the
    :func:`within_spread` flag.

    Args:
        models: long table with columns ``model``, ``figure``, ``value``, ``spread`` (one row per model and
            figure, spread NaN when a model has no halves), models in the order to pair them.

    Returns:
        One row per pair (``model_a`` before ``model_b`` in input order) and figure both have, figures of
        :data:`ABSOLUTE_FIGURES` left out: ``model_a``, ``model_b``, ``figure``, ``value_a``, ``value_b``,
        ``diff`` = ``value_b - value_a``, ``spread_a``, ``spread_b``, ``within_spread`` (bool, or None when unknown).

    Raises:
        ToolkitError: a missing column or a model listed twice for one figure.
    """
    need = {"model", "figure", "value", "spread"}
    if not need <= set(models.columns):
        raise ToolkitError(f"model table lacks column(s) {sorted(need - set(models.columns))}")
    if models.duplicated(["model", "figure"]).any():
        raise ToolkitError("a model has two rows for one figure")
    names = list(dict.fromkeys(models.model))
    by = {m: models[models.model == m].set_index("figure") for m in names}
    rows = []
    for i, ma in enumerate(names):
        for mb in names[i + 1:]:
            for f in by[ma].index:
                if f in ABSOLUTE_FIGURES or f not in by[mb].index:
                    continue
                a, b = by[ma].loc[f], by[mb].loc[f]
                diff = float(b.value) - float(a.value)
                rows.append({"model_a": ma, "model_b": mb, "figure": f, "value_a": float(a.value),
                             "value_b": float(b.value), "diff": diff, "spread_a": float(a.spread),
                             "spread_b": float(b.spread),
                             "within_spread": within_spread(diff, float(a.spread), float(b.spread))})
    return pd.DataFrame(rows, columns=["model_a", "model_b", "figure", "value_a", "value_b", "diff", "spread_a",
                                       "spread_b", "within_spread"])


def depth_fraction(layer: int, n_layers: int, site: str = "resid_pre") -> float:
    """A layer as a fraction of the model's depth: ``(layer + SITE_OFFSET[site]) / n_layers``, the share of the
    blocks that have run where ``site`` is read (``resid_pre``: ``L / n``; inside the block: ``(L + 0.5) / n``;
    ``resid_post``: ``(L + 1) / n``). Project convention; see the module docstring.

    Args:
        layer: block index, ``0 <= layer < n_layers``.
        n_layers: the model's number of blocks (run.json ``model.n_layers``).
        site: a hook site of :data:`SITE_OFFSET`.

    Raises:
        ToolkitError: ``n_layers < 1``, a layer outside the model, or an unknown site.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ToolkitError(f"n_layers must be a positive integer, got {n_layers!r}", param="n_layers")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise ToolkitError(f"layer {layer!r} is outside a model of {n_layers} layers", param="layer")
    if site not in SITE_OFFSET:
        raise ToolkitError(f"unknown hook site {site!r}; choose from {', '.join(SITE_OFFSET)}", param="site")
    return (layer + SITE_OFFSET[site]) / n_layers


def patch_peak(summary: pd.DataFrame, direction: str = "denoise", sites=("attn_out", "mlp_out")) -> dict:
    """The activation-patching peak of a ``refusal patch`` run: the layer whose single component (one site at one
    position, not a head) has the largest effect.

    Args:
        summary: the run's ``summary.csv`` (columns ``direction``, ``site``, ``layer``, ``head``, ``positions``,
            ``effect``: effect = normalised for denoising, 1 - normalised for noising; 0 = no change, 1 = the whole
            gap between the harmful and harmless baselines).
        direction: ``denoise`` or ``noise``.
        sites: sites taken into account. Default: the block components ``attn_out`` and ``mlp_out`` (what one
            layer adds); ``resid_*`` carries everything written so far, so its effect mostly grows with depth and
            its peak sits near the last layer.

    Returns:
        ``{"layer": int, "site": str, "positions": str, "effect": float}`` of the best component (ties: the
        shallowest layer, then the order of ``summary``).

    Raises:
        ToolkitError: missing columns, or no component of ``direction`` at ``sites`` (naming what the run has).
    """
    need = {"direction", "site", "layer", "head", "positions", "effect"}
    if not need <= set(summary.columns):
        raise ToolkitError(f"patch summary lacks column(s) {sorted(need - set(summary.columns))}")
    sites = list(sites)
    s = summary[(summary.direction == direction) & summary.site.isin(sites) & summary["head"].isna()
                & summary.effect.notna()]
    if s.empty:
        have = sorted(set(summary.site[summary.direction == direction].dropna()))
        raise ToolkitError(f"the patch run has no {direction} component at {', '.join(sites)} (it has "
                           f"{', '.join(have) or 'no ' + direction + ' rows'})", param="sites")
    s = s.sort_values(["effect", "layer"], ascending=[False, True], kind="stable")
    best = s.iloc[0]
    return {"layer": int(best.layer), "site": str(best.site), "positions": str(best.positions),
            "effect": float(best.effect)}
