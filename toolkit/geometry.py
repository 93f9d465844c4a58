"""Geometry of refusal directions: concept cones, alignment imprints, and the residual geometry table.

Everything here is plain linear algebra on activations or directions already collected (no model). Inputs are
float tensors or arrays; computations run in float64.

Sources:

* Concept cones and alignment imprint: OBLITERATUS (per-category directions ``d_c = normalise(mean_harmful_c -
  mean_harmless)``, strength ``||mean_harmful_c - mean_harmless||``, pairwise ``|cos|``, specificity, entropy
  effective rank; imprint figures: Gini of strengths, effective rank, spectral decay, adjacent-layer smoothness,
  tail share, orthogonality). Its labels "linear" (mean ``|cos|`` > 0.9 and dimensionality < 1.5) and
  "polyhedral" (mean ``|cos|`` < 0.8 or dimensionality > 2) are used here only on bootstrap interval bounds,
  and only where the figures differ from a random-split null (:func:`cone_label`).
* Entropy effective rank: Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality".
* Gini coefficient: the mean absolute difference over twice the mean (Gini 1912).
* Residual geometry table: Heretic (p-e-w/heretic), cosine similarities between the harmless mean ``g``, the
  harmful mean ``b``, ``r = b - g`` and their geometric-median versions, with norms and a silhouette score.
* Geometric median: Weiszfeld's iteration (Weiszfeld 1937) with distances floored at ``eps`` (the smoothing of
  Pillutla, Kakade & Harchaoui 2022, "Robust aggregation for federated learning").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ToolkitError
from .stats.resampling import averaging_weights, bootstrap

#: OBLITERATUS's label thresholds (mean pairwise |cos| and entropy effective rank of the category directions).
LINEAR_MIN_COS, LINEAR_MAX_DIM = 0.9, 1.5
POLY_MAX_COS, POLY_MIN_DIM = 0.8, 2.0


def _as64(x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.detach().to(device="cpu", dtype=torch.float64)


def _rows(vectors, what: str = "directions") -> torch.Tensor:
    v = _as64(vectors)
    if v.ndim != 2 or v.shape[0] == 0:
        raise ToolkitError(f"{what} must be a non-empty [k, d] matrix, got shape {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise ToolkitError(f"{what} contain NaN or infinite values")
    return v


def unit_rows(vectors, eps: float = 1e-12) -> torch.Tensor:
    """Each row divided by its L2 norm: ``[k, d] -> [k, d]`` float64.

    Raises:
        ToolkitError: a zero row (a direction with no contrast) or a malformed matrix.
    """
    v = _rows(vectors)
    n = v.norm(dim=1, keepdim=True)
    if bool((n <= eps).any()):
        raise ToolkitError("cannot normalise a zero direction")
    return v / n


def cosine_matrix(vectors) -> torch.Tensor:
    """Cosine similarities between the rows: ``[k, d] -> [k, k]`` float64 (1 on the diagonal).

    Raises:
        ToolkitError: a zero row.
    """
    u = unit_rows(vectors)
    return (u @ u.T).clamp(-1.0, 1.0)


def effective_rank(vectors, *, normalise: bool = True) -> float:
    """Entropy effective rank ``exp(-sum p_i log p_i)`` with ``p = s / sum(s)``, ``s`` the singular values of the
    stacked vectors (Roy & Vetterli 2007; OBLITERATUS's cone dimensionality on unit directions).

    Between 1 (all rows parallel) and ``min(k, d)`` (``k`` orthogonal rows of equal norm).

    Args:
        vectors: ``[k, d]``.
        normalise: scale each row to unit norm first (as for directions).

    Raises:
        ToolkitError: a zero row (with ``normalise``), an all-zero matrix, or a malformed matrix.
    """
    v = unit_rows(vectors) if normalise else _rows(vectors)
    s = torch.linalg.svdvals(v)
    total = s.sum()
    if total <= 0:
        raise ToolkitError("effective rank of an all-zero matrix is undefined")
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def spectral_decay(vectors, *, normalise: bool = True, rel_floor: float = 1e-12) -> float:
    """``ln(s_max / s_min)`` of the singular values of the stacked (unit) vectors (OBLITERATUS), in nats.

    ``s_min`` is the smallest of the ``min(k, d)`` singular values, floored at ``rel_floor * s_max`` so that an
    exactly rank-deficient stack gives a large finite value instead of infinity. 0 for orthogonal unit rows.

    Raises:
        ToolkitError: a zero row or a malformed matrix.
    """
    v = unit_rows(vectors) if normalise else _rows(vectors)
    s = torch.linalg.svdvals(v)
    smax = float(s.max())
    if smax <= 0:
        raise ToolkitError("spectral decay of an all-zero matrix is undefined")
    return math.log(smax / max(float(s.min()), rel_floor * smax))


def gini(values) -> float:
    """Gini coefficient of non-negative values ``[n]``: ``sum_ij |x_i - x_j| / (2 n^2 mean(x))``.

    0 when all values are equal; ``(n - 1) / n`` when one value holds everything.

    Raises:
        ToolkitError: empty input, a negative or non-finite value, or all zeros.
    """
    x = _as64(values).flatten()
    if x.numel() == 0:
        raise ToolkitError("Gini coefficient of no values")
    if not torch.isfinite(x).all() or bool((x < 0).any()):
        raise ToolkitError("Gini coefficient needs finite non-negative values")
    n, mean = x.numel(), x.mean()
    if mean <= 0:
        raise ToolkitError("Gini coefficient of all-zero values is undefined")
    return float((x[:, None] - x[None, :]).abs().sum() / (2 * n * n * mean))


def mean_offdiag_abs(c: torch.Tensor) -> float:
    """Mean ``|c_ij|`` over ``i != j`` of a square ``[k, k]`` matrix (k >= 2), e.g. pairwise ``|cos|``.

    Raises:
        ToolkitError: fewer than two rows.
    """
    return float(c.abs()[_offdiag(c, "pairwise figures")].mean())


def _offdiag(c: torch.Tensor, what: str) -> torch.Tensor:
    """``[k, k]`` boolean mask of the off-diagonal entries; raises ToolkitError if ``k < 2``."""
    if c.shape[0] < 2:
        raise ToolkitError(f"{what} need at least two directions")
    return ~torch.eye(c.shape[0], dtype=torch.bool)


def specificity(c: torch.Tensor) -> torch.Tensor:
    """Per direction ``c``: ``1 - mean_{b != c} |cos(d_c, d_b)|`` (OBLITERATUS), ``[k, k] -> [k]``.

    Raises:
        ToolkitError: fewer than two directions.
    """
    return 1 - (c.abs() * _offdiag(c, "specificity figures")).sum(1) / (c.shape[0] - 1)


def contrast_layers(directions, scale, rel: float = 1e-6) -> list[int]:
    """Indices of the layers whose direction has a contrast: ``||d_l|| > rel * scale_l``.

    A layer where harmful and harmless residuals coincide (``resid_pre`` of layer 0 at the last token is the
    same token embedding in every prompt) gives a zero (or rounding-noise) direction with no meaningful
    orientation; such layers are reported and left out rather than analysed.

    Args:
        directions: ``[L, d]`` per-layer directions.
        scale: ``[L]`` the size a direction is judged against, e.g. the mean residual norm at that layer.
        rel: relative threshold.
    """
    norms = _as64(directions).norm(dim=1)
    s = _as64(scale)
    return [i for i in range(len(norms)) if float(norms[i]) > rel * float(s[i])]


# ----------------------------------------------------------------------------------------------- imprint
def adjacent_smoothness(directions) -> float:
    """Mean ``|cos|`` between the directions of adjacent layers (OBLITERATUS's smoothness), ``[L, d] -> float``.

    Raises:
        ToolkitError: fewer than two layers or a zero direction.
    """
    u = unit_rows(directions)
    if u.shape[0] < 2:
        raise ToolkitError("smoothness needs at least two layers")
    return float((u[:-1] * u[1:]).sum(1).abs().mean())


def angular_drift(directions) -> float:
    """Cumulative angle between adjacent layers' directions, ``sum_l arccos(cos(d_l, d_{l+1}))`` in degrees.

    Signed cosines: difference-in-means directions have a meaning (towards harmful), so a flip counts 180.

    Raises:
        ToolkitError: fewer than two layers or a zero direction.
    """
    u = unit_rows(directions)
    if u.shape[0] < 2:
        raise ToolkitError("angular drift needs at least two layers")
    cos = (u[:-1] * u[1:]).sum(1).clamp(-1.0, 1.0)
    return float(torch.rad2deg(torch.arccos(cos)).sum())


def orthogonality(directions) -> float:
    """Mean ``1 - |cos|`` over all pairs of layers (OBLITERATUS), ``[L, d] -> float`` in [0, 1].

    Raises:
        ToolkitError: fewer than two layers or a zero direction.
    """
    c = cosine_matrix(directions)
    return 1 - mean_offdiag_abs(c)


def tail_share(strengths, frac: float = 0.25) -> float:
    """Share of the total strength held by the last ``ceil(frac * L)`` layers (OBLITERATUS's tail bias).

    Args:
        strengths: ``[L]`` non-negative, in layer order.

    Raises:
        ToolkitError: empty, negative or all-zero strengths, or ``frac`` outside (0, 1].
    """
    s = _as64(strengths).flatten()
    if not 0 < frac <= 1:
        raise ToolkitError(f"tail fraction must be in (0, 1], got {frac}")
    if s.numel() == 0 or bool((s < 0).any()) or float(s.sum()) <= 0:
        raise ToolkitError("tail share needs non-negative strengths with a positive sum")
    k = math.ceil(frac * s.numel())
    return float(s[-k:].sum() / s.sum())


IMPRINT_FIGURES = {
    "gini": "Gini coefficient of per-layer strengths ||r_l|| (0 = spread evenly over layers)",
    "gini_rel": "Gini of strengths relative to the mean residual norm at each layer",
    "effective_rank": "entropy effective rank of the stacked unit directions (1 = one direction at every layer)",
    "spectral_decay": "ln(s_max / s_min) of the stacked unit directions (nats)",
    "smoothness": "mean |cos| between adjacent layers' directions",
    "tail_share": "share of total strength in the last quarter of layers",
    "tail_share_rel": "tail share of the relative strengths",
    "orthogonality": "mean 1 - |cos| over all pairs of layers",
    "angular_drift_deg": "cumulative angle between adjacent layers' directions (degrees)",
    "peak_layer": "layer with the largest relative strength",
}


def imprint(directions, layers: Sequence[int], resid_norms=None) -> dict:
    """Alignment-imprint figures of per-layer refusal directions (OBLITERATUS; see :data:`IMPRINT_FIGURES`).

    Args:
        directions: raw (unnormalised) difference-in-means directions ``[L, d_model]`` in layer order.
        layers: the block index of each row ``[L]``.
        resid_norms: mean residual-stream norm at each layer ``[L]`` (for relative strengths), or None.

    Returns:
        ``{figure: value}`` with the keys of :data:`IMPRINT_FIGURES` (relative ones NaN without norms).

    Raises:
        ToolkitError: fewer than two layers, a zero direction, or mismatched lengths.
    """
    d = _rows(directions)
    if d.shape[0] != len(layers):
        raise ToolkitError(f"{d.shape[0]} directions for {len(layers)} layers")
    if d.shape[0] < 2:
        raise ToolkitError("an imprint needs directions at two or more layers")
    strength = d.norm(dim=1)
    res = {"gini": gini(strength), "effective_rank": effective_rank(d), "spectral_decay": spectral_decay(d),
           "smoothness": adjacent_smoothness(d), "tail_share": tail_share(strength),
           "orthogonality": orthogonality(d), "angular_drift_deg": angular_drift(d)}
    if resid_norms is not None:
        rn = _as64(resid_norms).flatten()
        if rn.numel() != d.shape[0] or bool((rn <= 0).any()):
            raise ToolkitError("resid_norms must be positive, one per layer")
        rel = strength / rn
        res.update(gini_rel=gini(rel), tail_share_rel=tail_share(rel), peak_layer=int(layers[int(rel.argmax())]))
    else:
        res.update(gini_rel=float("nan"), tail_share_rel=float("nan"), peak_layer=int(layers[int(strength.argmax())]))
    return res


# ------------------------------------------------------------------------------------------ geometric median
def geometric_median(points, *, eps: float = 1e-8, tol: float = 1e-10, max_iter: int = 500) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to ``points``: Weiszfeld's iteration
    ``m <- sum_i w_i x_i / sum_i w_i`` with ``w_i = 1 / max(||x_i - m||, eps)``, started at the mean, stopped when
    the step is below ``tol * (1 + ||m||)`` or after ``max_iter`` steps. Float64.

    Args:
        points: ``[n, d]``.

    Returns:
        ``[d]`` float64.

    Raises:
        ToolkitError: no points or non-finite values.
    """
    x = _rows(points, "points")
    m = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        step = float((new - m).norm())
        m = new
        if step <= tol * (1 + float(m.norm())):
            break
    return m


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def residual_geometry(harmless, harmful, *, silhouette: bool = True, medians: list | None = None) -> dict:
    """Heretic's residual geometry figures at one layer.

    ``g``/``b``: harmless/harmful means; ``g*``/``b*``: their geometric medians; ``r = b - g``, ``r* = b* - g*``.
    Cosine similarities ``S(g,b)``, ``S(g*,b*)``, ``S(g,r)``, ``S(g*,r*)``, ``S(b,r)``, ``S(b*,r*)``, the L2 norms
    of all six vectors, and the mean silhouette coefficient (Euclidean; scikit-learn) of the two clusters.

    Args:
        harmless: ``[n_g, d_model]`` residuals.
        harmful: ``[n_b, d_model]`` residuals.

        medians: if a list is given, ``g*`` and ``b*`` (``[d_model]`` float64 each) are appended to it.

    Returns:
        dict with keys ``cos_g_b, cos_gm_bm, cos_g_r, cos_gm_rm, cos_b_r, cos_bm_rm, norm_g, norm_gm, norm_b,
        norm_bm, norm_r, norm_rm, silhouette`` (NaN cosines where a vector is zero).

    Raises:
        ToolkitError: fewer than two points on a side, or mismatched widths.
    """
    G, B = _rows(harmless, "harmless residuals"), _rows(harmful, "harmful residuals")
    if G.shape[1] != B.shape[1]:
        raise ToolkitError(f"residual widths differ: {G.shape[1]} and {B.shape[1]}")
    if len(G) < 2 or len(B) < 2:
        raise ToolkitError("the geometry table needs at least two prompts on each side")
    g, b = G.mean(0), B.mean(0)
    gm, bm = geometric_median(G), geometric_median(B)
    if medians is not None:
        medians += [gm, bm]
    r, rm = b - g, bm - gm
    out = {"cos_g_b": _cos(g, b), "cos_gm_bm": _cos(gm, bm), "cos_g_r": _cos(g, r), "cos_gm_rm": _cos(gm, rm),
           "cos_b_r": _cos(b, r), "cos_bm_rm": _cos(bm, rm)}
    for k, v in (("g", g), ("gm", gm), ("b", b), ("bm", bm), ("r", r), ("rm", rm)):
        out[f"norm_{k}"] = float(v.norm())
    out["silhouette"] = silhouette_two(G, B) if silhouette else float("nan")
    return out


def silhouette(x, groups) -> float:
    """Mean silhouette coefficient of points ``[n, d]`` labelled by ``groups`` ``[n]`` (Rousseeuw 1987;
    scikit-learn ``silhouette_score``, Euclidean): the mean over points of ``(b - a) / max(a, b)`` with ``a`` the
    mean distance to the point's own group and ``b`` to the nearest other group.

    In [-1, 1]; near 1 for well-separated groups, near 0 for overlapping ones. NaN where it is undefined: fewer
    than two groups, not fewer groups than points, or all points identical.
    """
    from sklearn.metrics import silhouette_score

    a = _as64(x).numpy()
    g = np.asarray(groups)
    k = len(np.unique(g))
    if k < 2 or k >= len(a) or np.ptp(a, axis=0).max() == 0:
        return float("nan")
    return float(silhouette_score(a, g, metric="euclidean"))


def silhouette_two(a, b) -> float:
    """:func:`silhouette` of two point clouds ``[n_a, d]``, ``[n_b, d]`` (one group each)."""
    return silhouette(torch.cat([_as64(a), _as64(b)]), np.r_[np.zeros(len(a), int), np.ones(len(b), int)])


# --------------------------------------------------------------------------------------------------- cones
@dataclass
class ConeFigures:
    """Cone figures at one layer for ``k`` categories.

    Attributes:
        strength: ``[k]`` ``||mean_c - mean_harmless||`` (residual-stream units).
        cos: ``[k, k]`` signed cosines between category directions.
        specificity: ``[k]``.
        mean_abs_cos: mean pairwise ``|cos|``.
        dim: entropy effective rank of the ``k`` unit directions.
    """

    strength: np.ndarray
    cos: np.ndarray
    specificity: np.ndarray
    mean_abs_cos: float
    dim: float


def cone_figures(category_means, harmless_mean) -> ConeFigures:
    """OBLITERATUS's cone figures from category means ``[k, d]`` and the harmless mean ``[d]`` (k >= 2).

    Raises:
        ToolkitError: fewer than two categories, or a category mean equal to the harmless mean.
    """
    m = _rows(category_means, "category means")
    if m.shape[0] < 2:
        raise ToolkitError("a cone needs at least two categories")
    diffs = m - _as64(harmless_mean)[None]
    c = cosine_matrix(diffs)
    return ConeFigures(diffs.norm(dim=1).numpy(), c.numpy(), specificity(c).numpy(), mean_offdiag_abs(c),
                       effective_rank(diffs))


def _batched_figures(diffs: torch.Tensor) -> dict:
    """Cone figures for a batch of direction sets ``[..., k, d] ->`` dict of ``strength [..., k]``,
    ``cos [..., k, k]``, ``specificity [..., k]``, ``mean_abs_cos [...]``, ``dim [...]``.

    The effective rank uses the singular values of the stacked unit directions ``U``, computed as the square roots
    of the eigenvalues of the cosine matrix ``U U^T`` (``[k, k]`` instead of ``[k, d]``; the same numbers).

    Raises:
        ToolkitError: a zero direction.
    """
    strength = diffs.norm(dim=-1)
    if bool((strength <= 1e-12).any()):
        raise ToolkitError("cannot normalise a zero direction (a category mean equals the harmless mean)")
    u = diffs / strength[..., None]
    cos = (u @ u.transpose(-1, -2)).clamp(-1.0, 1.0)
    k = cos.shape[-1]
    off = ~torch.eye(k, dtype=torch.bool)
    mean_abs = (cos.abs() * off).sum((-1, -2)) / (k * (k - 1))
    spec = 1 - (cos.abs() * off).sum(-1) / (k - 1)
    sv = torch.linalg.eigvalsh(cos).clamp_min(0).sqrt()
    p = sv / sv.sum(-1, keepdim=True)
    dim = torch.exp(-(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1))
    return {"strength": strength.numpy(), "cos": cos.numpy(), "specificity": spec.numpy(),
            "mean_abs_cos": mean_abs.numpy(), "dim": dim.numpy()}


def _weights(groups: list[np.ndarray], n: int) -> torch.Tensor:
    """Averaging weights ``[len(groups), n]`` (float64): row ``i`` averages ``x[groups[i]]`` (repeats counted)."""
    return torch.from_numpy(np.concatenate([averaging_weights(np.asarray(idx)[None], n) for idx in groups]))


def cone_distributions(harmful, labels: Sequence, harmless, *, n_boot: int = 200, n_null: int = 200,
                       seed: int = 0, progress=None) -> dict:
    """Cone figures at every layer with bootstrap and random-split-null distributions.

    * Point estimate: categories as labelled.
    * Bootstrap: prompts resampled with replacement within each category and within the harmless set (a
      stratified bootstrap), through :func:`toolkit.stats.resampling.bootstrap`: each category's prompt indices
      and the harmless set's are separate samples of ``scipy.stats.bootstrap`` with ``paired=False``, which
      resamples each sample independently of the others, i.e. within its stratum (seeded by ``seed``; 16
      resamples per batch).
    * Null: the harmful prompts' labels permuted (groups of the same sizes drawn at random with
      ``numpy.random.default_rng(seed)``), no bootstrap; what the figures look like when the "categories" differ
      only by sampling noise (a permutation test).

    Args:
        harmful: ``[n_harmful, n_layers, d_model]`` residuals.
        labels: ``[n_harmful]`` category of each harmful prompt (every category given must have >= 2 prompts).
        harmless: ``[n_harmless, n_layers, d_model]`` residuals.
        n_boot, n_null: resamples (0 to skip).
        progress: optional callable ``progress(n)`` advanced once per resample.

    Returns:
        ``{"categories": [k], "sizes": [k], "point": {figure: array}, "boot": {...}, "null": {...}}`` where the
        point arrays are ``strength [L, k]``, ``specificity [L, k]``, ``mean_abs_cos [L]``, ``dim [L]``,
        ``cos [L, k, k]`` and the resampled ones have a leading ``[R]`` axis (empty dict when R = 0).

    Raises:
        ToolkitError: fewer than two categories, a category with fewer than two prompts, fewer than two harmless
            prompts with ``n_boot > 0``, mismatched shapes, or a layer where a category's mean equals the harmless
            mean.
    """
    H, G = _as64(harmful), _as64(harmless)
    if H.ndim != 3 or G.ndim != 3 or H.shape[1:] != G.shape[1:]:
        raise ToolkitError(f"residual shapes do not match: {tuple(H.shape)} and {tuple(G.shape)}")
    labels = np.asarray([str(x) for x in labels])
    if len(labels) != H.shape[0]:
        raise ToolkitError(f"{len(labels)} labels for {H.shape[0]} harmful prompts")
    cats = sorted(set(labels))
    if len(cats) < 2:
        raise ToolkitError("a cone needs at least two categories")
    groups = [np.flatnonzero(labels == c) for c in cats]
    small = [c for c, g in zip(cats, groups) if len(g) < 2]
    if small:
        raise ToolkitError(f"categories with fewer than two prompts: {', '.join(small)}")
    n_h, n_layers, d = H.shape
    n_g = G.shape[0]
    if n_boot > 0 and n_g < 2:
        raise ToolkitError(f"the bootstrap needs at least two harmless prompts, got {n_g}")
    Hf, Gf = H.reshape(n_h, -1), G.reshape(n_g, -1)
    sizes = [len(g) for g in groups]

    def figures(w_h: torch.Tensor, g_mean: torch.Tensor) -> dict:
        """``w_h [R, k, n_h]`` averaging weights, ``g_mean [R, L*d]`` -> figures with a leading R axis."""
        means = (w_h @ Hf).reshape(w_h.shape[0], len(cats), n_layers, d)
        diffs = (means - g_mean.reshape(-1, 1, n_layers, d)).transpose(1, 2)  # [R, L, k, d]
        return _batched_figures(diffs)

    point = {k: v[0] for k, v in figures(_weights(groups, n_h)[None], Gf.mean(0)[None]).items()}
    names = list(point)

    def boot_statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        """Resampled harmful-prompt indices per category ``[batch, n_c]`` and harmless indices ``[batch, n_g]`` ->
        every figure flattened, ``[n_figures, batch]``."""
        *cat_idx, g_idx = resampled
        b = g_idx.shape[0]
        w_h = np.stack([averaging_weights(idx, n_h) for idx in cat_idx], axis=1)  # [batch, k, n_h]
        f = figures(torch.from_numpy(w_h), torch.from_numpy(averaging_weights(g_idx, n_g)) @ Gf)
        return np.concatenate([f[k].reshape(b, -1) for k in names], axis=1).T

    boot = {}
    if n_boot > 0:
        dist = bootstrap((*groups, np.arange(n_g)), boot_statistic, n_resamples=n_boot, seed=seed,
                         vectorized=True, batch=16, progress=progress).distribution  # [n_figures, n_boot]
        start = 0
        for k in names:
            size = int(np.prod(point[k].shape))
            boot[k] = dist[start:start + size].T.reshape(n_boot, *point[k].shape)
            start += size

    rng = np.random.default_rng(seed)
    g_mean = Gf.mean(0)
    cuts = np.cumsum([0] + sizes)
    null_parts, chunk = [], 16
    for s in range(0, n_null, chunk):
        m = min(chunk, n_null - s)
        perms = [rng.permutation(n_h) for _ in range(m)]
        w = torch.stack([_weights([p[cuts[i]:cuts[i + 1]] for i in range(len(sizes))], n_h) for p in perms])
        null_parts.append(figures(w, g_mean[None].expand(m, -1)))
        if progress:
            progress(m)
    null = {k: np.concatenate([p[k] for p in null_parts]) for k in null_parts[0]} if null_parts else {}
    return {"categories": cats, "sizes": sizes, "point": point, "boot": boot, "null": null}


def permutation_p(point: np.ndarray, null: np.ndarray, *, lower: bool) -> np.ndarray:
    """One-sided permutation p-value ``(1 + #{null as or more extreme}) / (1 + R)`` along axis 0 of ``null``;
    ``lower=True`` asks whether the point is below the null (e.g. categories less aligned than random groups)."""
    more = (null <= point) if lower else (null >= point)
    return (1 + more.sum(0)) / (1 + len(null))


def cone_label(cos_ci: tuple[float, float], dim_ci: tuple[float, float], p_cos: float, p_dim: float,
               null_poly: float, alpha: float = 0.05) -> tuple[str, str]:
    """Label one layer's cone, and say why.

    * ``linear``: the whole 95 % interval of mean ``|cos|`` is above 0.9 and that of the dimensionality below 1.5
      (OBLITERATUS's thresholds applied to interval bounds instead of point estimates).
    * ``indistinguishable from random groups``: neither figure differs from the random-split null (one-sided
      permutation p >= ``alpha`` for "mean |cos| lower" and for "dimensionality higher"). Random groups share one
      expected direction, so this null is "one direction plus sampling noise".
    * ``polyhedral``: differs from that null and the interval of mean ``|cos|`` lies below 0.8 or that of the
      dimensionality above 2. The threshold alone is not evidence: the reason names how often random groups
      meet it too (noise makes few-prompt directions look many-dimensional).
    * ``unlabelled``: differs from the null but meets neither rule.

    Args:
        cos_ci, dim_ci: bootstrap intervals (low, high) of mean |cos| and dimensionality.
        p_cos, p_dim: permutation p-values (:func:`permutation_p`).
        null_poly: share of null draws whose point figures meet the polyhedral rule.

    Returns:
        (label, reason).
    """
    if cos_ci[0] > LINEAR_MIN_COS and dim_ci[1] < LINEAR_MAX_DIM:
        return "linear", f"mean |cos| CI > {LINEAR_MIN_COS} and dimensionality CI < {LINEAR_MAX_DIM}"
    if p_cos >= alpha and p_dim >= alpha:
        return "indistinguishable from random groups", f"permutation p = {p_cos:.3g} (|cos|), {p_dim:.3g} (dim)"
    if cos_ci[1] < POLY_MAX_COS or dim_ci[0] > POLY_MIN_DIM:
        return "polyhedral", (f"permutation p = {p_cos:.3g} (|cos|), {p_dim:.3g} (dim); mean |cos| CI < "
                              f"{POLY_MAX_COS} or dimensionality CI > {POLY_MIN_DIM} (random groups meet that rule "
                              f"in {null_poly:.0%} of draws)")
    return "unlabelled", "differs from random groups but meets neither threshold"


def polyhedral_share(mean_abs_cos: np.ndarray, dim: np.ndarray) -> np.ndarray:
    """Share of draws (axis 0) whose point figures meet OBLITERATUS's polyhedral rule (|cos| < 0.8 or dim > 2)."""
    return ((mean_abs_cos < POLY_MAX_COS) | (dim > POLY_MIN_DIM)).mean(0)


def kmeans_scan(x, labels: Sequence, ks: Sequence[int], seed: int = 0, n_init: int = 4) -> list[dict]:
    """k-means (scikit-learn, ``n_init`` restarts) of points ``[n, d]`` for each ``k``: silhouette and adjusted Rand index
    against ``labels`` (ARI 0 = chance agreement, 1 = the clusters are the labels).

    Returns:
        one dict per k: ``k``, ``silhouette``, ``ari``, ``inertia``.

    Raises:
        ToolkitError: a k below 2 or not below the number of points.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    X = _as64(x).numpy()
    out = []
    for k in ks:
        if not 2 <= k < len(X):
            raise ToolkitError(f"k-means needs 2 <= k < {len(X)} points, got k = {k}")
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(X)
        out.append({"k": int(k), "silhouette": float(silhouette_score(X, km.labels_)),
                    "ari": float(adjusted_rand_score(list(labels), km.labels_)), "inertia": float(km.inertia_)})
    return out
