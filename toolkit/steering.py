"""Activation steering with controls: alpha grids, scales, random directions, holdout splits (positions: see
:mod:`toolkit.index_spec`; summaries of sweeps: :mod:`toolkit.steering_summary`).

Steering is activation addition (:func:`toolkit.interventions.activation_addition`):
``x <- x + alpha * s * r_hat`` at one site of the chosen layers, where ``r_hat`` is a unit direction and
``s`` a documented scale (:func:`scale_value`) that makes alphas comparable across layers and models.

Controls (the Refusal Dial's and OBLITERATUS's protocols, see ``REFERENCE.md``):

* holdout: a prompt set is split by a hash of each prompt id and a seed (:func:`hash_split`); a direction is
  learned on one half only and evaluated on both halves and on other sets;
* random directions: unit Gaussian directions, each seeded by ``(seed, kind, index)``
  (:func:`random_directions`), steered with the same layer, site, positions, scale and alphas;
* orthogonal random directions: the same, with the learned direction projected out before normalising.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from .errors import ToolkitError

MAX_ALPHAS = 201
SCALES = ("unit", "raw", "resid")


def parse_alphas(spec: str) -> list[float]:
    """Parse an alpha grid: ``"start:stop:step"`` (both ends included) or a comma list ``"-4,-2,0,2,4"``.

    Returns:
        Sorted, distinct alphas (at most :data:`MAX_ALPHAS`), rounded to 10 decimals.

    Raises:
        ToolkitError (param ``alpha``): not numbers, non-finite values, a zero step, a step of the wrong sign, a
            step that does not divide ``stop - start``, duplicates, or too many points.
    """
    text = (spec or "").strip()
    if not text:
        raise ToolkitError("empty grid", param="alpha")
    try:
        if ":" in text:
            parts = [float(x) for x in text.split(":")]
            if len(parts) != 3:
                raise ToolkitError(f"range must be start:stop:step, got {spec!r}", param="alpha")
            a, b, step = parts
            if not all(math.isfinite(x) for x in parts):
                raise ToolkitError(f"values must be finite, got {spec!r}", param="alpha")
            if step == 0:
                raise ToolkitError("step must not be 0", param="alpha")
            if (b - a) * step < 0:
                raise ToolkitError(f"step {step:g} goes away from stop {b:g} (start {a:g})", param="alpha")
            n = (b - a) / step
            if abs(n - round(n)) > 1e-6:
                raise ToolkitError(f"step {step:g} does not divide the range {a:g}..{b:g}", param="alpha")
            if round(n) + 1 > MAX_ALPHAS:
                raise ToolkitError(f"grid has {round(n) + 1} points; at most {MAX_ALPHAS}", param="alpha")
            vals = [a + i * step for i in range(round(n) + 1)]
        else:
            vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ToolkitError(f"must be numbers like '-4:4:1' or '-2,0,2', got {spec!r}", param="alpha") from None
    if not vals:
        raise ToolkitError("empty grid", param="alpha")
    if not all(math.isfinite(v) for v in vals):
        raise ToolkitError(f"values must be finite, got {spec!r}", param="alpha")
    vals = [round(v, 10) + 0.0 for v in vals]
    if len(set(vals)) != len(vals):
        raise ToolkitError(f"has repeated values: {spec!r}", param="alpha")
    if len(vals) > MAX_ALPHAS:
        raise ToolkitError(f"grid has {len(vals)} points; at most {MAX_ALPHAS}", param="alpha")
    return sorted(vals)


def _seed_int(*parts) -> int:
    """A 63-bit integer from a stable hash of ``parts`` (independent of Python's hash randomisation)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def direction_seed(seed: int, kind: str, index: int) -> int:
    """The generator seed of random direction ``index`` of ``kind`` (``random``/``orthogonal``) for run ``seed``.

    Direction ``i`` does not depend on how many directions are drawn, so ``--random 20`` extends ``--random 5``.
    """
    return _seed_int("direction", seed, kind, index)


def random_directions(n: int, d_model: int, seed: int, orthogonal_to: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[int]]:
    """``n`` random unit directions ``[n, d_model]`` float32 and their generator seeds.

    Each is a standard Gaussian vector (float64, ``torch.Generator`` seeded by :func:`direction_seed`),
    normalised; with ``orthogonal_to`` (``[d_model]``) its component along that direction is removed first, so
    ``|cos| < 1e-6`` with it.

    Raises:
        ToolkitError: ``n < 0`` or ``orthogonal_to`` of the wrong width or zero.
    """
    if n < 0:
        raise ToolkitError(f"number of random directions must be >= 0, got {n}")
    kind = "random" if orthogonal_to is None else "orthogonal"
    r = None
    if orthogonal_to is not None:
        if orthogonal_to.shape != (d_model,) or float(orthogonal_to.double().norm()) == 0:
            raise ToolkitError("orthogonal_to must be a non-zero [d_model] direction")
        r = orthogonal_to.double() / orthogonal_to.double().norm()
    out, seeds = torch.zeros(n, d_model, dtype=torch.float32), []
    for i in range(n):
        s = direction_seed(seed, kind, i)
        g = torch.randn(d_model, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        if r is not None:
            g = g - (g @ r) * r
        out[i] = (g / g.norm()).float()
        seeds.append(s)
    return out, seeds


def hash_split(ids: Sequence[str], seed: int, frac: float = 0.5) -> np.ndarray:
    """Assign prompts to a training part by a hash of ``(seed, id)``: ``[n]`` bool, True = train.

    A prompt is in the training part when ``sha256(f"split:{seed}:{id}")`` read as a fraction of 2**63 is below
    ``frac``. Membership depends only on the id and the seed: stable across runs, file order and added
    prompts; the two parts are disjoint by construction. The parts are about, not exactly, ``frac`` and
    ``1 - frac`` of the set (the Refusal Dial splits 50/50 by hash).

    Raises:
        ToolkitError: ``frac`` outside (0, 1) or repeated ids.
    """
    if not 0 < frac < 1:
        raise ToolkitError(f"split fraction must be in (0, 1), got {frac}")
    if len(set(ids)) != len(ids):
        raise ToolkitError("prompt ids must be unique to split by id")
    return np.array([_seed_int("split", seed, i) / 2**63 < frac for i in ids], dtype=bool)


def dial_direction(acts: torch.Tensor, scores: np.ndarray, k: int, method: str = "diff-means", seed: int = 0
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Refusal Dial direction: mean activation of the ``k`` highest-scoring prompts minus that of the ``k`` lowest
    (``method="diff-means"``), or another two-group estimator of :mod:`toolkit.estimators` on the same two groups
    (``geometric-median``, ``pca``, ``probe``: :data:`toolkit.estimators.GROUP_METHODS`, in their common scale
    convention).

    Args:
        acts: ``[n, d_model]`` activations (e.g. ``resid_pre`` at one layer, last position).
        scores: ``[n]`` refusal scores of the same prompts at baseline.
        k: prompts per side.
        method: the estimator; seed: the probe's cross-validation seed.

    Returns:
        (raw direction ``[d_model]`` float64, indices of the top ``k``, indices of the bottom ``k``). Ties are
        broken by prompt order (stable sort).

    Raises:
        ToolkitError: ``k < 1``, ``2k > n``, mismatched lengths, or a method outside ``GROUP_METHODS``.
    """
    from .estimators import GROUP_METHODS, check_method, estimate

    check_method(method, GROUP_METHODS)
    n = acts.shape[0]
    if len(scores) != n:
        raise ToolkitError(f"{len(scores)} scores for {n} activations")
    if k < 1 or 2 * k > n:
        raise ToolkitError(f"top-k/bottom-k needs 1 <= k <= n/2; got k = {k} with {n} training prompts")
    order = np.argsort(-np.asarray(scores, dtype=float), kind="stable")
    top, bottom = order[:k], order[-k:]
    if method == "diff-means":
        d = acts[torch.as_tensor(top)].double().mean(0) - acts[torch.as_tensor(bottom)].double().mean(0)
    else:
        d = estimate(method, acts[torch.as_tensor(top)], acts[torch.as_tensor(bottom)], seed=seed).directions
    return d, top, bottom


def scale_value(kind: str, raw_norm: float, resid_norm: float | None) -> float:
    """The steering scale ``s`` in ``x <- x + alpha * s * r_hat``.

    * ``unit``: ``s = 1`` (alpha in residual-stream units);
    * ``raw``: ``s = ||r||``, the direction's own norm (alpha 1 adds the raw difference-in-means, as Arditi et
      al.'s activation addition does);
    * ``resid``: ``s`` = mean L2 norm of the activation at that hook site and layer (the residual stream itself
      for ``resid_*`` sites) over the post-instruction positions of the evaluated prompts (alpha 1 adds a vector
      as long as a typical activation there), so alphas compare across layers and models.

    Raises:
        ToolkitError: unknown kind, or ``resid`` without a measured norm.
    """
    if kind == "unit":
        return 1.0
    if kind == "raw":
        return float(raw_norm)
    if kind == "resid":
        if resid_norm is None or not math.isfinite(resid_norm):
            raise ToolkitError("the resid scale needs the mean residual norm")
        return float(resid_norm)
    raise ToolkitError(f"must be one of {', '.join(SCALES)}, got {kind!r}", param="scale")


def monotone_range(alphas: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """The widest interval of consecutive alphas containing 0 (or the grid point nearest 0) on which ``values``
    never decrease: ``(alpha_lo, alpha_hi)``.

    Raises:
        ToolkitError: lengths differ or the grid is empty.
    """
    a = np.asarray(alphas, dtype=float)
    v = np.asarray(values, dtype=float)
    if len(a) != len(v) or len(a) == 0:
        raise ToolkitError("monotone_range needs equal, non-empty alphas and values")
    order = np.argsort(a)
    a, v = a[order], v[order]
    c = int(np.argmin(np.abs(a)))
    lo = c
    while lo > 0 and v[lo - 1] <= v[lo]:
        lo -= 1
    hi = c
    while hi < len(a) - 1 and v[hi + 1] >= v[hi]:
        hi += 1
    return float(a[lo]), float(a[hi])
