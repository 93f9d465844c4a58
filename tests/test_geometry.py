"""Geometry of directions (toolkit.geometry) and subspace ablation: exact identities on constructed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.geometry import (adjacent_smoothness, angular_drift, cone_distributions, cone_figures, cone_label,
                              contrast_layers, cosine_matrix, effective_rank, geometric_median, gini, imprint, kmeans_scan,
                              orthogonality, residual_geometry, silhouette_two, spectral_decay, specificity,
                              tail_share)


def orthonormal(k: int, d: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_effective_rank_of_orthonormal_and_equal_directions(k):
    q = orthonormal(k, 64)
    assert effective_rank(q) == pytest.approx(k, abs=1e-9)
    assert effective_rank(q * torch.arange(1, k + 1, dtype=torch.float64)[:, None]) == pytest.approx(k, abs=1e-9)
    same = q[:1].repeat(k, 1) * torch.linspace(0.5, 3, k, dtype=torch.float64)[:, None]
    assert effective_rank(same) == pytest.approx(1.0, abs=1e-9)
    assert spectral_decay(q) == pytest.approx(0.0, abs=1e-9)


def test_effective_rank_between_one_and_k_and_errors():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    assert 1 < effective_rank(v) < 2
    with pytest.raises(ToolkitError, match="zero direction"):
        effective_rank(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    with pytest.raises(ToolkitError, match=r"\[k, d\]"):
        effective_rank(torch.zeros(3))


def test_gini():
    assert gini([2.0, 2.0, 2.0, 2.0]) == 0.0
    assert gini([0, 0, 0, 5]) == pytest.approx(3 / 4)
    assert gini([1, 2, 3, 4]) == pytest.approx(0.25)  # sum|xi-xj| = 20, 20 / (2 * 16 * 2.5)
    for bad in ([], [1, -1], [0, 0]):
        with pytest.raises(ToolkitError):
            gini(bad)


def test_layer_figures_on_a_rotating_direction():
    # a direction turning by 10 degrees per layer in one plane of a 16-dim space
    L = 7
    ang = torch.deg2rad(torch.arange(L, dtype=torch.float64) * 10)
    d = torch.zeros(L, 16, dtype=torch.float64)
    d[:, 0], d[:, 1] = torch.cos(ang), torch.sin(ang)
    assert angular_drift(d * 3) == pytest.approx(60.0, abs=1e-6)
    assert adjacent_smoothness(d) == pytest.approx(math.cos(math.radians(10)), abs=1e-12)
    c = cosine_matrix(d)
    expected = 1 - np.mean([abs(math.cos(math.radians(10 * abs(i - j)))) for i in range(L) for j in range(L) if i != j])
    assert orthogonality(d) == pytest.approx(expected, abs=1e-12)
    assert orthogonality(orthonormal(4, 8)) == pytest.approx(1.0, abs=1e-12)
    assert orthogonality(d[:1].repeat(3, 1)) == pytest.approx(0.0, abs=1e-12)
    assert c.shape == (L, L) and torch.allclose(c.diagonal(), torch.ones(L, dtype=torch.float64))


def test_tail_share_and_imprint_keys():
    assert tail_share([1.0] * 8) == pytest.approx(0.25)
    assert tail_share([0, 0, 0, 0, 0, 0, 1, 1]) == pytest.approx(1.0)
    assert tail_share([1.0] * 5) == pytest.approx(2 / 5)  # ceil(0.25 * 5) = 2 layers
    d = orthonormal(6, 32) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    f = imprint(d, list(range(6)), torch.full((6,), 2.0))
    assert f["effective_rank"] == pytest.approx(6, abs=1e-9) and f["orthogonality"] == pytest.approx(1.0)
    assert f["gini"] == pytest.approx(gini(list(range(1, 7)))) and f["gini_rel"] == pytest.approx(f["gini"])
    assert f["peak_layer"] == 5 and f["angular_drift_deg"] == pytest.approx(450.0)
    assert math.isnan(imprint(d, list(range(6)))["gini_rel"])
    with pytest.raises(ToolkitError, match="two or more layers"):
        imprint(d[:1], [0])


def test_geometric_median():
    square = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert torch.allclose(geometric_median(square), torch.tensor([1.0, 1.0], dtype=torch.float64), atol=1e-8)
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    assert torch.allclose(geometric_median(line), torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-6)
    # random points: the Weiszfeld median is a minimum of the summed distance (no nearby point does better)
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = geometric_median(x)
    f = lambda p: float((x - p).norm(dim=1).sum())  # noqa: E731
    for _ in range(50):
        assert f(m) <= f(m + 1e-3 * torch.randn(5, dtype=torch.float64)) + 1e-12
    assert f(m) < f(x.mean(0))


def test_residual_geometry_matches_direct_computation():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(30, 8, generator=gen, dtype=torch.float64) + 5
    B = torch.randn(25, 8, generator=gen, dtype=torch.float64) + 5
    B[:, 0] += 3
    res = residual_geometry(G, B)
    g, b = G.mean(0), B.mean(0)
    r = b - g
    cos = torch.nn.functional.cosine_similarity
    assert res["cos_g_b"] == pytest.approx(float(cos(g, b, dim=0)), abs=1e-12)
    assert res["cos_g_r"] == pytest.approx(float(cos(g, r, dim=0)), abs=1e-12)
    assert res["cos_b_r"] == pytest.approx(float(cos(b, r, dim=0)), abs=1e-12)
    assert res["norm_r"] == pytest.approx(float(r.norm()), abs=1e-12)
    gm, bm = geometric_median(G), geometric_median(B)
    assert res["cos_gm_rm"] == pytest.approx(float(cos(gm, bm - gm, dim=0)), abs=1e-12)
    assert res["norm_bm"] == pytest.approx(float(bm.norm()), abs=1e-12)
    from sklearn.metrics import silhouette_score

    sil = silhouette_score(torch.cat([G, B]).numpy(), [0] * 30 + [1] * 25)
    assert res["silhouette"] == pytest.approx(sil, abs=1e-12) and silhouette_two(G, B) == pytest.approx(sil)
    assert math.isnan(silhouette_two(torch.ones(3, 4), torch.ones(2, 4)))  # all points coincide: undefined
    assert math.isnan(silhouette_two(G[:1], B[:1]))  # as many groups as points: undefined
    with pytest.raises(ToolkitError, match="two prompts"):
        residual_geometry(G[:1], B)


def test_cone_figures_specificity_definition():
    means = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    f = cone_figures(means, torch.zeros(3))
    c = cosine_matrix(means)
    assert np.allclose(f.cos, c.numpy())
    assert f.specificity[0] == pytest.approx(1 - (abs(c[0, 1]) + abs(c[0, 2])) / 2)
    assert f.mean_abs_cos == pytest.approx(float((abs(c[0, 1]) + abs(c[0, 2]) + abs(c[1, 2])) / 3))
    assert np.allclose(f.strength, [1, math.sqrt(2), 1])
    assert np.allclose(specificity(c).numpy(), f.specificity)


def _synthetic(offsets: torch.Tensor, n: int = 20, noise: float = 0.1, seed: int = 0):
    """Harmful residuals ``[k*n, 2 layers, d]``: category c = offsets[c] + noise; harmless = noise."""
    gen = torch.Generator().manual_seed(seed)
    k, d = offsets.shape
    H = offsets.repeat_interleave(n, 0)[:, None, :].repeat(1, 2, 1) + noise * torch.randn(k * n, 2, d, generator=gen)
    G = noise * torch.randn(3 * n, 2, d, generator=gen)
    return H, [f"c{i}" for i in range(k) for _ in range(n)], G


def _label(dist: dict, layer: int = 0) -> str:
    from toolkit.geometry import permutation_p, polyhedral_share
    from toolkit.stats import basic_interval

    P, B, N = dist["point"], dist["boot"], dist["null"]
    lo, hi = basic_interval(P["mean_abs_cos"], B["mean_abs_cos"])
    dlo, dhi = basic_interval(P["dim"], B["dim"])
    p_cos = permutation_p(P["mean_abs_cos"], N["mean_abs_cos"], lower=True)
    p_dim = permutation_p(P["dim"], N["dim"], lower=False)
    share = polyhedral_share(N["mean_abs_cos"], N["dim"])
    return cone_label((lo[layer], hi[layer]), (dlo[layer], dhi[layer]), p_cos[layer], p_dim[layer], share[layer])[0]


def test_cones_orthogonal_categories_are_polyhedral_and_equal_ones_linear():
    H, labels, G = _synthetic(10 * orthonormal(4, 32).float())
    dist = cone_distributions(H, labels, G, n_boot=50, n_null=50, seed=0)
    assert dist["categories"] == ["c0", "c1", "c2", "c3"] and dist["sizes"] == [20] * 4
    assert dist["point"]["dim"][0] == pytest.approx(4, abs=0.05) and dist["point"]["mean_abs_cos"][0] < 0.05
    assert dist["boot"]["dim"].shape == (50, 2) and dist["null"]["strength"].shape == (50, 2, 4)
    assert _label(dist) == "polyhedral"
    # random groups of mixed categories point the same way: the null's mean |cos| is high
    assert np.quantile(dist["null"]["mean_abs_cos"][:, 0], 0.025) > 0.5
    same = 10 * orthonormal(1, 32).float().repeat(4, 1)
    dist = cone_distributions(*_synthetic(same), n_boot=50, n_null=50, seed=0)
    assert _label(dist) == "linear"


def test_cones_of_pure_noise_are_indistinguishable_from_random_groups():
    H, labels, G = _synthetic(torch.ones(3, 16) * 0.5, noise=1.0)
    dist = cone_distributions(H, labels, G, n_boot=50, n_null=50, seed=0)
    assert _label(dist) in ("indistinguishable from random groups", "linear")


def test_cone_bootstrap_resamples_within_categories_and_the_harmless_set():
    """The boot figures equal scipy.stats.bootstrap's, drawn directly: each category's prompts and the harmless
    prompts are separate samples (resampled independently, i.e. within their stratum), 16 resamples per batch,
    and each resample's figures are :func:`cone_figures` of the resampled means."""
    from scipy import stats as st

    H, labels, G = _synthetic(torch.eye(3, 8) + 0.5, n=6, noise=0.5)
    dist = cone_distributions(H, labels, G, n_boot=40, n_null=0, seed=3)
    lab = np.asarray(labels)
    groups = [np.flatnonzero(lab == c) for c in dist["categories"]]

    def figures(*resampled, axis=-1):
        *cats, g = resampled
        out = []
        for r in range(g.shape[0]):
            f = [cone_figures(torch.stack([H[c[r], layer].mean(0) for c in cats]), G[g[r], layer].mean(0))
                 for layer in range(H.shape[1])]
            out.append([[x.mean_abs_cos, x.dim] for x in f])
        return np.moveaxis(np.asarray(out), 0, -1)  # [L, 2, batch]

    ref = st.bootstrap((*groups, np.arange(len(G))), figures, n_resamples=40, batch=16, vectorized=True,
                       method="percentile", rng=np.random.default_rng(3)).bootstrap_distribution
    np.testing.assert_allclose(dist["boot"]["mean_abs_cos"], ref[:, 0].T, atol=1e-9)
    np.testing.assert_allclose(dist["boot"]["dim"], ref[:, 1].T, atol=1e-9)
    assert dist["null"] == {}


def test_cone_errors():
    H, labels, G = _synthetic(torch.eye(3, 8))
    with pytest.raises(ToolkitError, match="fewer than two prompts: c9"):
        cone_distributions(H[:21], labels[:20] + ["c9"], G, n_boot=0, n_null=0)
    with pytest.raises(ToolkitError, match="at least two categories"):
        cone_distributions(H, ["c0"] * len(labels), G, n_boot=0, n_null=0)
    with pytest.raises(ToolkitError, match="do not match"):
        cone_distributions(H, labels, G[:, :, :4], n_boot=0, n_null=0)


def test_kmeans_recovers_separated_categories():
    H, labels, _ = _synthetic(10 * orthonormal(3, 16).float())
    res = kmeans_scan(H[:, 0], labels, [2, 3, 4], seed=0)
    by_k = {r["k"]: r for r in res}
    assert by_k[3]["ari"] == pytest.approx(1.0) and by_k[3]["silhouette"] > 0.8
    assert by_k[3]["silhouette"] > by_k[2]["silhouette"]
    with pytest.raises(ToolkitError, match="2 <= k"):
        kmeans_scan(H[:, 0], labels, [1])


def test_subspace_ablation_removes_the_span_and_equals_directional_for_one(tiny):
    from toolkit.hooks import hooked
    from toolkit.interventions import directional_ablation, orthonormal_basis, subspace_ablation
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat

    from conftest import PROMPTS

    model = tiny.model
    d = tiny.d_model
    vecs = torch.randn(3, d, generator=torch.Generator().manual_seed(0))
    q = orthonormal_basis(vecs)
    assert q.shape == (3, d) and torch.allclose(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert float(q[0] @ vecs[0].double()) > 0
    assert orthonormal_basis(torch.stack([vecs[0], 2 * vecs[0], vecs[1]])).shape == (2, d)
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=4, progress=False)
    enc = r.encode(PROMPTS[:4])
    seen = []
    with subspace_ablation(model, vecs), hooked(model, [("resid_post", 2, lambda x, ctx: seen.append(x.clone()))]):
        r.logits(enc)
    proj = torch.cat([s.reshape(-1, d) for s in seen]).double() @ q.T
    assert proj.abs().max() < 1e-4 * max(1.0, max(float(s.abs().max()) for s in seen))
    with subspace_ablation(model, vecs[:1]):
        a = r.logits(enc)
    with directional_ablation(model, vecs[0]):
        b = r.logits(enc)
    assert torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ToolkitError, match="d_model"):
        with subspace_ablation(model, torch.ones(2, d + 1)):
            pass


def test_contrast_layers_relative_threshold():
    """A layer counts only if its direction is longer than rel x its scale (the mean residual norm)."""
    d = torch.zeros(4, 3, dtype=torch.float64)
    d[1, 0], d[2, 1], d[3, 2] = 1e-9, 2e-6, 5.0  # layer 0 exactly zero, layer 1 rounding noise
    scale = torch.tensor([1.0, 1.0, 1.0, 100.0])
    assert contrast_layers(d, scale) == [2, 3]
    assert contrast_layers(d, scale, rel=1e-10) == [1, 2, 3]
    assert contrast_layers(d, torch.full((4,), 1e7)) == []
