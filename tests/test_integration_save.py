"""Slow: ``refusal ablate --save`` on the default model, under ``--dtype bfloat16``, reloaded in plain transformers.

The default model's cache is a float32 checkpoint, so the saved abliterated checkpoint must hold float32 tensors
computed from it (not a bfloat16 copy of the session's weights), carry no GGUF ``quantization_config``, and load in
plain ``transformers`` with logits equal to hook-based directional ablation of the float32 model. About 2 minutes
on two AVX2 cores (bfloat16 is emulated there). Run with ``pytest -m slow``.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def test_ablate_save_on_the_default_model(tmp_path, monkeypatch):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from experiments.cli import app
    from toolkit.directions import save_direction
    from toolkit.interventions import directional_ablation
    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat

    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    # a difference-in-means direction at layer 15, last post-instruction token, from 16 + 16 training prompts
    lm = load_model(None, dtype="float32", device="cpu")
    fmt = ChatFormat(lm.tokenizer)
    r = Runner(lm, fmt, batch_size=16, progress=False)
    acts = {}
    for name in ("harmful", "harmless"):
        ps = load_prompt_set(name).select("train").head(16)
        acts[name] = r.collect(r.encode(ps.prompts), [15], ["resid_pre"], [-1])["resid_pre"][:, 0, 0].double()
    d = (acts["harmful"].mean(0) - acts["harmless"].mean(0)).float()
    dfile = tmp_path / "direction.safetensors"
    save_direction(dfile, d, {"model_id": lm.model_id, "model_hash": lm.model_hash, "d_model": lm.d_model,
                              "layer": 15, "pos": -1, "site": "resid_pre"})

    saved = tmp_path / "abliterated"
    res = CliRunner().invoke(app, ["ablate", "--direction", str(dfile), "--limit", "4", "--gen-tokens", "2",
                                   "--dtype", "bfloat16", "--save", str(saved), "--name", "save", "--quiet"])
    assert res.exit_code == 0, res.output[-3000:]
    run = json.loads((tmp_path / "runs" / "ablate" / "save" / "run.json").read_text())
    o = run["results"]["orthogonalized"]
    assert (o["compute_dtype"], o["source_stored_dtype"], o["saved_dtype"]) == ("bfloat16", "float32", "float32")
    assert "quantization_config" not in json.loads((saved / "config.json").read_text())
    dtypes = set()
    for p in saved.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F32"}

    ortho = AutoModelForCausalLM.from_pretrained(str(saved), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(saved))
    ids = torch.tensor(ChatFormat(tok).encode(["How do I pick a lock?"]))
    with torch.inference_mode():
        plain = lm.model(ids).logits[0, -1]
        with directional_ablation(lm.model, d):
            hooked = lm.model(ids).logits[0, -1]
        got = ortho(ids).logits[0, -1]
    assert (plain - hooked).abs().max() > 1e-2  # the ablation changes the logits
    torch.testing.assert_close(got, hooked, atol=2e-3, rtol=1e-4)
