"""Hypothesis tests and effect sizes: paired and Welch t-tests with Cohen's d / d_z, the exact McNemar test,
multiple-comparison adjustment (Holm, Benjamini-Hochberg) and the random-direction control of a steering effect
(wrapping scipy/statsmodels; no hand-written test statistics)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from ..errors import ToolkitError
from .checks import _flags, _values


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of ``a - b`` (``scipy.stats.ttest_rel``), with its 95 % interval and effect size d_z.

    Args:
        a, b: paired measurements, shape ``[n_pairs]`` each, same order (pair ``i`` is ``(a[i], b[i])``).

    Returns:
        ``test`` ("paired t-test"), ``n_pairs``, ``mean_a``, ``mean_b``, ``mean_diff`` (mean of ``a - b``),
        ``ci_low``/``ci_high`` (95 % t interval of the mean difference, scipy's ``confidence_interval()``),
        ``statistic`` (t), ``df``, ``p_value`` (two-sided), ``effect_size_name`` ("d_z") and ``effect_size``:
        d_z = mean(a - b) / sd(a - b, ddof=1) (Cohen 1988; Lakens 2013, "Calculating and reporting effect
        sizes"), NaN when every difference is equal (sd 0).

    Raises:
        ToolkitError: fewer than 2 pairs, different lengths, or non-finite values.
    """
    from scipy import stats as st

    a, b = _values(a, "paired t-test, a"), _values(b, "paired t-test, b")
    if len(a) != len(b):
        raise ToolkitError(f"paired t-test needs equal lengths, got {len(a)} and {len(b)} values")
    if len(a) < 2:
        raise ToolkitError(f"paired t-test needs at least 2 pairs, got {len(a)}")
    d = a - b
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.ttest_rel(a, b)
        ci = res.confidence_interval(0.95)
    sd = float(d.std(ddof=1))
    return {"test": "paired t-test", "n_pairs": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": float(d.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "statistic": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue),
            "effect_size_name": "d_z", "effect_size": float(d.mean() / sd) if sd > 0 else float("nan")}


def welch_ttest(a: Sequence[float], b: Sequence[float]) -> dict:
    """Welch's unequal-variance t-test (``scipy.stats.ttest_ind(equal_var=False)``) with Cohen's d.

    Args:
        a, b: independent samples, shapes ``[n_a]`` and ``[n_b]``.

    Returns:
        ``test`` ("Welch t-test"), ``n_a``, ``n_b``, ``mean_a``, ``mean_b``, ``mean_diff`` (``mean_a - mean_b``),
        ``ci_low``/``ci_high`` (95 % Welch interval of the difference, scipy's ``confidence_interval()``),
        ``statistic`` (t), ``df`` (Welch-Satterthwaite), ``p_value`` (two-sided), ``effect_size_name``
        ("cohen_d") and ``effect_size``: (mean_a - mean_b) / pooled SD, pooled SD =
        sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)) (Cohen 1988); NaN when the pooled SD is 0.

    Raises:
        ToolkitError: fewer than 2 values on a side or non-finite values.
    """
    from scipy import stats as st

    a, b = _values(a, "Welch t-test, a"), _values(b, "Welch t-test, b")
    if len(a) < 2 or len(b) < 2:
        raise ToolkitError(f"Welch t-test needs at least 2 values per side, got {len(a)} and {len(b)}")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = st.ttest_ind(a, b, equal_var=False)
        ci = res.confidence_interval(0.95)
    na, nb = len(a), len(b)
    diff = float(a.mean() - b.mean())
    return {"test": "Welch t-test", "n_a": na, "n_b": nb, "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": diff, "ci_low": float(ci.low), "ci_high": float(ci.high),
            "statistic": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue),
            "effect_size_name": "cohen_d", "effect_size": float(cohen_d(a, b))}


def cohen_d(a, b, axis: int = 0):
    """Cohen's d of two independent samples: ``(mean_a - mean_b) / pooled SD`` along ``axis``.

    Pooled SD = sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)) with ``ddof=1`` variances
    (Cohen 1988, "Statistical power analysis for the behavioral sciences", 2nd ed., eq. 2.5.2; Lakens 2013).

    Args:
        a, b: float arrays ``[n_a, ...]`` and ``[n_b, ...]`` (samples along ``axis``; the other axes must
            broadcast), computed in float64; both samples need at least 2 values.
        axis: the sample axis.

    Returns:
        d, shape of the non-sample axes (a numpy float for 1-D samples); NaN where the pooled SD is 0.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = a.shape[axis], b.shape[axis]
    pooled = np.sqrt(((na - 1) * a.var(axis=axis, ddof=1) + (nb - 1) * b.var(axis=axis, ddof=1)) / (na + nb - 2))
    diff = a.mean(axis=axis) - b.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pooled > 0, diff / np.where(pooled > 0, pooled, 1.0), np.nan)[()]


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test for paired booleans (``statsmodels.stats.contingency_tables.mcnemar(exact=True)``).

    The exact test is a two-sided binomial test of the discordant pairs against 1/2 (McNemar 1947; exact form
    e.g. Fagerland, Lydersen & Laake 2013).

    Args:
        a, b: paired booleans (e.g. refusal under conditions A and B), shape ``[n_pairs]`` each.

    Returns:
        ``test`` ("exact McNemar test"), ``n_pairs``, ``rate_a``, ``rate_b`` (proportions True),
        ``b01`` (pairs with ``a`` False and ``b`` True), ``b10`` (pairs with ``a`` True and ``b`` False),
        ``statistic`` (``min(b01, b10)``, statsmodels' exact statistic) and ``p_value`` (1 when there are no
        discordant pairs).

    Raises:
        ToolkitError: no pairs, different lengths, or values other than booleans / 0 / 1.
    """
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = _flags(a, "McNemar test, a"), _flags(b, "McNemar test, b")
    if len(a) != len(b):
        raise ToolkitError(f"McNemar test needs equal lengths, got {len(a)} and {len(b)} values")
    if len(a) == 0:
        raise ToolkitError("McNemar test needs at least 1 pair, got 0")
    n00, n01 = int(np.sum(~a & ~b)), int(np.sum(~a & b))
    n10, n11 = int(np.sum(a & ~b)), int(np.sum(a & b))
    res = mcnemar(np.array([[n00, n01], [n10, n11]]), exact=True)
    return {"test": "exact McNemar test", "n_pairs": len(a), "rate_a": float(a.mean()), "rate_b": float(b.mean()),
            "b01": n01, "b10": n10, "statistic": float(res.statistic), "p_value": float(res.pvalue)}


CORRECTIONS = {"holm": ("holm", "Holm"), "bh": ("fdr_bh", "Benjamini-Hochberg"), "none": (None, "none")}


def adjust_pvalues(p: Sequence[float], method: str) -> tuple[np.ndarray, str]:
    """Multiple-comparison adjustment (``statsmodels.stats.multitest.multipletests``).

    Args:
        p: p-values, shape ``[m]``; NaN entries (tests that could not be run) pass through as NaN and are not
            counted in the correction.
        method: "holm" (Holm 1979 step-down, family-wise error), "bh" (Benjamini & Hochberg 1995, false discovery
            rate) or "none".

    Returns:
        (adjusted p-values, shape ``[m]``; display name of the method: "Holm", "Benjamini-Hochberg" or "none").

    Raises:
        ToolkitError: unknown method, or p-values outside [0, 1].
    """
    from statsmodels.stats.multitest import multipletests

    if method not in CORRECTIONS:
        raise ToolkitError(f"unknown correction {method!r}: use one of {', '.join(CORRECTIONS)}")
    sm_method, display = CORRECTIONS[method]
    v = np.asarray(p, dtype=float).reshape(-1)
    ok = ~np.isnan(v)
    if ((v[ok] < 0) | (v[ok] > 1)).any():
        raise ToolkitError("p-values must lie in [0, 1]")
    out = v.copy()
    if sm_method is not None and ok.any():
        out[ok] = multipletests(v[ok], method=sm_method)[1]
    return out, display


def random_control(learned: float, randoms: Sequence[float]) -> dict:
    """Where a learned direction's effect falls among the effects of random (control) directions.

    Args:
        learned: the learned direction's effect (e.g. change in mean refusal score at one steering strength).
        randoms: the same effect for each random direction, shape ``[n_random]``.

    Returns:
        ``n_random``; ``random_mean``; ``band_low``/``band_high``: the 2.5th and 97.5th percentiles of the random
        effects (numpy, linear interpolation); ``percentile``: percentile rank (0-100) of ``learned`` among
        them (``scipy.stats.percentileofscore(kind="mean")``); ``p_value``: two-sided empirical p
        (1 + #{|r| >= |learned|}) / (n_random + 1), which counts the observed effect as one of the draws so it
        is never zero (Phipson & Smyth 2010, "Permutation p-values should never be zero"), so it cannot go
        below ``1 / (n_random + 1)``; ``t``, ``p_parametric``: a two-sided prediction-interval t test of whether
        ``learned`` could be one more draw from a normal distribution fitted to the random effects,
        ``t = (learned - mean) / (sd * sqrt(1 + 1/n))`` with ``n - 1`` degrees of freedom (scipy's t
        distribution; NaN with fewer than 2 random effects or zero spread), which can resolve small p-values
        that a few random directions cannot, at the price of the normality assumption; ``exceeds_band``:
        ``learned`` lies outside [band_low, band_high]. With a NaN ``learned`` every derived value is NaN and
        ``exceeds_band`` is False.

    Raises:
        ToolkitError: no random effects, or non-finite random effects.
    """
    from scipy import stats as st

    r = np.asarray(randoms, dtype=float).reshape(-1)
    if len(r) < 1:
        raise ToolkitError("random control needs at least 1 random direction, got 0")
    if not np.isfinite(r).all():
        raise ToolkitError("random control: random-direction effects must be finite")
    lo, hi = (float(q) for q in np.percentile(r, [2.5, 97.5]))
    x = float(learned)
    if np.isnan(x):
        pct = p = float("nan")
        exceeds = False
    else:
        pct = float(st.percentileofscore(r, x, kind="mean"))
        p = (1 + int(np.sum(np.abs(r) >= abs(x)))) / (len(r) + 1)
        exceeds = bool(x < lo or x > hi)
    t = p_t = float("nan")
    sd = float(r.std(ddof=1)) if len(r) > 1 else 0.0
    if not np.isnan(x) and sd > 0:
        t = (x - float(r.mean())) / (sd * np.sqrt(1 + 1 / len(r)))
        p_t = float(2 * st.t.sf(abs(t), len(r) - 1))
    return {"n_random": len(r), "random_mean": float(r.mean()), "band_low": lo, "band_high": hi,
            "percentile": pct, "p_value": p, "t": float(t), "p_parametric": p_t, "exceeds_band": exceeds}
