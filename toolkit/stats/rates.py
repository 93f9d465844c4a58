"""Rates and means with their intervals: Wilson score intervals of proportions (statsmodels) and t intervals of
means (scipy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from statsmodels.stats.proportion import proportion_confint


def rate_ci(k: int, n: int, alpha: float = 0.05) -> tuple[float, float, float]:
    """A proportion with its Wilson score interval (statsmodels ``proportion_confint(method='wilson')``).

    Returns:
        ``(k / n, low, high)``; all NaN when ``n == 0``.
    """
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    lo, hi = proportion_confint(k, n, alpha=alpha, method="wilson")
    return k / n, float(lo), float(hi)


def rate_summary(flags: Sequence[bool], alpha: float = 0.05) -> dict:
    """``{"n", "k", "rate", "ci_low", "ci_high"}`` for a list of booleans (Wilson 95 % by default)."""
    k, n = int(np.sum(flags)), len(flags)
    r, lo, hi = rate_ci(k, n, alpha)
    return {"n": n, "k": k, "rate": r, "ci_low": lo, "ci_high": hi}


def mean_summary(values: Sequence[float]) -> dict:
    """``{"n", "mean", "sd", "ci_low", "ci_high"}`` with a t-based 95 % interval of the mean (scipy)."""
    from scipy import stats as st

    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    m = float(v.mean())
    sd = float(v.std(ddof=1)) if n > 1 else float("nan")
    if n > 1 and sd > 0:
        lo, hi = st.t.interval(0.95, n - 1, loc=m, scale=sd / np.sqrt(n))
    else:
        lo = hi = m
    return {"n": n, "mean": m, "sd": sd, "ci_low": float(lo), "ci_high": float(hi)}
