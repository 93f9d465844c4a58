"""The precision policy's mechanics: the LM head folded into one matrix product, and checkpoint export that keeps
the source checkpoint's stored dtype whatever the compute dtype (exact comparisons, float32 and bfloat16)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import PROMPTS, make_lm
from toolkit.checkpoints import check_export_target, export_orthogonalized, stored_dtype
from toolkit.errors import ToolkitError
from toolkit.interventions import orthogonalize_weights
from toolkit.models import _foldable, fold_lm_head_input
from toolkit.runner import Runner
from toolkit.templates import ChatFormat


def _ids(lm, n=4):
    enc = ChatFormat(lm.tokenizer).encode(PROMPTS[:n])
    width = max(map(len, enc))
    ids = torch.tensor([[lm.tokenizer.pad_token_id] * (width - len(x)) + x for x in enc])
    return ids, (ids != lm.tokenizer.pad_token_id).long()


def _head_inputs(model) -> list[bool]:
    """Register (after any fold hook) a pre-hook on the LM head recording whether its input is foldable."""
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_pre_hook(lambda mod, args: seen.append(_foldable(args[0])))
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_folded_lm_head_gives_identical_logits_from_one_matrix_product(family, dtype):
    lm = make_lm(family)
    model = lm.model.to(dtype)
    ids, mask = _ids(lm)
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    fold_lm_head_input(model)
    fold_lm_head_input(model)  # idempotent: one hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    seen = _head_inputs(model)
    head = model.get_output_embeddings()
    h = []
    head.register_forward_pre_hook(lambda mod, args: h.append(args[0].float()))
    vocab = head.weight.shape[0]
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        after = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
    assert seen == [True]
    # the same dot products summed by another kernel: within the rounding bound n * eps * (|h| @ |W|^T) of a
    # length-n dot product in this dtype (Higham, Accuracy and Stability, 3.1)
    bound = lm.d_model * torch.finfo(dtype).eps * (h[0].abs() @ head.weight.float().abs().T)
    assert ((before.float() - after.float()).abs() <= bound).all()
    # no batched matmul over the (expanded) vocabulary matrix is left: the head is one [rows, d] x [d, vocab] product
    head_bmm = [e for e in prof.key_averages(group_by_input_shape=True)
                if e.key == "aten::bmm" and any(s and s[-1] == vocab for s in e.input_shapes)]
    assert head_bmm == []


def test_unfolded_slice_is_what_the_fold_fixes(family):
    """The slice transformers hands the LM head (``hidden[:, -1:]``) is 'contiguous' by PyTorch's test but not
    foldable, and the fold makes generate's prefill and every decode step foldable."""
    lm = make_lm(family)
    assert not _foldable(torch.zeros(4, 9, lm.d_model)[:, -1:])
    one = torch.zeros(1, 9, lm.d_model)[:, -1:]
    assert one.is_contiguous() and not _foldable(one)  # .contiguous() would not copy it, matmul still uses bmm
    assert _foldable(torch.zeros(4, 1, lm.d_model)) and _foldable(torch.zeros(4, 9, lm.d_model)[:, :, :])
    fold_lm_head_input(lm.model)
    seen = _head_inputs(lm.model)
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=4, progress=False)
    r.generate(r.encode(PROMPTS[:4]), 3)
    assert seen and all(seen)


# --------------------------------------------------------------------------------------------- export
def _save(lm, folder, dtype):
    lm.model.to(dtype).save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


def _tensors(folder):
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            out[k] = f.get_tensor(k)
    return out


def _direction(d_model, seed=3):
    return torch.randn(d_model, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_stored_dtype(tmp_path, stored):
    assert stored_dtype(_save(make_lm("llama"), tmp_path / "m", stored)) is stored


def test_stored_dtype_falls_back_to_the_config(tmp_path):
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    assert stored_dtype(tmp_path) is torch.bfloat16
    (tmp_path / "config.json").write_text("{}")
    assert stored_dtype(tmp_path) is None


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_export_keeps_the_stored_dtype_and_equals_editing_the_stored_weights(tmp_path, family, stored):
    lm = make_lm(family)
    src = _save(lm, tmp_path / "src", stored)
    d = _direction(lm.d_model)
    info = export_orthogonalized(src, d, tmp_path / "out")
    assert info["stored_dtype"] == info["saved_dtype"] == str(stored).replace("torch.", "")
    assert info["untied_lm_head"] is (family == "qwen2")
    got = _tensors(tmp_path / "out")
    # reference: the stored weights loaded as they are and edited in place (float64 maths, one rounding)
    ref = AutoModelForCausalLM.from_pretrained(str(src), dtype=stored)
    orthogonalize_weights(ref, d)
    want = ref.state_dict()
    assert {t.dtype for t in got.values()} == {stored}
    for k, t in got.items():
        assert torch.equal(t, want[k]), k
    assert not (tmp_path / "out" / "config.json").read_text().count("quantization_config")


def test_export_in_another_dtype_is_one_cast_of_the_float32_edit(tmp_path):
    lm = make_lm("llama")
    src = _save(lm, tmp_path / "src", torch.float32)
    d = _direction(lm.d_model)
    export_orthogonalized(src, d, tmp_path / "f32")
    info = export_orthogonalized(src, d, tmp_path / "bf16", dtype=torch.bfloat16)
    assert (info["stored_dtype"], info["saved_dtype"]) == ("float32", "bfloat16")
    f32, bf16 = _tensors(tmp_path / "f32"), _tensors(tmp_path / "bf16")
    assert set(f32) == set(bf16)
    for k in f32:
        assert bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].to(torch.bfloat16)), k


def test_export_refuses_the_source_and_existing_folders(tmp_path):
    lm = make_lm("llama")
    src = _save(lm, tmp_path / "src", torch.float32)
    d = _direction(lm.d_model)
    with pytest.raises(ToolkitError, match="over the source checkpoint"):
        export_orthogonalized(src, d, src, overwrite=True)
    with pytest.raises(ToolkitError, match="over the source checkpoint"):
        check_export_target(src, src / "inner", overwrite=True)
    with pytest.raises(ToolkitError, match="over the source checkpoint"):
        check_export_target(src, tmp_path, overwrite=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("the user's")
    with pytest.raises(ToolkitError, match="already exists"):
        export_orthogonalized(src, d, tmp_path / "taken")
    with pytest.raises(ToolkitError, match="not a checkpoint folder"):  # the flag never deletes a non-checkpoint
        export_orthogonalized(src, d, tmp_path / "taken", overwrite=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "the user's"
    with pytest.raises(ToolkitError, match="not a checkpoint folder"):
        check_export_target(tmp_path / "nothing", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"]  # nothing half-written
