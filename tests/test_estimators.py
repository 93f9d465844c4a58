"""Direction estimators (toolkit/estimators.py) against direct computations."""

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.estimators import METHODS, cosine, estimate
from toolkit.geometry import geometric_median


def _groups(seed=0, n=40, m=3, d=16, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(m, d, generator=g, dtype=torch.float64)
    pos = torch.randn(n, m, d, generator=g, dtype=torch.float64) + mu + shift
    neg = torch.randn(n + 7, m, d, generator=g, dtype=torch.float64) + mu
    return pos, neg


def test_diff_means_is_the_difference_of_means():
    pos, neg = _groups()
    e = estimate("diff-means", pos, neg)
    want = pos.mean(0) - neg.mean(0)
    assert e.directions.shape == (3, 16) and e.directions.dtype == torch.float64
    torch.testing.assert_close(e.directions, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(e.diff_means, want, rtol=0, atol=1e-12)
    assert (e.n_pos, e.n_neg) == (40, 47)


@pytest.mark.parametrize("method", ["refused-minus-complied", "caa"])
def test_group_methods_compute_like_diff_means(method):
    pos, neg = _groups(1)
    torch.testing.assert_close(estimate(method, pos, neg).directions, pos.mean(0) - neg.mean(0), rtol=0, atol=1e-12)


def test_pca_of_identical_differences_is_that_difference():
    g = torch.Generator().manual_seed(2)
    neg = torch.randn(12, 2, 8, generator=g, dtype=torch.float64)
    d = torch.randn(2, 8, generator=g, dtype=torch.float64)
    pos = neg + d
    e = estimate("pca", pos, neg)
    torch.testing.assert_close(e.directions, d, rtol=1e-10, atol=1e-10)
    assert e.info["pairs"] == 12


def test_pca_takes_the_dominant_axis_of_the_differences_and_orients_it():
    # differences vary mostly along e0 (large spread) and have a positive mean along e0
    g = torch.Generator().manual_seed(3)
    k, dd = 200, 6
    coef = 2.0 + 5.0 * torch.randn(k, generator=g, dtype=torch.float64)
    diffs = torch.zeros(k, dd, dtype=torch.float64)
    diffs[:, 0] = coef
    diffs[:, 1:] = 0.1 * torch.randn(k, dd - 1, generator=g, dtype=torch.float64)
    neg = torch.randn(k, 1, dd, generator=g, dtype=torch.float64)
    pos = neg + diffs[:, None]
    e = estimate("pca", pos, neg).directions[0]
    u = e / e.norm()
    assert abs(float(u[0])) > 0.999 and float(u[0]) > 0
    # scale: the mean separation along the unit direction
    assert float(e.norm()) == pytest.approx(float((pos.mean(0) - neg.mean(0))[0] @ u), rel=1e-12)


def test_probe_direction_separates_a_linearly_separable_set():
    g = torch.Generator().manual_seed(4)
    n, dd = 60, 10
    w = torch.randn(dd, generator=g, dtype=torch.float64)
    w /= w.norm()
    x = 3 * torch.randn(2 * n, dd, generator=g, dtype=torch.float64)
    x -= torch.outer(x @ w, w)  # no component along w, then a margin of +-1 along it
    pos = (x[:n] + 1.0 * w)[:, None]
    neg = (x[n:] - 1.0 * w)[:, None]
    e = estimate("probe", pos, neg)
    d = e.directions[0]
    assert float((pos[:, 0] @ d).min()) > float((neg[:, 0] @ d).max())  # every pair of points separated
    assert e.probe_accuracy.shape == (1,) and e.probe_accuracy[0] == 1.0
    assert float(cosine(d, w)) > 0.9
    # oriented towards pos, scaled by the mean separation along it
    u = d / d.norm()
    assert float(d.norm()) == pytest.approx(float((pos.mean(0) - neg.mean(0))[0] @ u), rel=1e-12)


def test_probe_accuracy_is_chance_on_identical_groups():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 2, 5, generator=g, dtype=torch.float64)
    e = estimate("probe", x[:20], x[20:])
    assert e.probe_accuracy.shape == (2,) and (e.probe_accuracy < 0.8).all()


def test_geometric_median_estimate_is_the_difference_of_column_medians():
    pos, neg = _groups(11, n=9, m=3, d=4)
    e = estimate("geometric-median", pos, neg).directions
    for j in range(3):
        torch.testing.assert_close(e[j], geometric_median(pos[:, j]) - geometric_median(neg[:, j]), rtol=0, atol=0)


def test_geometric_median_difference_ignores_an_outlier():
    pos, neg = _groups(7, n=41, m=1, d=4, shift=0.0)
    pos = pos.clone()
    pos[0] += 1e4
    dm = estimate("diff-means", pos, neg).directions
    gm = estimate("geometric-median", pos, neg).directions
    assert float(dm.norm()) > 100 and float(gm.norm()) < 5


def test_every_method_returns_the_middle_shape_and_points_to_pos():
    pos, neg = _groups(8, n=20, m=4, d=6)
    for m in METHODS:
        e = estimate(m, pos, neg, cv_folds=3)
        assert e.directions.shape == (4, 6), m
        assert bool(((e.directions * e.diff_means).sum(-1) > 0).all()), m


def test_errors():
    pos, neg = _groups(9, n=5, m=2, d=3)
    with pytest.raises(ToolkitError, match="unknown estimator") as ei:
        estimate("lda", pos, neg)
    assert ei.value.param == "method"
    with pytest.raises(ToolkitError, match="no positive prompts"):
        estimate("diff-means", pos[:0], neg)
    with pytest.raises(ToolkitError, match="differ in shape"):
        estimate("diff-means", pos, neg[:, :1])
    bad = pos.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ToolkitError, match="not finite"):
        estimate("pca", bad, neg)


def test_float32_input_gives_float64_output():
    pos, neg = _groups(10, n=6, m=1, d=3)
    e = estimate("diff-means", pos.float(), neg.float())
    assert e.directions.dtype == torch.float64
    np.testing.assert_allclose(e.directions.numpy(), (pos.float().double().mean(0) - neg.float().double().mean(0)).numpy())
