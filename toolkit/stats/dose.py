"""Dose-response: logistic fits (statsmodels binomial GLM), the ED50 inside a dose grid, its cluster-bootstrap
interval over prompts, and the therapeutic index and window of a steering dose (harmful refusal against benign
over-refusal). Resampling goes through :func:`toolkit.stats.resampling.bootstrap`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ToolkitError
from .resampling import bootstrap
from .checks import _flags, _values


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

    res = bootstrap((np.arange(n_units),), statistic, n_resamples=n_resamples, seed=seed, confidence=confidence)
    dist = res.distribution.reshape(-1)
    ci_low, ci_high = float(res.low), float(res.high)
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

    res = bootstrap((np.arange(yh.shape[0]), np.arange(yb.shape[0])), statistic, n_resamples=n_resamples, seed=seed,
                    confidence=confidence)
    dist = res.distribution.reshape(2, -1)
    ti_ci = float(res.low[0]), float(res.high[0])
    win_ci = float(res.low[1]), float(res.high[1])
    return {"ed50_harmful": h_est, "ed50_harmful_reason": h_reason, "ed50_benign": b_est,
            "ed50_benign_reason": b_reason, "ti": ti, "ti_reason": ti_reason, "ti_ci_low": ti_ci[0],
            "ti_ci_high": ti_ci[1], "window": window, "window_reason": window_reason, "window_ci_low": win_ci[0],
            "window_ci_high": win_ci[1], "n_resamples": int(dist.shape[1]),
            "n_ti_defined": int((~np.isnan(dist[0])).sum()), "n_window_defined": int((~np.isnan(dist[1])).sum()),
            "method": _bootstrap_method(n_resamples, confidence, "the harmful and benign prompts independently")}
