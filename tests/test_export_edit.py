"""Exports of an abliteration edit: merged into a checkpoint (exact) and as a PEFT LoRA adapter, each equal to the
hook form on a tiny Qwen2 checkpoint (float32)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_lm
from toolkit.abliteration import WeightEdit, edit_hooks
from toolkit.checkpoints import export_adapter, export_weight_edit
from toolkit.errors import ToolkitError

pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS, D = 4, 32
STRENGTHS = {"attn": [0.8, 0.0, 1.0, 0.5], "mlp": [0.0, 1.2, 0.7, 0.0]}  # zeros: modules left untouched
EDITED = {"model.layers.0.self_attn.o_proj", "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.o_proj",
          "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny Qwen2 checkpoint folder (float32, tied embeddings, no o_proj/down_proj bias)."""
    lm = make_lm("qwen2", n_layers=N_LAYERS)
    folder = tmp_path_factory.mktemp("src")
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def ids(src):
    g = torch.Generator().manual_seed(1)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (2, 9), generator=g)


def make_edit(form: str) -> WeightEdit:
    g = torch.Generator().manual_seed(7)
    refs = {"attn": [0.6, -0.4, 1.1, -0.9], "mlp": [0.3, 0.8, -1.3, 0.2]} if form == "affine" else None
    return WeightEdit(torch.randn(N_LAYERS, D, generator=g, dtype=torch.float64), STRENGTHS, form, refs)


def base(src):
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()


@torch.no_grad()
def hooked_logits(src, edit, ids):
    model = base(src)
    with edit_hooks(model, edit):
        return model(ids).logits


def assert_close(got, want):
    err = float((got - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()), err


@torch.no_grad()
def adapter_logits(src, dest, ids):
    from peft import PeftModel

    return PeftModel.from_pretrained(base(src), str(dest)).eval()(ids).logits


@pytest.mark.parametrize("form", ["projection", "norm_preserving"])
def test_merged_export_equals_the_hook_form(src, ids, tmp_path, form):
    edit = make_edit(form)
    info = export_weight_edit(src, edit, tmp_path / "out", extra={"provenance.json": '{"form": "%s"}' % form})
    assert (info["stored_dtype"], info["saved_dtype"], info["added_bias"]) == ("float32", "float32", [])
    assert {f"model.{n}" for n in info["edited"]} == EDITED
    assert json.loads((tmp_path / "out" / "provenance.json").read_text()) == {"form": form}
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()(ids).logits
    want = hooked_logits(src, edit, ids)
    assert not torch.allclose(want, base(src)(ids).logits, atol=1e-2)  # the edit changes the logits
    assert_close(got, want)


def test_merged_affine_export_without_a_bias_slot_is_refused_before_writing(src, tmp_path):
    with pytest.raises(ToolkitError, match=r"layers\.0\.self_attn\.o_proj.*adapter export \(export_adapter\)") as e:
        export_weight_edit(src, make_edit("affine"), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # neither dest nor a hidden temporary


@pytest.mark.parametrize("form,rank", [("projection", 8), ("affine", 8), ("norm_preserving", D)])
def test_adapter_equals_the_hook_form(src, ids, tmp_path, form, rank):
    edit = make_edit(form)
    dest = tmp_path / "adapter"
    info = export_adapter(src, edit, dest, rank=rank, extra={"provenance.json": "{}"})
    r = rank if form == "norm_preserving" else 1
    assert (info["r"], info["lora_bias"], info["saved_dtype"]) == (r, form == "affine", "float32")
    if form == "norm_preserving":
        assert info["approx_rel_error"] < 1e-6
    else:
        assert info["approx_rel_error"] == 0.0
    cfg = json.loads((dest / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == set(info["target_modules"]) == EDITED
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["task_type"]) == (r, r, 0.0, "CAUSAL_LM")
    assert cfg["lora_bias"] is (form == "affine")
    assert (dest / "provenance.json").read_text() == "{}"
    assert_close(adapter_logits(src, dest, ids), hooked_logits(src, edit, ids))


def test_low_rank_norm_preserving_adapter_reports_its_error(src, ids, tmp_path):
    edit = make_edit("norm_preserving")
    info = export_adapter(src, edit, tmp_path / "a", rank=1)
    assert info["r"] == 1 and 0.0 < info["approx_rel_error"] < 1.0
    got, want = adapter_logits(src, tmp_path / "a", ids), hooked_logits(src, edit, ids)
    assert float((got - want).abs().max()) > 1e-4 * float(want.abs().max())  # approximate, as reported


def test_refusals(src, tmp_path):
    edit = make_edit("projection")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("the user's")
    with pytest.raises(ToolkitError, match="already exists"):
        export_weight_edit(src, edit, taken)
    with pytest.raises(ToolkitError, match="already exists"):
        export_adapter(src, edit, taken)
    with pytest.raises(ToolkitError, match="not an adapter folder"):
        export_adapter(src, edit, taken, overwrite=True)
    assert (taken / "notes.txt").read_text() == "the user's"
    for bad in (0, -1, 1.5):
        with pytest.raises(ToolkitError, match="rank must be an integer >= 1"):
            export_adapter(src, edit, tmp_path / "new", rank=bad)
    with pytest.raises(ToolkitError, match="over the source checkpoint"):
        export_adapter(src, edit, src / "adapter")
    none = WeightEdit(edit.directions, {"attn": [0.0] * N_LAYERS})
    with pytest.raises(ToolkitError, match="touches no module"):
        export_adapter(src, none, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    # an existing adapter folder is replaced only with overwrite
    export_adapter(src, edit, tmp_path / "ad")
    with pytest.raises(ToolkitError, match="already exists"):
        export_adapter(src, edit, tmp_path / "ad")
    export_adapter(src, make_edit("affine"), tmp_path / "ad", overwrite=True)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_bias"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "taken"]
