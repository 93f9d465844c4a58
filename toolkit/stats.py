"""Statistics helpers (wrapping statsmodels/scipy; no hand-written formulas).

Rates and means with intervals; paired/Welch t-tests, exact McNemar and multiple-comparison adjustment;
the random-direction control of a steering effect; logistic dose-response fits with ED50, cluster-bootstrap
intervals and the therapeutic index; aggregation of one experiment over seeds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from statsmodels.stats.proportion import proportion_confint

from .errors import ToolkitError

if TYPE_CHECKING:
    import pandas as pd


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


# ------------------------------------------------------------------------------------------- comparisons
def _values(x, what: str) -> np.ndarray:
    """A 1-D float array of finite values, or ToolkitError naming ``what``."""
    try:
        v = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ToolkitError(f"{what}: values must be numbers") from None
    if v.ndim != 1:
        raise ToolkitError(f"{what}: expected a 1-D sequence of numbers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ToolkitError(f"{what}: values must be finite (drop missing values first)")
    return v


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
    pooled = float(np.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)))
    diff = float(a.mean() - b.mean())
    return {"test": "Welch t-test", "n_a": na, "n_b": nb, "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "mean_diff": diff, "ci_low": float(ci.low), "ci_high": float(ci.high),
            "statistic": float(res.statistic), "df": float(res.df), "p_value": float(res.pvalue),
            "effect_size_name": "cohen_d", "effect_size": diff / pooled if pooled > 0 else float("nan")}


def _flags(x, what: str) -> np.ndarray:
    """A 1-D bool array from booleans or 0/1 numbers, or ToolkitError naming ``what``."""
    try:
        v = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ToolkitError(f"{what}: values must be booleans") from None
    if v.ndim != 1 or not np.isin(v, (0.0, 1.0)).all():
        raise ToolkitError(f"{what}: expected a 1-D sequence of booleans (True/False or 0/1) without gaps")
    return v.astype(bool)


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


# ------------------------------------------------------------------------------------------- dose-response
@dataclass
class LogisticFit:
    """A logistic dose-response curve P(y = 1 | dose x) = expit(intercept + slope * x).

    Fitted by :func:`logistic_fit` (binomial GLM, logit link, statsmodels). ``status`` says whether the
    maximum-likelihood estimate exists: "ok"; "constant" (every response equal, nothing to fit; the parameters
    are NaN); "separation" (the doses separate the 0s from the 1s completely or quasi-completely, so the MLE
    slope is infinite and the parameters are NaN or meaningless); "failed" (the fit raised a numerical error).
    ``note`` explains any status other than "ok" and a fit that did not converge.

    Attributes:
        intercept, slope: logit-scale coefficients (slope per dose unit).
        se_intercept, se_slope: their standard errors (observed information, statsmodels ``bse``).
        cov: ``[2, 2]`` covariance of (intercept, slope).
        converged: IRLS converged.
        n: number of observations.
        note: human-readable caveat, "" when none.
        status: "ok", "constant", "separation" or "failed".
        rate: observed proportion of 1s.
        x_min, x_max: the observed dose range (:func:`ed50` refuses grids beyond it).
    """

    intercept: float
    slope: float
    se_intercept: float
    se_slope: float
    cov: np.ndarray
    converged: bool
    n: int
    note: str = ""
    status: str = "ok"
    rate: float = float("nan")
    x_min: float = float("nan")
    x_max: float = float("nan")

    def predict(self, x) -> np.ndarray:
        """Fitted probability at doses ``x`` (any shape; ``scipy.special.expit``)."""
        from scipy.special import expit

        return expit(self.intercept + self.slope * np.asarray(x, dtype=float))


def _nan_fit(n: int, status: str, note: str, rate: float, x: np.ndarray) -> LogisticFit:
    nan = float("nan")
    return LogisticFit(nan, nan, nan, nan, np.full((2, 2), nan), False, n, note, status, rate,
                       float(x.min()), float(x.max()))


def logistic_fit(x: Sequence[float], y: Sequence[bool], start_params: Sequence[float] | None = None) -> LogisticFit:
    """Fit a logistic dose-response curve by maximum likelihood.

    ``statsmodels.api.GLM(y, add_constant(x), family=Binomial())`` (logit link, IRLS). Two cases where the
    maximum-likelihood estimate does not exist are detected before fitting and returned without a fit (NaN
    parameters, never an exception): a constant response (status "constant") and complete or quasi-complete
    separation, i.e. every 0 lies at doses <= every 1 or vice versa (status "separation"; Albert & Anderson
    1984). statsmodels' own separation signal (``PerfectSeparationError`` in older releases,
    ``PerfectSeparationWarning`` in newer ones) is caught as well and also gives status "separation".

    Args:
        x: doses, shape ``[n]``.
        y: responses, booleans or 0/1, shape ``[n]``.
        start_params: optional starting (intercept, slope) for IRLS (speeds up bootstrap refits).

    Returns:
        A :class:`LogisticFit`.

    Raises:
        ToolkitError: mismatched lengths, fewer than 2 observations or 2 distinct doses, non-finite doses or
            responses other than booleans / 0 / 1.
    """
    import statsmodels.api as sm
    from statsmodels.tools import sm_exceptions

    xv = _values(x, "logistic fit, doses")
    yv = _flags(y, "logistic fit, responses")
    if len(xv) != len(yv):
        raise ToolkitError(f"logistic fit: {len(xv)} doses but {len(yv)} responses")
    n = len(xv)
    if n < 2 or len(np.unique(xv)) < 2:
        raise ToolkitError("logistic fit needs at least 2 distinct doses")
    rate = float(yv.mean())
    if rate in (0.0, 1.0):
        return _nan_fit(n, "constant", f"constant response: all {n} responses are {int(rate)}; no curve fitted",
                        rate, xv)
    x0, x1 = xv[~yv], xv[yv]
    for lo_side, hi_side, (a, b) in ((x0, x1, "01"), (x1, x0, "10")):
        if lo_side.max() <= hi_side.min():
            kind = "complete" if lo_side.max() < hi_side.min() else "quasi-complete"
            return _nan_fit(n, "separation", f"{kind} separation: every {a} at doses <= {lo_side.max():g} and "
                            f"every {b} at doses >= {hi_side.min():g}, so the maximum-likelihood slope is infinite",
                            rate, xv)
    sep_error = getattr(sm_exceptions, "PerfectSeparationError", None)
    sep_warning = getattr(sm_exceptions, "PerfectSeparationWarning", None)
    catch = tuple(e for e in (sep_error,) if e is not None)
    notes = []
    with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
        warnings.simplefilter("always")
        try:
            model = sm.GLM(yv.astype(float), sm.add_constant(xv, has_constant="add"), family=sm.families.Binomial())
            res = model.fit(start_params=None if start_params is None else np.asarray(start_params, dtype=float))
        except catch as e:  # older statsmodels raise on separation
            return _nan_fit(n, "separation", f"separation reported by statsmodels: {e}", rate, xv)
        except (np.linalg.LinAlgError, ValueError, FloatingPointError) as e:
            return _nan_fit(n, "failed", f"fit failed: {e}", rate, xv)
    status = "ok"
    if sep_warning is not None and any(issubclass(w.category, sep_warning) for w in caught):
        status = "separation"
        notes.append("statsmodels reports (near-)perfect separation; parameters may not be identified")
    converged = bool(getattr(res, "converged", True))
    if not converged:
        notes.append("IRLS did not converge")
    params, bse = np.asarray(res.params, dtype=float), np.asarray(res.bse, dtype=float)
    return LogisticFit(float(params[0]), float(params[1]), float(bse[0]), float(bse[1]),
                       np.asarray(res.cov_params(), dtype=float), converged, n, "; ".join(notes), status, rate,
                       float(xv.min()), float(xv.max()))


def _check_grid(lo: float, hi: float) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ToolkitError(f"dose grid [{lo:g}, {hi:g}] must be finite with low < high")
    return lo, hi


def _flat(fit: LogisticFit, lo: float, hi: float) -> bool:
    """The fitted logit changes by a numerically negligible amount across the grid."""
    return abs(fit.slope) * (hi - lo) <= 1e-8 * max(1.0, abs(fit.intercept))


def ed50(fit: LogisticFit, lo: float, hi: float) -> tuple[float | None, str]:
    """The dose at which the fitted rate is 50 % (``-intercept / slope``), only inside the dose grid.

    Never extrapolates: a crossing outside ``[lo, hi]`` (or a fit without one) gives ``None`` and a reason,
    e.g. "fitted rate stays below 50 % on [0, 8] (0.04 to 0.31)".

    Args:
        fit: a :class:`LogisticFit`.
        lo, hi: the dose grid (same units as the fit's doses); must lie within the observed doses.

    Returns:
        (ED50 or None, reason). Reasons for None: the fit's status ("constant", "separation", "failed"), a fit
        that did not converge, a flat curve (slope ~ 0), or a crossing outside the grid.

    Raises:
        ToolkitError: a bad grid, or a grid reaching beyond the observed doses.
    """
    lo, hi = _check_grid(lo, hi)
    tol = 1e-9 * max(1.0, abs(fit.x_min), abs(fit.x_max))
    if lo < fit.x_min - tol or hi > fit.x_max + tol:
        raise ToolkitError(f"dose grid [{lo:g}, {hi:g}] reaches beyond the observed doses "
                           f"[{fit.x_min:g}, {fit.x_max:g}]; the ED50 is never extrapolated")
    grid = f"[{lo:g}, {hi:g}]"
    if fit.status == "constant":
        side = "below" if fit.rate < 0.5 else "above"
        return None, f"rate stays {side} 50 % on {grid} ({fit.note})"
    if fit.status == "separation":
        return None, f"ED50 not identified: {fit.note}"
    if fit.status != "ok":
        return None, f"no ED50: {fit.note}"
    if not fit.converged:
        return None, f"no ED50: {fit.note}"
    if not (math.isfinite(fit.intercept) and math.isfinite(fit.slope)):
        return None, "no ED50: non-finite fitted parameters"
    p_lo, p_hi = (float(v) for v in fit.predict([lo, hi]))
    if _flat(fit, lo, hi):
        return None, f"flat: fitted slope ~0 (rate {p_lo:.2f} on {grid})"
    v = -fit.intercept / fit.slope
    if lo <= v <= hi:
        return float(v), f"fitted rate crosses 50 % at {v:.4g}, inside {grid}"
    side = "below" if p_lo < 0.5 else "above"
    return None, f"fitted rate stays {side} 50 % on {grid} ({p_lo:.2f} to {p_hi:.2f})"


def _ed50_code(fit: LogisticFit, lo: float, hi: float, increasing: bool) -> float:
    """ED50 for a bootstrap distribution: the value when the curve crosses 50 % inside [lo, hi]; NaN when not
    identified (separation, failed or non-converged fit); otherwise (crossing outside the grid, flat or constant
    curve) +inf when the rate stays below 50 % on the grid and -inf when it stays above, for a rising reference
    curve (``increasing``), mirrored for a falling one, so the codes always sort in dose order."""
    if fit.status in ("separation", "failed") or (fit.status == "ok" and not fit.converged):
        return float("nan")
    if fit.status == "ok" and not _flat(fit, lo, hi):
        v = -fit.intercept / fit.slope
        if lo <= v <= hi:
            return float(v)
    below = (fit.rate if fit.status == "constant" else float(fit.predict(lo))) < 0.5
    return float("inf") if below == increasing else float("-inf")


def _doses_and_units(doses, y, what: str) -> tuple[np.ndarray, np.ndarray]:
    d = _values(doses, f"{what}, doses")
    if len(np.unique(d)) < 2:
        raise ToolkitError(f"{what}: need at least 2 distinct doses")
    try:
        yv = np.asarray(y, dtype=float)
    except (TypeError, ValueError):
        raise ToolkitError(f"{what}: responses must be booleans") from None
    if yv.ndim != 2 or yv.shape[1] != len(d):
        raise ToolkitError(f"{what}: responses must have shape [n_units, {len(d)}] (one column per dose), "
                           f"got {yv.shape}")
    if yv.shape[0] < 2:
        raise ToolkitError(f"{what}: the bootstrap needs at least 2 units (prompts), got {yv.shape[0]}")
    if not np.isin(yv, (0.0, 1.0)).all():
        raise ToolkitError(f"{what}: responses must be booleans (True/False or 0/1) without gaps")
    return d, yv.astype(bool)


def _bootstrap(data: tuple, statistic, n_resamples: int, confidence: float, seed: int, paired: bool):
    """``scipy.stats.bootstrap`` (percentile method, non-vectorized statistic) seeded with ``seed``."""
    import inspect

    from scipy import stats as st

    if n_resamples < 1:
        raise ToolkitError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ToolkitError(f"confidence must lie in (0, 1), got {confidence}")
    seeding = ({"rng": np.random.default_rng(seed)} if "rng" in inspect.signature(st.bootstrap).parameters
               else {"random_state": np.random.default_rng(seed)})
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return st.bootstrap(data, statistic, n_resamples=n_resamples, vectorized=False, paired=paired,
                            confidence_level=confidence, method="percentile", **seeding)


def _interval(dist: np.ndarray, confidence: float, low: float, high: float) -> tuple[float, float]:
    """The percentile interval of a bootstrap distribution that may hold +-inf and NaN.

    Without infinities or NaN this is scipy's own interval (``low``, ``high``). Otherwise NaN resamples are
    dropped and the percentile points are taken as the bracketing order statistics (numpy quantile method
    "lower" for the low end, "higher" for the high end), which never interpolate into an infinity and are
    slightly conservative."""
    d = np.asarray(dist, dtype=float)
    keep = d[~np.isnan(d)]
    if keep.size == 0:
        return float("nan"), float("nan")
    if keep.size == d.size and np.isfinite(d).all():
        return float(low), float(high)
    a = (1 - confidence) / 2
    return float(np.quantile(keep, a, method="lower")), float(np.quantile(keep, 1 - a, method="higher"))


def _orientation(fit: LogisticFit, doses: np.ndarray, y: np.ndarray) -> bool:
    """Whether the reference (full-data) curve rises with dose: the fitted slope's sign, else the rate at the
    highest dose against the rate at the lowest (rising when equal)."""
    if fit.status == "ok" and math.isfinite(fit.slope) and fit.slope != 0:
        return fit.slope > 0
    return bool(y[:, np.argmax(doses)].mean() >= y[:, np.argmin(doses)].mean())


def _bootstrap_method(n_resamples: int, confidence: float, what: str) -> str:
    return (f"{confidence:.0%} percentile cluster bootstrap over {what} (scipy.stats.bootstrap, {n_resamples} "
            "resamples, each refitting the logistic GLM); resamples crossing 50 % beyond the grid count as "
            "+-inf, unidentified (separated) resamples are dropped")


def bootstrap_ed50(doses: Sequence[float], y, lo: float, hi: float, n_resamples: int = 1000, seed: int = 0,
                   confidence: float = 0.95) -> dict:
    """ED50 of a logistic dose-response curve with a cluster-bootstrap interval over units (prompts).

    The curve is fitted by :func:`logistic_fit` on every (dose, response) pair. Units are resampled with
    replacement (``scipy.stats.bootstrap`` on the unit indices, percentile method; a cluster bootstrap, Davison
    & Hinkley 1997, sec. 3.8, since a prompt's responses across doses are correlated) and the curve is refitted
    on each resample's pairs. Each resample's ED50 is coded by :func:`_ed50_code`: the value inside
    ``[lo, hi]``; +inf when the fitted rate stays below 50 % on the grid and -inf when it stays above (for a
    rising full-data curve; mirrored for a falling one, so that the codes sort in dose order); NaN when not
    identified (separation). The interval is therefore open-ended (+-inf) when enough resamples never cross
    inside the grid, instead of extrapolated.

    Args:
        doses: the dose grid, shape ``[n_doses]``.
        y: responses, booleans, shape ``[n_units, n_doses]`` (each unit observed at every dose).
        lo, hi: dose range within which an ED50 is reported (within the observed doses).
        n_resamples: bootstrap resamples.
        seed: seed of the resampling generator.
        confidence: interval level.

    Returns:
        ``ed50`` (None when the full-data curve does not cross 50 % inside the grid), ``reason`` (from
        :func:`ed50`), ``ci_low``, ``ci_high`` (may be +-inf; NaN when no resample is identified),
        ``n_resamples``, ``n_inside`` (resamples with an ED50 inside the grid), ``n_plus_inf`` and
        ``n_minus_inf`` (resamples coded +inf / -inf), ``n_undefined`` (NaN, dropped from the interval),
        ``method``.

    Raises:
        ToolkitError: bad shapes, fewer than 2 units or distinct doses, non-boolean responses, a bad grid,
            ``n_resamples < 1`` or a confidence outside (0, 1).
    """
    d, yv = _doses_and_units(doses, y, "ED50 bootstrap")
    lo, hi = _check_grid(lo, hi)
    n_units = yv.shape[0]
    full = logistic_fit(np.tile(d, n_units), yv.ravel())
    est, reason = ed50(full, lo, hi)
    increasing = _orientation(full, d, yv)
    start = [full.intercept, full.slope] if full.status == "ok" and full.converged else None

    def statistic(idx):
        idx = np.asarray(idx, dtype=int)
        f = logistic_fit(np.tile(d, len(idx)), yv[idx].ravel(), start)
        return _ed50_code(f, lo, hi, increasing)

    res = _bootstrap((np.arange(n_units),), statistic, n_resamples, confidence, seed, paired=False)
    dist = np.asarray(res.bootstrap_distribution, dtype=float).reshape(-1)
    ci_low, ci_high = _interval(dist, confidence, res.confidence_interval.low, res.confidence_interval.high)
    return {"ed50": est, "reason": reason, "ci_low": ci_low, "ci_high": ci_high, "n_resamples": int(dist.size),
            "n_inside": int(np.isfinite(dist).sum()), "n_plus_inf": int(np.sum(dist == np.inf)),
            "n_minus_inf": int(np.sum(dist == -np.inf)), "n_undefined": int(np.isnan(dist).sum()),
            "method": _bootstrap_method(n_resamples, confidence, "prompts")}


def _ratio(b: float, h: float) -> float:
    """ED50_benign / ED50_harmful when both are > 0 (+-inf allowed: inf/x = inf, x/inf = 0, inf/inf = NaN)."""
    if not (h > 0 and b > 0):
        return float("nan")
    with np.errstate(all="ignore"):
        return float(np.float64(b) / np.float64(h))


def therapeutic_index(doses: Sequence[float], y_harmful, y_benign, lo: float, hi: float, n_resamples: int = 1000,
                      seed: int = 0, confidence: float = 0.95) -> dict:
    """Therapeutic index and window of a steering dose: harmful refusal against benign over-refusal.

    TI-S = ED50(benign over-refusal) / ED50(harmful refusal), the pharmacological therapeutic index (toxic over
    effective median dose) as used for refusal steering in the OBLITERATUS / Refusal-Dial write-ups; larger is
    safer. Defined only when both ED50s exist inside the grid and are > 0, otherwise None with a reason. The
    therapeutic window is ED50_benign - ED50_harmful (dose units), defined when both ED50s exist.

    Intervals: the two prompt sets are resampled independently (``scipy.stats.bootstrap`` with two samples,
    ``paired=False``, percentile method), both curves refitted per resample. ED50s crossing beyond the grid are
    +-inf as in :func:`bootstrap_ed50`, and IEEE arithmetic carries them (e.g. a benign curve that never reaches
    50 % gives TI = +inf, window = +inf); ratios with an ED50 <= 0 or inf/inf, and unidentified fits, are NaN,
    dropped from the interval and counted.

    Args:
        doses: shape ``[n_doses]``.
        y_harmful: refusals on harmful prompts, booleans ``[n_harmful, n_doses]``.
        y_benign: refusals (over-refusals) on benign prompts, booleans ``[n_benign, n_doses]``.
        lo, hi: dose grid for the ED50s.
        n_resamples, seed, confidence: as in :func:`bootstrap_ed50`.

    Returns:
        ``ed50_harmful``, ``ed50_harmful_reason``, ``ed50_benign``, ``ed50_benign_reason``, ``ti``,
        ``ti_reason``, ``ti_ci_low``, ``ti_ci_high``, ``window``, ``window_reason``, ``window_ci_low``,
        ``window_ci_high``, ``n_resamples``, ``n_ti_defined`` and ``n_window_defined`` (resamples with a
        non-NaN value), ``method``.

    Raises:
        ToolkitError: as :func:`bootstrap_ed50`, for either prompt set.
    """
    d, yh = _doses_and_units(doses, y_harmful, "therapeutic index, harmful")
    _, yb = _doses_and_units(d, y_benign, "therapeutic index, benign")
    lo, hi = _check_grid(lo, hi)
    fits = {}
    for key, yv in (("harmful", yh), ("benign", yb)):
        f = logistic_fit(np.tile(d, yv.shape[0]), yv.ravel())
        fits[key] = (f, ed50(f, lo, hi), _orientation(f, d, yv),
                     [f.intercept, f.slope] if f.status == "ok" and f.converged else None)
    (h_est, h_reason), (b_est, b_reason) = fits["harmful"][1], fits["benign"][1]
    if h_est is None or b_est is None:
        missing = "; ".join(f"ED50 of {k} refusal undefined: {r}" for k, (e, r) in
                            (("harmful", (h_est, h_reason)), ("benign", (b_est, b_reason))) if e is None)
        ti, ti_reason, window, window_reason = None, missing, None, missing
    else:
        window, window_reason = b_est - h_est, "ED50 benign - ED50 harmful"
        if h_est > 0 and b_est > 0:
            ti, ti_reason = b_est / h_est, "ED50 benign / ED50 harmful"
        else:
            ti, ti_reason = None, (f"ratio undefined: an ED50 is <= 0 (harmful {h_est:.4g}, "
                                   f"benign {b_est:.4g})")

    def code(key, yv, idx):
        _, _, increasing, start = fits[key]
        idx = np.asarray(idx, dtype=int)
        return _ed50_code(logistic_fit(np.tile(d, len(idx)), yv[idx].ravel(), start), lo, hi, increasing)

    def statistic(ih, ib):
        h, b = code("harmful", yh, ih), code("benign", yb, ib)
        with np.errstate(all="ignore"):
            return np.array([_ratio(b, h), float(np.float64(b) - np.float64(h))])

    res = _bootstrap((np.arange(yh.shape[0]), np.arange(yb.shape[0])), statistic, n_resamples, confidence, seed,
                     paired=False)
    dist = np.asarray(res.bootstrap_distribution, dtype=float).reshape(2, -1)
    ci_lo, ci_hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    ti_ci = _interval(dist[0], confidence, ci_lo[0], ci_hi[0])
    win_ci = _interval(dist[1], confidence, ci_lo[1], ci_hi[1])
    return {"ed50_harmful": h_est, "ed50_harmful_reason": h_reason, "ed50_benign": b_est,
            "ed50_benign_reason": b_reason, "ti": ti, "ti_reason": ti_reason, "ti_ci_low": ti_ci[0],
            "ti_ci_high": ti_ci[1], "window": window, "window_reason": window_reason, "window_ci_low": win_ci[0],
            "window_ci_high": win_ci[1], "n_resamples": int(dist.shape[1]),
            "n_ti_defined": int((~np.isnan(dist[0])).sum()), "n_window_defined": int((~np.isnan(dist[1])).sum()),
            "method": _bootstrap_method(n_resamples, confidence, "the harmful and benign prompts independently")}


# ------------------------------------------------------------------------------------------- across seeds
def normalize_key(value) -> str:
    """A value as a comparable string: numbers as ``repr(float)`` (so 2, 2.0 and "2" all give "2.0"), booleans
    and "true"/"false" as "True"/"False", missing values (None, NaN, pandas NA, "") as ""; other strings
    unchanged."""
    import pandas as pd

    if value is None or (np.ndim(value) == 0 and not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "" if np.isnan(float(value)) else repr(float(value))
    s = str(value)
    if s.strip().lower() in ("true", "false"):
        return s.strip().capitalize()
    if s.strip() == "":
        return ""
    try:
        f = float(s)
    except ValueError:
        return s
    return "" if math.isnan(f) else repr(f)


def as_float(col, name: str) -> np.ndarray:
    """A numeric or boolean column (True/False, possibly with gaps) as floats with NaN for gaps.

    Raises:
        ToolkitError: the column holds text.
    """
    import pandas as pd

    s = pd.Series(col)
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=float, na_value=np.nan)
    words = {"true": 1.0, "false": 0.0}
    mapped = s.map(lambda v: words.get(str(v).strip().lower(), v) if isinstance(v, (str, bool, np.bool_)) else v)
    try:
        return pd.to_numeric(mapped, errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        raise ToolkitError(f"column {name!r} is not numeric or boolean") from None


def aggregate_seeds(frames: list[pd.DataFrame], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, SD and t interval of each metric across runs of one experiment with different seeds.

    Rows are matched across runs on ``keys`` (values compared after :func:`normalize_key`, so 2 and 2.0 match);
    rows not present in every run are dropped. Boolean metrics count as 0/1; missing values are skipped.

    Args:
        frames: one pandas DataFrame per run (e.g. its summary.csv), each with ``keys`` and ``metrics`` columns
            and at most one row per key.
        keys: columns identifying a row (e.g. set, condition, alpha).
        metrics: numeric or boolean columns to aggregate.

    Returns:
        A long DataFrame, one row per (key, metric) in the first run's row order: the key columns (values from
        the first run), ``metric``, ``n_seeds`` (runs with a value), ``mean``, ``sd`` (ddof 1; NaN for one
        value), ``ci_low``/``ci_high`` (95 % t interval of the mean, ``scipy.stats.t.interval``; equal to the
        mean when n_seeds < 2 or sd is 0). ``result.attrs["n_dropped"]`` is the number of distinct keys missing
        from at least one run and ``result.attrs["n_runs"]`` the number of runs.

    Raises:
        ToolkitError: no frames or metrics, a missing column, duplicate keys within a run, or a text metric.
    """
    import pandas as pd
    from scipy import stats as st

    keys, metrics = list(keys), list(metrics)
    if not frames:
        raise ToolkitError("no runs to aggregate")
    if not metrics:
        raise ToolkitError("no metrics to aggregate")
    parts = []
    for i, f in enumerate(frames):
        missing = [c for c in keys + metrics if c not in f.columns]
        if missing:
            raise ToolkitError(f"run {i + 1} has no column(s) {', '.join(missing)}")
        kk = (f[keys].apply(lambda col: col.map(normalize_key)).agg("\x1f".join, axis=1) if keys
              else pd.Series([""] * len(f), index=f.index))
        dup = kk.duplicated(keep=False)
        if dup.any():
            row = f.loc[dup.idxmax(), keys]
            where = ", ".join(f"{k}={row[k]}" for k in keys) or "(no keys)"
            raise ToolkitError(f"run {i + 1} has several rows for {where}; add the column that tells them apart "
                               "to the keys")
        part = pd.DataFrame({m: as_float(f[m], m) for m in metrics})
        part.insert(0, "_key", kk.to_numpy())
        part.insert(1, "_run", i)
        parts.append(part)
    data = pd.concat(parts, ignore_index=True)
    n_runs = len(frames)
    runs_per_key = data.groupby("_key", sort=False)["_run"].nunique()
    common = runs_per_key.index[runs_per_key == n_runs]
    n_dropped = int((runs_per_key < n_runs).sum())
    first = frames[0].assign(_key=parts[0]["_key"].to_numpy())
    first = first[first["_key"].isin(common)]
    order = first["_key"].tolist()
    grouped = data[data["_key"].isin(common)].groupby("_key", sort=False)
    blocks = []
    for m in metrics:
        n = grouped[m].count().reindex(order).to_numpy()
        mean = grouped[m].mean().reindex(order).to_numpy(dtype=float)
        sd = grouped[m].std(ddof=1).reindex(order).to_numpy(dtype=float)
        lo, hi = mean.copy(), mean.copy()
        ok = (n >= 2) & (sd > 0)
        if ok.any():
            lo[ok], hi[ok] = st.t.interval(0.95, n[ok] - 1, loc=mean[ok], scale=sd[ok] / np.sqrt(n[ok]))
        block = first[keys].reset_index(drop=True).copy()
        block["metric"] = m
        block["n_seeds"] = n.astype(int)
        block["mean"], block["sd"], block["ci_low"], block["ci_high"] = mean, sd, lo, hi
        block["_row"] = np.arange(len(order))
        blocks.append(block)
    out = (pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame())
    out["_m"] = out["metric"].map({m: j for j, m in enumerate(metrics)})
    out = out.sort_values(["_row", "_m"], kind="stable").drop(columns=["_row", "_m"]).reset_index(drop=True)
    out.attrs["n_dropped"] = n_dropped
    out.attrs["n_runs"] = n_runs
    return out
