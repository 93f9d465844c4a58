"""Pass state handed to hooks, the registry of active hooks, skipped blocks, and layers placed by a device map.

Issue 12: hooks receive the state of the pass now running (phase, caller-order rows, shortest prompt) as an
argument, no module keeps mutable run state, a context-cached pass leaves the model's modules as it found them,
and hooks, context caches and weight edits work when accelerate places the layers (tested on the CPU with an
explicit device map and accelerate's hooks forced on).
"""

from __future__ import annotations

import copy
import threading
import types

import numpy as np
import pytest
import torch

from conftest import PROMPTS, make_lm
from toolkit import hooks as hooks_mod
from toolkit import interventions, patching, runner as runner_mod
from toolkit.errors import ToolkitError
from toolkit.hooks import ActiveHooks, HookContext, PassState, active_hooks, current_pass, decoder_layers, hooked
from toolkit.interventions import activation_addition, directional_ablation, orthogonalize_weights
from toolkit.models import check_device_map, load_model, place_layers
from toolkit.runner import Runner
from toolkit.templates import ChatFormat

pytestmark = pytest.mark.usefixtures("one_thread")


def runner(lm, **kw) -> Runner:
    return Runner(lm, ChatFormat(lm.tokenizer), progress=False, **kw)


def direction(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 2.5


# ------------------------------------------------------------------------------------ no module-level state
@pytest.mark.parametrize("module", [hooks_mod, runner_mod, interventions, patching])
def test_engine_modules_hold_no_mutable_state(module):
    """Nothing at module level of the pass machinery is a list, dict, set or a class-level mutable (the old
    ``PHASE`` object); constants are tuples."""
    assert not hasattr(module, "PHASE")
    for name, value in vars(module).items():
        if name.startswith("__") or isinstance(value, (types.ModuleType, type, types.FunctionType)):
            continue
        assert not isinstance(value, (list, dict, set, bytearray)), f"{module.__name__}.{name} is mutable"


# ----------------------------------------------------------------------------------------- pass state
def test_hooks_receive_the_runners_pass_state(tiny):
    """During ``generate`` a hook sees the prefix (where one is shared), prompt and generate phases in that
    order, its own site and layer, and in the prompt phase the caller-order rows of each batch (together: every
    prompt once) with the batch's shortest real length; outside a Runner the state is a fresh prompt-phase one."""
    r = runner(tiny, batch_size=3)
    enc = r.encode(PROMPTS)
    seen = []

    def fn(x, ctx: HookContext):
        seen.append((ctx.site, ctx.layer, ctx.state.phase, None if ctx.state.rows is None else
                     ctx.state.rows.tolist(), ctx.state.min_len, x.shape[1]))

    with hooked(tiny.model, [("resid_pre", -1, fn)], write=False):
        r.generate(enc, 3)
    assert {s[:2] for s in seen} == {("resid_pre", 3)}
    phases = [s[2] for s in seen]
    if enc.prefix_len:  # a shared template prefix (not with Gemma 2's sliding window here)
        assert phases[0] == "prefix" and phases.count("prefix") == 1
    assert set(phases) == ({"prefix"} if enc.prefix_len else set()) | {"prompt", "generate"}
    prompt = [s for s in seen if s[2] == "prompt"]
    assert len(prompt) == 3  # 8 prompts in batches of 3
    assert sorted(i for s in prompt for i in s[3]) == list(range(len(PROMPTS)))
    lens = [len(enc.suffixes[i]) for i in range(len(PROMPTS))]
    for s in prompt:
        assert s[4] == min(lens[i] for i in s[3])
    assert current_pass() == PassState()
    assert current_pass() is not current_pass()  # a fresh state each time: nothing shared to mutate


def test_active_hooks_registry_per_model_context_and_thread(tiny):
    """What interventions declare is visible through ``active_hooks`` for their model only, only while open, and
    only in the thread that opened them."""
    model, other = tiny.model, make_lm("llama", seed=1).model
    d = direction(tiny.d_model)
    assert active_hooks(model) == ActiveHooks()
    with activation_addition(model, d, [2, 1], positions=[-2, -1]):
        assert active_hooks(model) == ActiveHooks(layers=(1, 2), depth=2, every=False, writes=True)
        assert active_hooks(other) == ActiveHooks()
        with directional_ablation(model, d, layers=[0]):
            a = active_hooks(model)
            assert (a.layers, a.depth, a.every, a.writes) == ((0, 0, 0, 1, 2), 2, True, True)
        seen = {}
        t = threading.Thread(target=lambda: seen.setdefault("hooks", active_hooks(model)))
        t.start()
        t.join()
        assert seen["hooks"] == ActiveHooks()
        r = runner(tiny)
        with r.capture(len(PROMPTS), [3], positions=[-4]):
            a = active_hooks(model)
            assert (a.depth, a.writes, a.layers) == (4, True, (1, 2, 3))
    assert active_hooks(model) == ActiveHooks()
    r = runner(tiny)
    with r.capture(len(PROMPTS), [3], positions=[-1]):
        assert active_hooks(model) == ActiveHooks(layers=(3,), depth=1, every=False, writes=False)


def test_capture_does_not_record_continuation_passes(tiny):
    """A capture records prompt passes only: a log-likelihood pass over prompt + continuation (the coherence
    measure) inside it leaves the captured activations as the prompt pass wrote them, with and without a context
    cache (captures read only, so a cache of the unmodified model may serve the pass)."""
    r = runner(tiny, batch_size=3)
    enc = r.encode(PROMPTS)
    conts = [[5, 6, 7], [8], [9, 10], [11], [5], [6, 6], [7], [8, 9]]
    ctx = r.context(enc, 1)
    with r.capture(len(PROMPTS), [1, 3], ["resid_pre", "mlp_out"], [-2, -1]) as acts:
        r.logits(enc)
        after_prompt = {k: v.clone() for k, v in acts.items()}
        plain = r.continuation_logprob(enc, conts)
        cached = r.continuation_logprob(enc, conts, context=ctx)
    for k in acts:
        assert torch.equal(acts[k], after_prompt[k])
        assert acts[k].abs().sum() > 0
    assert np.allclose(plain, cached, atol=1e-4)
    with activation_addition(tiny.model, direction(tiny.d_model), [1], positions=[-1]):
        with pytest.raises(ToolkitError, match="unmodified"):
            r.continuation_logprob(enc, conts, context=ctx)


# ---------------------------------------------------------------------------------------- skipped blocks
def test_skipped_blocks_leave_the_model_as_found(tiny):
    """A context pass from start layer 2 runs no code of blocks 0 and 1 (not even a forward installed on the
    instance, as accelerate installs its device hooks), gives the full pass's logits, and afterwards the layer
    list holds the same block objects with their own ``forward`` untouched, also after an error in a pass."""
    model = tiny.model
    blocks = decoder_layers(model)
    originals = list(blocks)
    calls = {"n": 0}
    real = blocks[0].forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    blocks[0].forward = counting  # an instance-level forward, as accelerate's add_hook_to_module installs
    r = runner(tiny, batch_size=4)
    enc = r.encode(PROMPTS)
    d = direction(tiny.d_model)
    with activation_addition(model, d, [2], positions=[-1]):
        full = r.logits(enc)
    ctx = r.context(enc, 1, start_layer=2)
    calls["n"] = 0
    with activation_addition(model, d, [2], positions=[-1]):
        cached = r.logits(enc, context=ctx)
    assert calls["n"] == 0
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
    assert list(decoder_layers(model)) == originals and all(a is b for a, b in zip(decoder_layers(model), originals))
    assert blocks[0].__dict__["forward"] is counting and "forward" not in blocks[1].__dict__

    def boom(x, ctx):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError, match="hook failed"):
        with hooked(model, [("resid_pre", 3, boom)], write=False):
            r.logits(enc, context=ctx)
    assert all(a is b for a, b in zip(decoder_layers(model), originals))
    r.logits(enc)  # the model still runs every block
    assert calls["n"] > 0


# ------------------------------------------------------------------------------------------ device maps
def explicit_map(model) -> dict:
    n = len(decoder_layers(model))
    return {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(n)}, "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}


def test_layers_placed_by_a_device_map_give_the_same_results(family):
    """With accelerate's device-alignment hooks on every placed module (forced on, all devices the CPU here),
    logits, activation addition through a start-layer context, directional ablation during generation, activation
    capture, and weight orthogonalization give what the unplaced model gives."""
    ref = make_lm(family)
    lm = make_lm(family)
    place_layers(lm.model, explicit_map(lm.model))
    assert all(hasattr(b, "_hf_hook") for b in decoder_layers(lm.model))
    d = direction(lm.d_model)
    outs = []
    for m in (ref, lm):
        r = runner(m, batch_size=3)
        enc = r.encode(PROMPTS)
        res = {"logits": r.logits(enc)}
        ctx = r.context(enc, 2, start_layer=1)
        with activation_addition(m.model, d, [1], positions=[-2, -1]):
            res["steered"] = r.logits(enc, context=ctx)
        with directional_ablation(m.model, d):
            res["ablated_text"], res["ablated"] = r.generate(enc, 4)
        res["acts"] = r.collect(enc, [0, 2], ["resid_pre", "attn_out"], [-1])["attn_out"]
        orthogonalize_weights(m.model, d)
        res["orthogonalized"] = r.logits(enc)
        outs.append(res)
    for key in ("logits", "steered", "ablated", "acts", "orthogonalized"):
        torch.testing.assert_close(outs[1][key], outs[0][key], atol=1e-4, rtol=1e-4)
    assert outs[1]["ablated_text"] == outs[0]["ablated_text"]


def test_load_model_with_a_device_map(tiny_folder):
    """``load_model(device_map=...)`` places the modules through ``from_pretrained``, records the map in the
    model's description, and gives the unplaced model's logits; a malformed map is one ToolkitError."""
    plain = load_model(str(tiny_folder), dtype="float32", device="cpu")
    placed = load_model(str(tiny_folder), dtype="float32", device="cpu", device_map=explicit_map(plain.model))
    assert placed.describe()["device_map"]["model.layers.0"] == "cpu"
    assert plain.describe()["device_map"] is None
    assert placed.device == torch.device("cpu")
    enc_a, enc_b = runner(plain).encode(PROMPTS), runner(placed).encode(PROMPTS)
    torch.testing.assert_close(runner(placed).logits(enc_b), runner(plain).logits(enc_a), atol=1e-5, rtol=1e-5)
    for bad in ("everywhere", {}, {1: "cpu"}):
        with pytest.raises(ToolkitError, match="device_map: "):
            check_device_map(bad)
    with pytest.raises(ToolkitError, match="device map"):
        place_layers(copy.deepcopy(plain.model), {"model.embed_tokens": "cpu"})
