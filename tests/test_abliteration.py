"""Abliteration edits (toolkit/abliteration.py): Heretic's kernel at known points, direction interpolation and
projection, and the hook form of every edit form equal to the weight form on the tiny models."""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.abliteration import (Kernel, WeightEdit, affine_ablate, apply_weight_edit, direction_at, edit_hooks,
                                  orthogonalize_to, unit_rows)
from toolkit.errors import ToolkitError
from toolkit.hooks import decoder_layers, writer_module

from conftest import PROMPTS


def test_kernel_matches_heretic_formula_at_known_points():
    # Heretic: w = max + (d / min_weight_distance) * (min - max), d = |l - max_weight_position|; 0 beyond the distance
    k = Kernel(max_weight=1.2, max_weight_position=10.0, min_weight=0.3, min_weight_distance=4.0)
    w = k.weights(24)
    assert w.dtype == torch.float64 and w.shape == (24,)
    assert w[10].item() == pytest.approx(1.2, abs=1e-15)
    assert w[12].item() == pytest.approx(0.75, abs=1e-15)  # d = 2: halfway from 1.2 to 0.3
    assert w[8].item() == pytest.approx(0.75, abs=1e-15)
    assert w[14].item() == pytest.approx(0.3, abs=1e-15)  # d = 4 = min_weight_distance: min_weight
    assert w[6].item() == pytest.approx(0.3, abs=1e-15)
    assert w[15].item() == 0.0 and w[5].item() == 0.0 and w[0].item() == 0.0 and w[23].item() == 0.0
    frac = Kernel(1.2, 10.5, 0.3, 4.0).weights(24)
    assert frac[10].item() == pytest.approx(1.2 + 0.125 * (0.3 - 1.2), abs=1e-15)
    assert frac[14].item() == pytest.approx(1.2 + 0.875 * (0.3 - 1.2), abs=1e-15)
    assert frac[15].item() == 0.0  # d = 4.5 > 4
    assert Kernel(0.0, 10.0, 0.0, 3.0).weights(24).abs().sum().item() == 0.0  # max_weight 0: component off


def test_kernel_rejects_bad_parameters():
    with pytest.raises(ToolkitError, match="min_weight_distance"):
        Kernel(1.0, 3.0, 0.5, 0.0)
    with pytest.raises(ToolkitError, match="finite"):
        Kernel(float("nan"), 3.0, 0.5, 1.0)


def test_direction_at_interpolates_between_layers():
    g = torch.Generator().manual_seed(0)
    dirs = unit_rows(torch.randn(5, 7, generator=g, dtype=torch.float64))
    assert torch.allclose(direction_at(dirs, 2.0), dirs[2], atol=1e-15, rtol=0)
    assert torch.allclose(direction_at(dirs, 4.0), dirs[4], atol=1e-15, rtol=0)
    mid = direction_at(dirs, 1.25)
    want = 0.75 * dirs[1] + 0.25 * dirs[2]
    assert torch.allclose(mid, want / want.norm(), atol=1e-15)
    for bad in (-0.1, 4.01, float("inf")):
        with pytest.raises(ToolkitError, match="outside"):
            direction_at(dirs, bad)


def test_orthogonalize_to_is_projected_abliteration():
    g = torch.Generator().manual_seed(1)
    r, m = torch.randn(3, 9, generator=g, dtype=torch.float64), torch.randn(3, 9, generator=g, dtype=torch.float64)
    out = orthogonalize_to(r, m)
    assert torch.allclose(out.norm(dim=1), torch.ones(3, dtype=torch.float64), atol=1e-14)
    assert (out * m).sum(1).abs().max().item() < 1e-12
    rh, mh = r / r.norm(dim=1, keepdim=True), m / m.norm(dim=1, keepdim=True)
    want = rh - (rh * mh).sum(1, keepdim=True) * mh
    assert torch.allclose(out, want / want.norm(dim=1, keepdim=True), atol=1e-14)
    with pytest.raises(ToolkitError, match="orthogonal"):
        orthogonalize_to(m, 2 * m)  # parallel: nothing is left


def test_affine_ablation_maps_harmful_mean_onto_harmless_mean_along_the_direction():
    g = torch.Generator().manual_seed(2)
    mu_h, mu_b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    r = mu_h - mu_b
    out = affine_ablate(mu_h.double(), r.double(), mu_b.double())
    rh = r.double() / r.double().norm()
    assert (out @ rh).item() == pytest.approx((mu_b.double() @ rh).item(), abs=1e-12)
    assert torch.allclose(out - (out @ rh) * rh, mu_h.double() - (mu_h.double() @ rh) * rh, atol=1e-12)
    # on the harmless mean it changes nothing; plain projection would move it
    assert torch.allclose(affine_ablate(mu_b.double(), r.double(), mu_b.double()), mu_b.double(), atol=1e-12)
    x = torch.randn(4, 5, 16, generator=g)
    half = affine_ablate(x, r, mu_b, weight=0.5)
    assert torch.allclose(((half.double() - mu_b.double()) @ rh), 0.5 * ((x.double() - mu_b.double()) @ rh), atol=1e-5)


def _edit(model, form, seed=0, zero_layer=1):
    n = len(decoder_layers(model))
    d = model.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n, d, generator=g, dtype=torch.float64)
    st = {"attn": torch.rand(n, generator=g, dtype=torch.float64) * 1.5,
          "mlp": torch.rand(n, generator=g, dtype=torch.float64) * 1.5}
    st["mlp"][zero_layer] = 0.0  # a module left untouched
    refs = {c: torch.randn(n, generator=g, dtype=torch.float64) for c in st} if form == "affine" else None
    return WeightEdit(dirs, st, form, refs)


def _logits(model, tok):
    ids = tok([p for p in PROMPTS], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**ids).logits.float()


@pytest.mark.parametrize("form", ["projection", "norm_preserving", "affine"])
def test_hook_form_equals_weight_form(tiny, form):
    model, tok = tiny.model, tiny.tokenizer
    edit = _edit(model, form)
    base = _logits(model, tok)
    with edit_hooks(model, edit):
        hooked_logits = _logits(model, tok)
    assert torch.equal(_logits(model, tok), base)  # hooks gone
    edited = copy.deepcopy(model)
    info = apply_weight_edit(edited, edit)
    assert len(info["edited"]) == len(edit.active()) == 2 * len(decoder_layers(model)) - 1
    weight_logits = _logits(edited, tok)
    scale = float(base.abs().max())
    assert (hooked_logits - weight_logits).abs().max().item() < 2e-5 * (1 + scale)
    assert (hooked_logits - base).abs().max().item() > 1e-2  # the edit does something


@pytest.mark.parametrize("form", ["projection", "norm_preserving", "affine"])
def test_hook_form_equals_weight_form_with_kernel_and_global_direction(form):
    from conftest import make_lm

    lm = make_lm("llama", n_layers=6)
    n, d = 6, lm.model.config.hidden_size
    r = unit_rows(torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    st = {"attn": Kernel(1.3, 2.5, 0.4, 2.0).weights(n), "mlp": Kernel(0.7, 4.0, 0.1, 1.5).weights(n)}
    refs = {"attn": torch.linspace(-1, 1, n, dtype=torch.float64), "mlp": torch.linspace(0.5, -0.5, n,
                                                                                          dtype=torch.float64)}
    edit = WeightEdit(r.expand(n, d), st, form, refs if form == "affine" else None)
    assert [c for _, c in edit.active()].count("attn") == 4  # layers 1..4 (|l - 2.5| <= 2)
    with edit_hooks(lm.model, edit):
        h = _logits(lm.model, lm.tokenizer)
    edited = copy.deepcopy(lm.model)
    apply_weight_edit(edited, edit)
    w = _logits(edited, lm.tokenizer)
    assert (h - w).abs().max().item() < 2e-5 * (1 + float(w.abs().max()))


def test_norm_preserving_keeps_row_norms(tiny):
    model = tiny.model
    edit = _edit(model, "norm_preserving", seed=3)
    before = {(l, c): writer_module(decoder_layers(model)[l], {"attn": "o_proj", "mlp": "down_proj"}[c]
                                    ).weight.detach().double().norm(dim=1).clone() for l, c in edit.active()}
    edited = copy.deepcopy(model)
    apply_weight_edit(edited, edit)
    for (l, c), rn in before.items():
        w = writer_module(decoder_layers(edited)[l], {"attn": "o_proj", "mlp": "down_proj"}[c]).weight.double()
        assert torch.allclose(w.norm(dim=1), rn, rtol=1e-6, atol=0)
    # the plain projection does not keep them
    proj = copy.deepcopy(model)
    apply_weight_edit(proj, _edit(model, "projection", seed=3))
    l, c = edit.active()[0]
    w = writer_module(decoder_layers(proj)[l], {"attn": "o_proj", "mlp": "down_proj"}[c]).weight.double()
    assert not torch.allclose(w.norm(dim=1), before[(l, c)], rtol=1e-3)


def test_affine_edit_sets_module_projection_to_reference():
    from conftest import make_lm

    lm = make_lm("qwen2")
    n, d = 4, lm.model.config.hidden_size
    r = unit_rows(torch.randn(d, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    refs = {"attn": torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)}
    edit = WeightEdit(r.expand(n, d), {"attn": torch.ones(n, dtype=torch.float64)}, "affine", refs)
    seen = {}

    def grab(l):
        def hook(mod, args, out):
            seen[l] = out.detach().double()
        return hook

    handles = []
    with edit_hooks(lm.model, edit):
        for l in range(n):  # registered after the edit's hooks: sees the edited output
            handles.append(decoder_layers(lm.model)[l].self_attn.o_proj.register_forward_hook(grab(l)))
        _logits(lm.model, lm.tokenizer)
    for h in handles:
        h.remove()
    for l in range(n):
        proj = seen[l] @ r
        assert torch.allclose(proj, torch.full_like(proj, float(refs["attn"][l])), atol=1e-5)


def test_edit_errors():
    from conftest import make_lm

    lm = make_lm("qwen2")
    with pytest.raises(ToolkitError, match="form"):
        WeightEdit(torch.ones(4, 32), {"attn": torch.ones(4)}, "rotate")
    with pytest.raises(ToolkitError, match="component"):
        WeightEdit(torch.ones(4, 32), {"embed": torch.ones(4)})
    with pytest.raises(ToolkitError, match="reference"):
        WeightEdit(torch.ones(4, 32), {"attn": torch.ones(4)}, "affine")
    with pytest.raises(ToolkitError, match="zero"):
        WeightEdit(torch.zeros(4, 32), {"attn": torch.ones(4)})
    with pytest.raises(ToolkitError, match="layers"):
        with edit_hooks(lm.model, WeightEdit(torch.ones(3, 32), {"attn": torch.ones(3)})):
            pass
