"""load_model on a PEFT LoRA adapter folder (export_adapter's): merged where PEFT can, LoRA layers kept where it cannot
(the affine edit's lora_bias on a bias-free Qwen2 o_proj/down_proj); equal to the hook form of the edit."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import PROMPTS
from toolkit.abliteration import WeightEdit, edit_hooks
from toolkit.checkpoints import export_adapter
from toolkit.errors import ToolkitError
from toolkit.hooks import decoder_layers
from toolkit.models import load_model
from toolkit.runner import Runner
from toolkit.templates import ChatFormat

pytestmark = pytest.mark.usefixtures("one_thread", "cache")

N_LAYERS, D = 4, 32  # conftest's tiny_folder
STRENGTHS = {"attn": [0.8, 0.0, 1.0, 0.5], "mlp": [0.0, 1.2, 0.7, 0.0]}


def make_edit(form: str) -> WeightEdit:
    g = torch.Generator().manual_seed(7)
    refs = {"attn": [0.6, -0.4, 1.1, -0.9], "mlp": [0.3, 0.8, -1.3, 0.2]} if form == "affine" else None
    return WeightEdit(torch.randn(N_LAYERS, D, generator=g, dtype=torch.float64), STRENGTHS, form, refs)


def runner(lm):
    return Runner(lm, ChatFormat(lm.tokenizer), progress=False)


def assert_close(got, want):
    err = float((got - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()), err


def lora_modules(model) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


@pytest.mark.parametrize("form", ["projection", "affine"])
def test_adapter_folder_loads_like_the_hook_form(tiny_folder, tmp_path, form):
    edit = make_edit(form)
    dest = tmp_path / "adapter"
    export_adapter(tiny_folder, edit, dest, extra={"refusal-toolkit-edit.json": json.dumps({"form": form})})
    base = load_model(str(tiny_folder), dtype="float32", device="cpu")
    lm = load_model(str(dest), dtype="float32", device="cpu")

    merged = form == "projection"  # affine: lora_bias on bias-free modules, which PEFT cannot merge
    assert lm.adapter == {"base": str(tiny_folder), "base_hash": base.model_hash, "base_source": base.source,
                          "merged": merged}
    assert bool(lora_modules(lm.model)) is not merged
    assert type(lm.model).__name__ == "Qwen2ForCausalLM" and len(decoder_layers(lm.model)) == N_LAYERS
    assert not any(m.training for m in lm.model.modules())
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in lm.model.parameters())
    d = lm.describe()
    assert set(base.describe()) < set(d) and d["adapter"] == lm.adapter
    assert (d["id"], d["source"], d["n_layers"]) == (str(dest), str(dest.resolve()), N_LAYERS)
    assert "adapter" not in base.describe()

    prompts = PROMPTS[:3]
    r = runner(lm)
    got = r.logits(r.encode(prompts))
    rb = runner(base)
    plain = rb.logits(rb.encode(prompts))
    with edit_hooks(base.model, edit):
        want = rb.logits(rb.encode(prompts))
    assert not torch.allclose(want, plain, atol=1e-2)  # the edit changes the logits
    assert_close(got, want)
    texts, first = r.generate(r.encode(prompts), 3)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert_close(first, want)

    assert lm.model_hash != base.model_hash
    assert load_model(str(dest), dtype="float32", device="cpu").model_hash == lm.model_hash


def test_unmerged_adapter_in_bfloat16_and_base_override(tiny_folder, tmp_path):
    dest = tmp_path / "adapter"
    export_adapter(tiny_folder, make_edit("affine"), dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ToolkitError, match="cannot load the base model .*moved-away") as e:
        load_model(str(dest), dtype="float32", device="cpu")
    assert "\n" not in str(e.value)
    lm = load_model(str(dest), dtype="bfloat16", device="cpu", base=str(tiny_folder))
    assert lm.adapter["base"] == str(tiny_folder) and lm.adapter["merged"] is False
    assert lm.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    r = runner(lm)
    assert torch.isfinite(r.logits(r.encode(PROMPTS[:2]))).all()


def test_adapter_errors(tiny_folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    with pytest.raises(ToolkitError, match="cannot read the adapter config") as e:
        load_model(str(bad), dtype="float32", device="cpu")
    assert "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ToolkitError, match=r"is not a Hugging Face checkpoint \(no config.json\)"):
        load_model(str(empty), dtype="float32", device="cpu")
    with pytest.raises(ToolkitError, match="adapters only"):
        load_model(str(tiny_folder), dtype="float32", device="cpu", base=str(tiny_folder))


def test_score_runs_on_an_adapter_folder(env, tiny_folder, tmp_path):
    from test_cli import FAST, HARMFUL, HARMLESS, assert_ok, invoke, write_set

    h, b = write_set(tmp_path / "h.jsonl", HARMFUL, "h"), write_set(tmp_path / "b.jsonl", HARMLESS, "b")
    dest = tmp_path / "adapter"
    export_adapter(tiny_folder, make_edit("projection"), dest)
    assert_ok(invoke(["score", h, b, "--split", "test", "--model", dest, "--dtype", "float32", *FAST, "--name", "a"]))
    meta = json.loads((env / "score" / "a" / "run.json").read_text())["model"]
    lm = load_model(str(dest), dtype="float32", device="cpu")
    assert (meta["hash"], meta["source"], meta["adapter"]) == (lm.model_hash, lm.source, lm.adapter)
