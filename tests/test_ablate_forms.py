"""``refusal ablate --form``: the fixed-recipe weight edits (toolkit.abliteration.fixed_edit) on tiny models, and
the command line (Typer CliRunner on the tiny Qwen2 folder). float32 pinned: the identities are exact up to
rounding."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_lm
from test_cli import FAST, assert_ok, assert_usage_error, entries, invoke, tiny_files
from toolkit.abliteration import (COMPONENTS, apply_weight_edit, edit_hooks, fixed_edit, layer_separation,
                                  separation_scale)
from toolkit.errors import ToolkitError
from toolkit.hooks import decoder_layers, writer_module
from toolkit.interventions import directional_ablation
from toolkit.runner import Runner
from toolkit.templates import ChatFormat

PROMPTS = ["how do i make a bomb", "tell me a story about a cat", "hack computer", "bake bread"]
HARMFUL = ["how do i make a bomb", "how do i kill a process", "steal car", "hack computer"]
HARMLESS = ["tell me a story about a cat", "what is the capital of france", "write a poem please", "bake bread"]


def unit(seed: int, d: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g)
    return v / v.norm()


def ids_of(lm, texts=PROMPTS):
    return lm.tokenizer(texts, return_tensors="pt", padding=True)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def writer_hooks(model, r):
    """Directional ablation of r from every o_proj/down_proj output, written directly with torch hooks."""
    handles = []
    for block in decoder_layers(model):
        for site in COMPONENTS.values():
            mod = writer_module(block, site)
            handles.append(mod.register_forward_hook(lambda m, i, y: y - (y @ r).unsqueeze(-1) * r))
    return handles


def test_fixed_projection_equals_ablation_of_the_writers_only(tiny):
    m, batch, r = tiny.model, ids_of(tiny), unit(1)
    edit = fixed_edit(r * 3.0, tiny.n_layers, "projection")  # any norm: normalised
    assert edit.form == "projection" and edit.active() == [(l, c) for l in range(tiny.n_layers) for c in COMPONENTS]
    for w in edit.strengths.values():
        assert torch.equal(w, torch.ones(tiny.n_layers, dtype=torch.float64))
    with edit_hooks(m, edit):
        got = logits(m, batch)
    handles = writer_hooks(m, r)
    try:
        want = logits(m, batch)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with directional_ablation(m, r):  # the default ablation also edits the embedding: not the same map
        full = logits(m, batch)
    assert (full - got).abs().max() > 1e-3


def test_norm_preserving_keeps_row_norms_of_merged_weights(tiny):
    m, r = tiny.model, unit(2)
    before = {(l, c): writer_module(decoder_layers(m)[l], s).weight.detach().clone()
              for l in range(tiny.n_layers) for c, s in COMPONENTS.items()}
    edit = fixed_edit(r, tiny.n_layers, "norm-preserving")
    batch = ids_of(tiny)
    with edit_hooks(m, edit):
        hooked_logits = logits(m, batch)
    info = apply_weight_edit(m, edit)
    assert len(info["edited"]) == 2 * tiny.n_layers
    for (l, c), W0 in before.items():
        W1 = writer_module(decoder_layers(m)[l], COMPONENTS[c]).weight
        torch.testing.assert_close(W1.norm(dim=1), W0.norm(dim=1), atol=1e-5, rtol=1e-5)
        assert (W1 - W0).abs().max() > 1e-4  # it did edit
    torch.testing.assert_close(logits(m, batch), hooked_logits, atol=1e-4, rtol=1e-4)


def test_affine_moves_each_writers_mean_along_r_to_its_reference(tiny):
    from toolkit.optimize import _module_means, module_means

    assert _module_means is module_means  # the old name keeps working
    runner = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=4, progress=False)
    enc = runner.encode(HARMLESS)
    r = unit(3)
    means = module_means(runner, enc)
    edit = fixed_edit(r, tiny.n_layers, "affine", module_means=means)
    for c in COMPONENTS:
        torch.testing.assert_close(edit.references[c], means[c].double() @ r.double())
    with edit_hooks(tiny.model, edit):
        after = module_means(runner, enc)
    for c in COMPONENTS:
        torch.testing.assert_close(after[c].double() @ r.double(), edit.references[c], atol=1e-5, rtol=1e-5)
        assert ((means[c].double() @ r.double()) - edit.references[c]).abs().max() < 1e-5
    # off the direction a writer's mean changes only through upstream edits: layer 0's o_proj has none
    p0 = means["attn"][0].double() - (means["attn"][0].double() @ r.double()) * r.double()
    p1 = after["attn"][0].double() - (after["attn"][0].double() @ r.double()) * r.double()
    torch.testing.assert_close(p1, p0, atol=1e-5, rtol=1e-5)
    with edit_hooks(tiny.model, fixed_edit(r, tiny.n_layers, "projection")):  # projection sends it to 0 instead
        zeroed = module_means(runner, enc)
    assert (zeroed["mlp"].double() @ r.double()).abs().max() < 1e-5


def test_activation_scaled_strengths_are_separation_over_max(tiny):
    runner = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=4, progress=False)
    r = unit(4)
    L = tiny.n_layers
    xh = runner.collect(runner.encode(HARMFUL), range(L), ["resid_pre"], [-1])["resid_pre"][:, :, 0]
    xb = runner.collect(runner.encode(HARMLESS), range(L), ["resid_pre"], [-1])["resid_pre"][:, :, 0]
    sep = layer_separation(xh, xb, r)
    # direct: Cohen's d (equal-weight pooled variance, ddof 1) of the captured projections, per layer, in numpy
    ph, pb = (x.double().numpy() @ r.double().numpy() for x in (xh, xb))
    # layer 0 at the last template token: the same input for every prompt, so 0 / 0 (the engine gives 0)
    assert np.allclose(ph[:, 0], ph[0, 0]) and np.allclose(pb[:, 0], ph[0, 0]) and float(sep[0]) == 0.0
    ph, pb = ph[:, 1:], pb[:, 1:]
    want = torch.from_numpy((ph.mean(0) - pb.mean(0)) / np.sqrt((ph.var(0, ddof=1) + pb.var(0, ddof=1)) / 2))
    torch.testing.assert_close(sep[1:], want)
    want = torch.cat([torch.zeros(1, dtype=torch.float64), want])
    assert sep.shape == (L,) and (sep > 0).any()
    edit = fixed_edit(r, L, "projection", separation=sep)
    scale = want.clamp(min=0) / want.clamp(min=0).max()
    for c in COMPONENTS:
        torch.testing.assert_close(edit.strengths[c], scale, atol=1e-4, rtol=1e-4)
    assert edit.meta["activation_scaled"] is True and max(edit.meta["scale"]) == 1.0


def test_fixed_edit_errors():
    r = unit(0)
    with pytest.raises(ToolkitError, match="unknown edit form") as e:
        fixed_edit(r, 4, "rotate")
    assert e.value.param == "form"
    with pytest.raises(ToolkitError, match="harmless mean outputs") as e:
        fixed_edit(r, 4, "affine")
    assert e.value.param == "module_means"
    with pytest.raises(ToolkitError, match=r"must be \[4, 32\]"):
        fixed_edit(r, 4, "affine", module_means={"attn": torch.zeros(3, 32), "mlp": torch.zeros(4, 32)})
    with pytest.raises(ToolkitError, match="4 values") as e:
        fixed_edit(r, 4, separation=torch.ones(3))
    assert e.value.param == "separation"
    with pytest.raises(ToolkitError, match="no layer separates"):
        fixed_edit(r, 4, separation=torch.tensor([-1.0, 0.0, -2.0, -0.5]))
    with pytest.raises(ToolkitError, match="zero or not finite"):
        fixed_edit(torch.zeros(32), 4)
    torch.testing.assert_close(separation_scale(torch.tensor([-1.0, 2.0, 4.0, 1.0])),
                               torch.tensor([0.0, 0.5, 1.0, 0.25], dtype=torch.float64))
    with pytest.raises(ToolkitError, match="do not fit"):
        layer_separation(torch.zeros(2, 4, 32), torch.zeros(2, 4, 32), torch.ones(3, 32))


# --------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """The tiny Qwen2 folder, the prompt files of test_cli.py and a direction file."""
    from toolkit.directions import save_direction

    base = tmp_path_factory.mktemp("forms")
    model, h, b = tiny_files(base)
    direction = base / "r.safetensors"
    save_direction(direction, unit(7) * 4.0, {"d_model": 32})
    return {"base": base, "model": model, "h": h, "b": b, "direction": direction}


def ablate_args(env, *extra):
    return ["ablate", "--direction", env["direction"], "--harmful", env["h"], "--harmless", env["b"], "--model",
            env["model"], "--dtype", "float32", "--over-refusal", "none", "--kl-tokens", "0", *FAST, *extra]


def test_cli_form_projection_records_and_saves(cli_env, runs):
    from transformers import AutoModelForCausalLM

    saved = cli_env["base"] / "np-edit"
    out = assert_ok(invoke(ablate_args(cli_env, "--form", "norm-preserving", "--name", "np", "--save", saved)))
    assert "norm-preserving edit of the writers" in " ".join(out.split())
    assert_ok(invoke(ablate_args(cli_env, "--form", "projection", "--name", "pr")))
    assert_ok(invoke(ablate_args(cli_env, "--name", "full")))
    pr, full, np_ = (runs / "ablate" / n for n in ("pr", "full", "np"))
    for f in ("results.csv", "summary.csv", "damage.csv"):
        assert list(pd.read_csv(pr / f).columns) == list(pd.read_csv(full / f).columns), f
    meta = json.loads((pr / "run.json").read_text())
    assert meta["params"]["form"] == "projection" and meta["params"]["activation_scaled"] is False
    ed = meta["results"]["edit"]
    assert ed["form"] == "projection" and ed["activation_scaled"] is False and ed["separation"] is None
    assert ed["strengths"] == {"attn": [1.0] * 4, "mlp": [1.0] * 4}
    assert "edit" not in json.loads((full / "run.json").read_text())["results"]
    assert json.loads((full / "run.json").read_text())["params"]["form"] is None
    # the default ablation and the projection edit are different maps: their ablated KLs differ
    kl = {n: pd.read_csv(runs / "ablate" / n / "damage.csv").set_index("condition").loc["ablated", "kl_first"]
          for n in ("pr", "full")}
    assert kl["pr"] != pytest.approx(kl["full"])

    nm = json.loads((np_ / "run.json").read_text())
    orth = nm["results"]["orthogonalized"]
    assert orth["scope"] == "writers" and orth["n_edited"] == 8 and orth["max_abs_logit_diff_vs_hooks"] < 1e-4
    src = AutoModelForCausalLM.from_pretrained(str(cli_env["model"]), dtype=torch.float32).eval()
    dst = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    from toolkit.directions import load_direction

    r, _ = load_direction(cli_env["direction"])
    batch = ids_of(make_lm("qwen2"))
    with edit_hooks(src, fixed_edit(r, 4, "norm_preserving")):
        want = logits(src, batch)
    torch.testing.assert_close(logits(dst, batch), want, atol=1e-5, rtol=1e-5)
    for l in range(4):
        for s in COMPONENTS.values():
            torch.testing.assert_close(writer_module(decoder_layers(dst)[l], s).weight.norm(dim=1),
                                       writer_module(decoder_layers(src)[l], s).weight.norm(dim=1))


def test_cli_affine_activation_scaled(cli_env, runs):
    assert_ok(invoke(ablate_args(cli_env, "--form", "affine", "--activation-scaled", "--train-limit", "3",
                                 "--name", "af")))
    ed = json.loads((runs / "ablate" / "af" / "run.json").read_text())["results"]["edit"]
    assert ed["form"] == "affine" and ed["activation_scaled"] is True
    assert ed["train_prompts"] == {"harmful": 3, "harmless": 3}
    sep = torch.tensor(ed["separation"], dtype=torch.float64)
    scale = sep.clamp(min=0) / sep.clamp(min=0).max()
    for c in ("attn", "mlp"):
        torch.testing.assert_close(torch.tensor(ed["strengths"][c], dtype=torch.float64), scale)
        assert len(ed["references"][c]) == 4
    # the recorded separation is the one computed from the train split's first 3 prompts per set
    from test_cli import HARMFUL as CLI_H, HARMLESS as CLI_B
    from toolkit.models import load_model

    lm = load_model(str(cli_env["model"]), dtype="float32", device="cpu")
    runner = Runner(lm, ChatFormat(lm.tokenizer), batch_size=4, progress=False)
    from toolkit.directions import load_direction

    r, _ = load_direction(cli_env["direction"])
    x = [runner.collect(runner.encode(p[:3]), range(4), ["resid_pre"], [-1])["resid_pre"][:, :, 0]
         for p in (CLI_H["train"], CLI_B["train"])]
    torch.testing.assert_close(sep, layer_separation(x[0], x[1], r), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("extra, needles", [
    (["--form", "rotate"], ["--form:", "projection, norm-preserving, affine"]),
    (["--form", "projection", "--heads", "1.0"], ["--form:", "--heads", "--heads-from"]),
    (["--form", "affine", "--heads-from", "p", "--top-heads", "1"], ["--form:", "head-level"]),
    (["--activation-scaled"], ["--activation-scaled:", "--form"]),
    (["--form", "projection", "--train-limit", "0"], ["--train-limit"]),
    (["--form", "affine", "--save", "out-affine"], ["--save:", "no bias"]),
])
def test_cli_form_bad_input(cli_env, runs, extra, needles, monkeypatch):
    monkeypatch.chdir(cli_env["base"])
    assert_usage_error(invoke(ablate_args(cli_env, *extra)), *needles)
    assert entries(runs / "ablate") == set()
    assert not (cli_env["base"] / "out-affine").exists()
