"""The one bootstrap (:mod:`toolkit.stats.resampling`) against direct ``scipy.stats.bootstrap`` calls, its interval
rules, and Cohen's d (:func:`toolkit.stats.cohen_d`)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as st

from toolkit.errors import ToolkitError
from toolkit.stats import Bootstrap, basic_interval, bootstrap, cohen_d, percentile_interval, welch_ttest

X = np.array([2.1, 3.4, 1.9, 5.0, 4.2, 3.3, 2.8, 4.9, 3.7, 2.5])
Y = np.array([1.8, 2.9, 2.2, 4.1, 3.0, 3.1, 2.0, 4.4, 3.9, 2.6])


def _scipy(data, statistic, **kw):
    return st.bootstrap(data, statistic, n_resamples=300, method="percentile", rng=np.random.default_rng(7), **kw)


def test_bootstrap_is_scipy_bootstrap_seeded_by_an_int():
    res = bootstrap((X,), np.mean, n_resamples=300, seed=7)
    ref = _scipy((X,), np.mean, vectorized=False)
    assert isinstance(res, Bootstrap) and res.distribution.shape == (300,)
    np.testing.assert_allclose(res.distribution, ref.bootstrap_distribution)
    assert (res.low, res.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    np.testing.assert_array_equal(bootstrap((X,), np.mean, n_resamples=300, seed=7).distribution, res.distribution)
    assert not np.array_equal(bootstrap((X,), np.mean, n_resamples=300, seed=8).distribution, res.distribution)


def test_paired_vectorized_bootstrap_and_its_batches():
    def diff(x, y, axis=-1):
        return x.mean(axis) - y.mean(axis)

    seen = []
    res = bootstrap((X, Y), diff, n_resamples=300, seed=7, paired=True, vectorized=True, batch=64,
                    progress=seen.append)
    ref = _scipy((X, Y), diff, paired=True, vectorized=True, batch=64)
    np.testing.assert_allclose(res.distribution, ref.bootstrap_distribution)
    assert seen == [64, 64, 64, 64, 44]
    # independent samples (paired=False): each is resampled within itself (what a stratified bootstrap uses)
    res = bootstrap((X, Y[:7]), diff, n_resamples=300, seed=7, vectorized=True)
    np.testing.assert_allclose(res.distribution, _scipy((X, Y[:7]), diff, vectorized=True).bootstrap_distribution)


def test_bootstrap_refuses_bad_arguments():
    with pytest.raises(ToolkitError, match="n_resamples"):
        bootstrap((X,), np.mean, n_resamples=0, seed=0)
    with pytest.raises(ToolkitError, match="confidence"):
        bootstrap((X,), np.mean, n_resamples=10, seed=0, confidence=1.0)


def test_percentile_interval_rules():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(200, 3))
    lo, hi = percentile_interval(s, 0.9)
    np.testing.assert_allclose(lo, np.percentile(s, 5, axis=0))
    np.testing.assert_allclose(hi, np.percentile(s, 95, axis=0))
    lo_t, hi_t = percentile_interval(s.T, 0.9, axis=-1)
    np.testing.assert_allclose(lo_t, lo)
    np.testing.assert_allclose(hi_t, hi)
    assert percentile_interval(None) == (None, None) and percentile_interval(np.zeros((0, 3))) == (None, None)
    # NaN dropped, +-inf kept: bracketing order statistics, never an interpolated infinity
    v = np.r_[np.arange(1.0, 19.0), np.inf, np.nan]
    assert percentile_interval(v, 0.9) == (np.quantile(v[:19], 0.05, method="lower"),
                                           np.quantile(v[:19], 0.95, method="higher"))
    assert percentile_interval(np.r_[np.arange(10.0), np.nan], 0.5) == (2.0, 7.0)
    assert all(np.isnan(percentile_interval(np.full(5, np.nan))))


def test_basic_interval_is_scipys_basic_interval():
    ref = st.bootstrap((X,), np.mean, n_resamples=300, method="basic", rng=np.random.default_rng(7))
    res = bootstrap((X,), np.mean, n_resamples=300, seed=7)
    lo, hi = basic_interval(X.mean(), res.distribution)
    assert (lo, hi) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert basic_interval(X.mean(), None) == (None, None)


def test_cohen_d_pooled_sd_and_welch_uses_it():
    pooled = np.sqrt(((len(X) - 1) * X.var(ddof=1) + (7 - 1) * Y[:7].var(ddof=1)) / (len(X) + 7 - 2))
    assert cohen_d(X, Y[:7]) == pytest.approx((X.mean() - Y[:7].mean()) / pooled)
    assert welch_ttest(X, Y[:7])["effect_size"] == pytest.approx(cohen_d(X, Y[:7]))
    # along an axis: one d per column
    a, b = np.stack([X, 2 * X, X]).T, np.stack([Y, Y, X]).T  # [n, 3]
    d = cohen_d(a, b, axis=0)
    assert d.shape == (3,) and d[0] == pytest.approx(cohen_d(X, Y)) and d[2] == 0
    assert np.isnan(cohen_d([1.0, 1.0], [1.0, 1.0]))
