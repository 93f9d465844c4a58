"""The toolkit's one bootstrap: a thin wrapper over ``scipy.stats.bootstrap``, and its intervals.

Every resampling interval in the toolkit comes from :func:`bootstrap`: the ED50 and therapeutic-index intervals
(:mod:`toolkit.stats.dose`, a cluster bootstrap over prompts), the normalised patching effect
(:func:`toolkit.patching.normalised_effect`, pairs resampled together) and the concept-cone figures
(:func:`toolkit.geometry.cone_distributions`, prompts resampled within each category and within the harmless
set). The resamples are drawn by scipy (Efron & Tibshirani 1993; ``scipy.stats.bootstrap``); the intervals are
taken from the returned distribution by :func:`percentile_interval`, which also copes with resamples whose
statistic is undefined (NaN) or unbounded (+-inf), where scipy's own interval would be NaN.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ToolkitError


@dataclass
class Bootstrap:
    """A bootstrap distribution and its percentile interval.

    Attributes:
        distribution: ``[..., n_resamples]`` float64, the statistic on each resample (the statistic's own shape
            first, the resamples on the last axis, as ``scipy.stats.bootstrap`` returns it); may hold NaN and
            +-inf where the statistic does.
        low, high: the percentile interval per statistic entry (:func:`percentile_interval` along the last axis),
            shape ``[...]`` (a float for a scalar statistic).
    """

    distribution: np.ndarray
    low: np.ndarray | float
    high: np.ndarray | float


def bootstrap(data: Sequence, statistic: Callable, *, n_resamples: int, seed: int, confidence: float = 0.95,
              paired: bool = False, vectorized: bool = False, batch: int | None = None,
              progress: Callable[[int], object] | None = None) -> Bootstrap:
    """Resample with replacement through ``scipy.stats.bootstrap`` (percentile method), seeded by an int.

    ``scipy.stats.bootstrap`` draws, for each batch of resamples and each sample in ``data`` in turn,
    ``rng.integers(0, n, (batch, n))`` indices from ``numpy.random.default_rng(seed)`` (one generator for the
    whole call), so a given ``seed``, ``n_resamples``, ``batch`` and data sizes always give the same resamples.
    With several samples and ``paired=False`` each sample is resampled independently of the others: passing
    the index arrays of the strata (e.g. ``np.arange(n)`` per group) gives a stratified bootstrap. With
    ``paired=True`` one set of indices is drawn and applied to every sample (pairs stay together).

    Args:
        data: samples, each resampled along its last axis (at least 2 observations each; scipy refuses fewer).
            Passing index arrays (``np.arange(n)``) and looking the observations up in ``statistic`` resamples
            anything indexable by unit (prompts, pairs).
        statistic: ``statistic(*resamples)`` -> a float or an array (``vectorized=False``: one resample at a
            time, each sample 1-D), or ``statistic(*resamples, axis=-1)`` -> ``[..., batch]`` for resamples of
            shape ``[..., batch, n]`` (``vectorized=True``).
        n_resamples: number of resamples (>= 1).
        seed: seed of ``numpy.random.default_rng``.
        confidence: interval level in (0, 1).
        paired: resample the samples together (same indices) instead of independently.
        vectorized: ``statistic`` takes a batch of resamples (see above).
        batch: resamples per call of a vectorized statistic (bounds memory; None: all at once).
        progress: optional ``progress(n)`` called after every ``n`` resamples computed.

    Returns:
        A :class:`Bootstrap`: the distribution ``[..., n_resamples]`` and its percentile interval.

    Raises:
        ToolkitError: ``n_resamples < 1`` or a confidence outside (0, 1).
    """
    from scipy import stats as st

    if n_resamples < 1:
        raise ToolkitError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ToolkitError(f"confidence must lie in (0, 1), got {confidence}")
    if progress is None:
        fn = statistic
    elif vectorized:
        def fn(*resamples, axis=-1):
            out = statistic(*resamples, axis=axis)
            progress(int(np.shape(resamples[0])[-2]))
            return out
    else:
        def fn(*resamples):
            out = statistic(*resamples)
            progress(1)
            return out
    rng = np.random.default_rng(seed)
    seeding = {"rng": rng} if "rng" in inspect.signature(st.bootstrap).parameters else {"random_state": rng}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # scipy warns on degenerate (NaN/inf) distributions; handled below
        res = st.bootstrap(tuple(data), fn, n_resamples=n_resamples, batch=batch, vectorized=vectorized,
                           paired=paired, confidence_level=confidence, method="percentile", **seeding)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    low, high = percentile_interval(dist, confidence, axis=-1)
    return Bootstrap(dist, low, high)


def averaging_weights(idx, n: int) -> np.ndarray:
    """Averaging weights of resampled indices: ``idx [batch, m]`` (values in ``[0, n)``) -> ``[batch, n]``
    float64 where row ``b`` holds ``count / m`` for each index drawn in resample ``b``, so ``weights @ x`` is the
    mean of each resample of ``x [n, ...]`` (one matrix product for all resamples instead of a gather)."""
    idx = np.asarray(idx)
    w = np.zeros((idx.shape[0], n))
    np.add.at(w, (np.arange(idx.shape[0])[:, None], idx), 1.0 / idx.shape[1])
    return w


def percentile_interval(samples, confidence: float = 0.95, axis: int = 0):
    """Percentile interval of a bootstrap (or null) distribution along ``axis``.

    ``[..., R, ...] -> (low [...], high [...])``; ``(None, None)`` when there are no samples. Along a slice of
    finite values the end points are numpy's linear quantiles at ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2``, the same as ``scipy.stats.bootstrap``'s percentile interval. A slice holding NaN
    (resamples where the statistic is undefined) or +-inf (e.g. an ED50 beyond the dose grid) has its NaN
    dropped and its end points taken as the bracketing order statistics (numpy quantile method "lower" for the
    low end, "higher" for the high end), which never interpolate into an infinity and are slightly
    conservative; a slice of NaN only gives NaN.
    """
    if samples is None:
        return None, None
    s = np.asarray(samples, dtype=float)
    if s.ndim == 0 or s.shape[axis] == 0:
        return None, None
    s = np.moveaxis(s, axis, -1)
    a = (1 - confidence) / 2
    with np.errstate(all="ignore"):
        low = np.array(np.quantile(s, a, axis=-1), dtype=float)
        high = np.array(np.quantile(s, 1 - a, axis=-1), dtype=float)
    for idx in np.argwhere(~np.isfinite(s).all(-1)):
        v = s[tuple(idx)]
        keep = v[~np.isnan(v)]
        if keep.size == 0:
            low[tuple(idx)] = high[tuple(idx)] = np.nan
        else:
            low[tuple(idx)] = np.quantile(keep, a, method="lower")
            high[tuple(idx)] = np.quantile(keep, 1 - a, method="higher")
    return low[()], high[()]


def basic_interval(point, samples, confidence: float = 0.95, axis: int = 0):
    """Basic (reverse-percentile) bootstrap interval ``[2 t - q_hi, 2 t - q_lo]`` (Davison & Hinkley 1997, 5.2).

    ``point`` is the estimate ``t`` on the original data (shape ``[...]``), ``samples`` its bootstrap
    distribution with the resamples along ``axis``; ``q_lo``, ``q_hi`` are :func:`percentile_interval`'s end
    points. Used for cone figures because noise in category means biases cosines down and effective rank up,
    and the bootstrap adds that bias once more: percentile intervals then sit beside the point estimate, the
    basic interval corrects the bias to first order. ``(None, None)`` without samples.
    """
    lo, hi = percentile_interval(samples, confidence, axis)
    if lo is None:
        return None, None
    return 2 * point - hi, 2 * point - lo
