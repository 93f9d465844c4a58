"""Unit tests of the engine (toolkit/) on the tiny in-process Qwen2, Llama and Gemma 2 models of conftest.py.

Every check compares the toolkit against an independent computation (plain Hugging Face forward passes,
direct formulas, scipy/statsmodels) with exact expectations or float32 tolerances.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from conftest import PROMPTS, TEMPLATES, make_lm
from toolkit.directions import diff_in_means
from toolkit.errors import ToolkitError
from toolkit.hooks import SITES, add_hook, current_pass, decoder_layers, has_post_norms, hooked
from toolkit.interventions import activation_addition, directional_ablation, orthogonalize_weights
from toolkit.runner import Runner
from toolkit.scoring import is_refusal, kl_divergence, refusal_score, refusal_token_ids
from toolkit.selection import build_candidates
from toolkit.stats import rate_ci
from toolkit.templates import ChatFormat

N_LAYERS = 4  # conftest's default depth
D_MODEL = 32


# ------------------------------------------------------------------------------------------------ helpers
def runner(lm, fmt=None, **kw) -> Runner:
    return Runner(lm, fmt or ChatFormat(lm.tokenizer), progress=False, **kw)


def n_hooks(model) -> int:
    """Forward hooks and forward pre-hooks (with or without kwargs) registered on any module."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def hf_forward(model, ids: list[int], **kw):
    """A plain Hugging Face forward pass on one unpadded prompt."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), **kw)


def random_direction(seed: int = 1, scale: float = 3.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D_MODEL, generator=g) * scale


def unit(d: torch.Tensor) -> torch.Tensor:
    return (d.double() / d.double().norm()).float()


def min_len(fmt: ChatFormat, prompts=PROMPTS) -> int:
    return min(len(x) for x in fmt.encode(list(prompts)))


ALL_LAYERS = list(range(N_LAYERS))

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


# ------------------------------------------------------------------------------- 1. post-instruction tokens
@pytest.mark.parametrize("system", [None, "you are good"])
def test_post_instruction_tokens(tiny, family, system):
    tok = tiny.tokenizer
    fmt = ChatFormat(tok, system=system)
    expected = TEMPLATES[family][2]
    assert [tok.decode([i]) for i in fmt.post_ids] == expected
    assert tok.convert_ids_to_tokens(list(fmt.post_ids)) == expected
    assert fmt.n_post == 5
    assert fmt.post_positions() == [-5, -4, -3, -2, -1]
    for p in PROMPTS:
        ids = fmt.encode([p])[0]
        assert tuple(ids[-fmt.n_post:]) == fmt.post_ids
        # and the tokens before them are the instruction's own words
        words = tok(p, add_special_tokens=False)["input_ids"]
        assert ids[-fmt.n_post - len(words):-fmt.n_post] == words
    if system is not None:
        assert fmt.post_ids == ChatFormat(tok).post_ids
        assert "you are good" in fmt.render("hello")


# ------------------------------------------------------------------------------------ 2. prefix sharing
def _permutation(n: int) -> list[int]:
    return [int(i) for i in torch.randperm(n, generator=torch.Generator().manual_seed(3))]


def test_prefix_sharing_logits_and_activations(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    shared, plain = runner(tiny, fmt, batch_size=3), runner(tiny, fmt, batch_size=3, share_prefix=False)
    e1, e0 = shared.encode(PROMPTS), plain.encode(PROMPTS)
    # Gemma 2 has sliding-window layers (window 16 here): the Runner must not share a prefix there.
    assert (e1.prefix_len > 0) == (tiny.model.config.model_type != "gemma2") and e0.prefix_len == 0
    assert e1.ids == e0.ids == fmt.encode(PROMPTS)

    l1, l0 = shared.logits(e1), plain.logits(e0)
    assert l1.shape == (len(PROMPTS), len(tiny.tokenizer))
    torch.testing.assert_close(l1, l0, atol=1e-4, rtol=0)

    layers, positions = [0, 2, 3], [-7, -5, -2, -1]
    a1 = shared.collect(e1, layers, list(SITES), positions)
    a0 = plain.collect(e0, layers, list(SITES), positions)
    for s in SITES:
        assert a1[s].shape == (len(PROMPTS), len(layers), len(positions), D_MODEL)
        torch.testing.assert_close(a1[s], a0[s], atol=1e-4, rtol=0)

    # results come back in the caller's order
    perm = _permutation(len(PROMPTS))
    shuffled = [PROMPTS[i] for i in perm]
    lp = shared.logits(shared.encode(shuffled))
    torch.testing.assert_close(lp, l1[perm], atol=1e-4, rtol=0)
    ap = shared.collect(shared.encode(shuffled), layers, list(SITES), positions)
    for s in SITES:
        torch.testing.assert_close(ap[s], a1[s][perm], atol=1e-4, rtol=0)


# Regression: prefix sharing put left padding between the cached prefix and the suffix, which shifted
# Gemma 2's sliding window; the Runner now shares the prefix only when no sliding window can be reached.


@pytest.mark.parametrize("family", [
    "qwen2", "llama", "gemma2"])
def test_prefix_sharing_generate(family):
    lm = make_lm(family)
    fmt = ChatFormat(lm.tokenizer)
    # one batch: the shortest prompts get the most left padding
    shared, plain = runner(lm, fmt, batch_size=8), runner(lm, fmt, batch_size=8, share_prefix=False)
    t1, f1 = shared.generate(shared.encode(PROMPTS), 8)
    t0, f0 = plain.generate(plain.encode(PROMPTS), 8)
    # first-step logits are the last-position logits
    torch.testing.assert_close(f1, shared.logits(shared.encode(PROMPTS)), atol=1e-4, rtol=0)
    torch.testing.assert_close(f1, f0, atol=1e-4, rtol=0)
    assert all(isinstance(t, str) for t in t1)
    assert t1 == t0
    perm = _permutation(len(PROMPTS))
    tp, _ = shared.generate(shared.encode([PROMPTS[i] for i in perm]), 8)
    assert tp == [t1[i] for i in perm]


@pytest.mark.parametrize("family", [
    "qwen2", "llama", "gemma2"])
def test_prefix_sharing_long_prompts_match_plain_forward(family):
    """With a system prompt every prompt is longer than Gemma 2's 16-token window; sharing must stay exact."""
    lm = make_lm(family)
    fmt = ChatFormat(lm.tokenizer, system="you are good")
    shared = runner(lm, fmt, batch_size=8)
    enc = shared.encode(PROMPTS)
    sliding = family == "gemma2"  # the Runner never shares a prefix where a sliding window could be reached
    assert (enc.prefix_len > 0) != sliding and min(len(x) for x in enc.ids) > 16
    got = shared.logits(enc)
    ref = torch.stack([hf_forward(lm.model, ids).logits[0, -1] for ids in enc.ids])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_generate_matches_unpadded_hf_generate(tiny):
    """Without prefix sharing, batched greedy generation equals Hugging Face generate on each lone prompt."""
    fmt = ChatFormat(tiny.tokenizer)
    plain = runner(tiny, fmt, batch_size=8, share_prefix=False)
    texts, _ = plain.generate(plain.encode(PROMPTS), 6)
    tok, model = tiny.tokenizer, tiny.model
    for p, t in zip(PROMPTS, texts):
        ids = torch.tensor([fmt.encode([p])[0]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=model.generation_config.eos_token_id)
        assert t == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# ------------------------------------------------------------------- 3. activations vs output_hidden_states
def test_collect_equals_hidden_states(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    enc = r.encode(PROMPTS)
    positions = list(range(-min_len(fmt), 0))  # every position of the shortest prompt
    acts = r.collect(enc, ALL_LAYERS, ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"], positions)
    pos_t = torch.tensor(positions)
    for i, ids in enumerate(fmt.encode(PROMPTS)):
        hs = hf_forward(tiny.model, ids, output_hidden_states=True).hidden_states
        assert len(hs) == N_LAYERS + 1
        for l in ALL_LAYERS:
            torch.testing.assert_close(acts["resid_pre"][i, l], hs[l][0, pos_t], atol=1e-4, rtol=0)
            if l < N_LAYERS - 1:  # the last hidden state is after the final norm
                torch.testing.assert_close(acts["resid_post"][i, l], hs[l + 1][0, pos_t], atol=1e-4, rtol=0)
    torch.testing.assert_close(acts["resid_mid"], acts["resid_pre"] + acts["attn_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts["resid_post"], acts["resid_mid"] + acts["mlp_out"], atol=1e-5, rtol=0)
    # the sub-block outputs are not trivially zero
    assert acts["attn_out"].abs().amax() > 1e-2 and acts["mlp_out"].abs().amax() > 1e-2


def test_collect_layer_order_and_negative_layers(tiny):
    r = runner(tiny)
    enc = r.encode(PROMPTS[:3])
    a = r.collect(enc, [3, 1], ["resid_pre"], [-1, -3])["resid_pre"]
    b = r.collect(enc, [-3, -1], ["resid_pre"], [-3, -1])["resid_pre"]  # layers 1, 3
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(a[:, i, j], b[:, 1 - i, 1 - j], atol=1e-6, rtol=0)
    assert (a[:, 0] - a[:, 1]).abs().max() > 1e-3 and (a[:, :, 0] - a[:, :, 1]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- 4. sums and diff-in-means
def test_reduce_sum_and_diff_in_means(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    pos = fmt.post_positions()
    harmful, harmless = PROMPTS[:5], PROMPTS[5:]
    ea, eb = r.encode(harmful), r.encode(harmless)
    full_a = r.collect(ea, ALL_LAYERS, ["resid_pre", "mlp_out"], pos)
    sum_a = r.collect(ea, ALL_LAYERS, ["resid_pre", "mlp_out"], pos, reduce="sum")
    for s in ("resid_pre", "mlp_out"):
        assert sum_a[s].dtype == torch.float64 and sum_a[s].shape == (N_LAYERS, len(pos), D_MODEL)
        torch.testing.assert_close(sum_a[s], full_a[s].double().sum(0), atol=1e-9, rtol=1e-12)
    full_b = r.collect(eb, ALL_LAYERS, ["resid_pre"], pos)["resid_pre"]
    sum_b = r.collect(eb, ALL_LAYERS, ["resid_pre"], pos, reduce="sum")["resid_pre"]
    d = diff_in_means(sum_a["resid_pre"], len(harmful), sum_b, len(harmless))
    expected = full_a["resid_pre"].double().mean(0) - full_b.double().mean(0)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, expected, atol=1e-9, rtol=1e-9)
    with pytest.raises(ToolkitError):
        diff_in_means(sum_a["resid_pre"], 0, sum_b, 3)


def test_build_candidates_is_diff_in_means_of_kept_prompts(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    harmful, harmless = PROMPTS[:4], PROMPTS[4:]
    eh, eb = r.encode(harmful), r.encode(harmless)
    pos = fmt.post_positions()
    ah = r.collect(eh, ALL_LAYERS, ["resid_pre"], pos)["resid_pre"].double()
    ab = r.collect(eb, ALL_LAYERS, ["resid_pre"], pos)["resid_pre"].double()

    cands = build_candidates(r, eh, eb, [0], filter_by="none")
    assert cands.layers == ALL_LAYERS and cands.positions == pos
    assert cands.harmful_kept == [0, 1, 2, 3] and cands.harmless_kept == [0, 1, 2, 3]
    torch.testing.assert_close(cands.dirs, ah.mean(0) - ab.mean(0), atol=1e-6, rtol=0)

    # score filter: harmful prompts with score > 0, harmless with score < 0. Pick a refusal-token set that
    # splits the prompts so the filter is actually exercised.
    lh, lb = r.logits(eh), r.logits(eb)
    vocab = lh.shape[1]
    for k in range(1, vocab):
        ids = list(range(k))
        kh = np.flatnonzero(refusal_score(lh, ids).numpy() > 0)
        kb = np.flatnonzero(refusal_score(lb, ids).numpy() < 0)
        if 0 < len(kh) < len(harmful) or 0 < len(kb) < len(harmless):
            if len(kh) and len(kb):
                break
    else:
        pytest.fail("no refusal-token set splits the prompts")
    c2 = build_candidates(r, eh, eb, ids, filter_by="score", layers=[2, 0], positions=[-1, -4])
    assert c2.layers == [0, 2] and c2.positions == [-4, -1]
    assert c2.harmful_kept == kh.tolist() and c2.harmless_kept == kb.tolist()
    sel = ah[:, [0, 2]][:, :, [1, 4]]
    selb = ab[:, [0, 2]][:, :, [1, 4]]
    torch.testing.assert_close(c2.dirs, sel[kh].mean(0) - selb[kb].mean(0), atol=1e-6, rtol=0)
    with pytest.raises(ToolkitError):
        build_candidates(r, eh, eb, ids, filter_by="none", positions=[-6])


# ------------------------------------------------------------------------------- 5. directional ablation
def _rel_proj(x: torch.Tensor, d_hat: torch.Tensor) -> torch.Tensor:
    """|x . d_hat| / ||x|| along the last axis."""
    x = x.double()
    return (x @ d_hat.double()).abs() / x.norm(dim=-1).clamp(min=1e-12)


def test_directional_ablation_zero_projection_everywhere(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    enc = r.encode(PROMPTS)
    positions = list(range(-min_len(fmt), 0))
    d = random_direction()
    d_hat = unit(d)
    clean = r.collect(enc, ALL_LAYERS, list(SITES), positions)
    for s in SITES:  # the direction is really present before ablation
        assert _rel_proj(clean[s], d_hat).max() > 1e-2
    with directional_ablation(tiny.model, d):
        abl = r.collect(enc, ALL_LAYERS, list(SITES), positions)
    for s in SITES:
        assert abl[s].shape == (len(PROMPTS), N_LAYERS, len(positions), D_MODEL)
        assert abl[s].norm(dim=-1).min() > 1e-3
        assert _rel_proj(abl[s], d_hat).max() < 1e-4, s


def test_directional_ablation_hooks_removed(tiny):
    model = tiny.model
    r = runner(tiny)
    enc = r.encode(PROMPTS[:4])
    assert n_hooks(model) == 0
    before = r.logits(enc)
    d = random_direction(2, scale=0.01)
    with directional_ablation(model, d):
        assert n_hooks(model) == 3 * N_LAYERS
        during = r.logits(enc)
    assert n_hooks(model) == 0
    assert (during - before).abs().max() > 1e-3
    torch.testing.assert_close(r.logits(enc), before, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="boom"):
        with directional_ablation(model, d):
            r.logits(enc)
            raise RuntimeError("boom")
    assert n_hooks(model) == 0
    # an error raised inside a forward pass (a hook of ours) also leaves nothing behind
    with pytest.raises(ToolkitError):
        with directional_ablation(model, d):
            r.collect(enc, [0], ["resid_pre"], [-50])
    assert n_hooks(model) == 0
    # a bad layer list fails before anything is left registered
    with pytest.raises(ToolkitError):
        with directional_ablation(model, d, layers=[0, 1, 99]):
            pass
    assert n_hooks(model) == 0
    torch.testing.assert_close(r.logits(enc), before, atol=0, rtol=0)


def test_z_hook_is_o_proj_input_and_per_spec_write(tiny):
    """``z`` reads the input of ``o_proj`` ([batch, pos, n_heads * head_dim]): ``attn_out`` is o_proj(z), passed
    through the post-attention norm on Gemma 2; writing zeros at z makes attn_out that of a zero input; the
    fourth spec item overrides ``write``; every hook is gone afterwards, also after a bad layer."""
    model = tiny.model
    block = decoder_layers(model)[1]
    after = block.post_attention_layernorm if has_post_norms(model) else (lambda x: x)
    o_proj = block.self_attn.o_proj
    r = runner(tiny)
    enc = r.encode(PROMPTS[:3])
    seen = {}

    def grab(name):
        def fn(x, ctx):
            seen[name] = x.detach().clone()
        return fn

    with torch.no_grad():
        with hooked(model, [("z", 1, grab("z"), False), ("attn_out", 1, grab("attn"))], write=True):
            r.logits(enc)
        assert n_hooks(model) == 0
        assert seen["z"].shape[-1] == o_proj.in_features
        torch.testing.assert_close(after(o_proj(seen["z"])), seen["attn"], atol=1e-5, rtol=1e-5)

        with hooked(model, [("z", 1, lambda x, ctx: torch.zeros_like(x), True), ("attn_out", 1, grab("attn0"), False)]):
            r.logits(enc)
        assert n_hooks(model) == 0
        torch.testing.assert_close(seen["attn0"], after(o_proj(torch.zeros_like(seen["z"]))), atol=1e-6, rtol=0)
    assert seen["attn"].abs().max() > 1e-3
    with pytest.raises(ToolkitError, match="out of range"):
        with hooked(model, [("z", 0, grab("z")), ("z", 99, grab("z"))]):
            pass
    assert n_hooks(model) == 0


def test_directional_ablation_applies_to_generated_tokens(tiny):
    model = tiny.model
    r = runner(tiny, batch_size=4)
    enc = r.encode(PROMPTS)
    d = random_direction(5)
    d_hat = unit(d)
    seen = {"generate": [], "prompt": []}

    def grab(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        if current_pass().phase in seen:
            seen[current_pass().phase].append(x.detach().clone())

    h = decoder_layers(model)[-1].register_forward_hook(grab)
    try:
        with directional_ablation(model, d):
            r.generate(enc, 5)
        gen_abl = torch.cat([x.reshape(-1, D_MODEL) for x in seen["generate"]])
        prompt_abl = torch.cat([x.reshape(-1, D_MODEL) for x in seen["prompt"]])
        seen["generate"].clear()
        r.generate(enc, 5)
        gen_clean = torch.cat([x.reshape(-1, D_MODEL) for x in seen["generate"]])
    finally:
        h.remove()
    assert all(x.shape[1] == 1 for x in seen["generate"])  # one new token per decode step
    assert len(gen_abl) >= len(PROMPTS)  # at least one decode step per prompt
    assert _rel_proj(gen_abl, d_hat).max() < 1e-4
    assert _rel_proj(prompt_abl, d_hat).max() < 1e-4
    assert _rel_proj(gen_clean, d_hat).max() > 1e-2


def test_ablation_restricted_layers(tiny):
    """layers=[2]: earlier layers untouched; block 2 (input and both writes) ablated; block 3 writes it again."""
    r = runner(tiny)
    enc = r.encode(PROMPTS[:4])
    d = random_direction(6)
    sites = ["resid_pre", "attn_out", "resid_post"]
    clean = r.collect(enc, ALL_LAYERS, sites, [-2, -1])
    with directional_ablation(tiny.model, d, layers=[2]):
        abl = r.collect(enc, ALL_LAYERS, sites, [-2, -1])
    for s in sites:
        torch.testing.assert_close(abl[s][:, :2], clean[s][:, :2], atol=1e-6, rtol=0)
        assert _rel_proj(abl[s][:, 2], unit(d)).max() < 1e-4
    assert _rel_proj(abl["resid_pre"][:, 3], unit(d)).max() < 1e-4  # = resid_post of block 2
    assert _rel_proj(abl["attn_out"][:, 3], unit(d)).max() > 1e-3
    assert _rel_proj(abl["resid_post"][:, 3], unit(d)).max() > 1e-3


# -------------------------------------------------------------------------- 6. weight orthogonalization
def test_orthogonalize_weights_matches_ablation(tiny, family):
    model = tiny.model
    fmt = ChatFormat(tiny.tokenizer)
    d = random_direction(7, scale=0.2)
    d_hat = unit(d).double()
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    edited = copy.deepcopy(model)
    res = orthogonalize_weights(edited, d)

    tied = family in ("qwen2", "gemma2")
    assert res["untied_lm_head"] is tied
    assert res["exact_equivalent"] is (family != "gemma2")
    assert edited.config.tie_word_embeddings is False
    assert edited.get_output_embeddings().weight is not edited.get_input_embeddings().weight
    torch.testing.assert_close(edited.get_output_embeddings().weight, head0, atol=0, rtol=0)
    if tied:
        torch.testing.assert_close(edited.get_output_embeddings().weight, emb0, atol=0, rtol=0)
    # the original model is untouched
    torch.testing.assert_close(model.get_input_embeddings().weight, emb0, atol=0, rtol=0)

    e = edited.get_input_embeddings().weight.double()
    assert ((e @ d_hat).abs() / e.norm(dim=-1)).max() < 1e-5
    # only the residual direction was removed from the embedding
    torch.testing.assert_close(e, emb0.double() - torch.outer(emb0.double() @ d_hat, d_hat), atol=1e-6, rtol=0)
    names = set(res["edited"])
    assert "embed_tokens.weight" in names
    for i, block in enumerate(decoder_layers(edited)):
        for name, lin in (("self_attn.o_proj", block.self_attn.o_proj), ("mlp.down_proj", block.mlp.down_proj)):
            w = lin.weight.double()  # [d_model, d_in]: columns write to the residual stream
            assert (d_hat @ w).abs().max() < 1e-5 * w.abs().max()
            assert f"layers.{i}.{name}.weight" in names

    if family == "gemma2":
        return
    with torch.no_grad():
        for ids in fmt.encode(PROMPTS):
            got = hf_forward(edited, ids).logits
            with directional_ablation(model, d):
                ref = hf_forward(model, ids).logits
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
            # and the intervention is not a no-op
            assert (hf_forward(model, ids).logits - ref).abs().max() > 1e-3


def test_orthogonalized_runner_logits_match_ablation():
    """Same equivalence through the Runner (batched, prefix-shared) on the tied Qwen2 model."""
    lm = make_lm("qwen2")
    d = random_direction(8)
    r = runner(lm, batch_size=3)
    enc = r.encode(PROMPTS)
    with directional_ablation(lm.model, d):
        ref = r.logits(enc)
    edited_lm = copy.copy(lm)
    edited_lm.model = copy.deepcopy(lm.model)
    orthogonalize_weights(edited_lm.model, d)
    torch.testing.assert_close(runner(edited_lm, batch_size=3).logits(enc), ref, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------- 7. activation addition
def test_activation_addition_only_at_chosen_layer_and_position(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    enc = r.encode(PROMPTS)
    pos = fmt.post_positions()
    v = random_direction(9, scale=1.3)
    a, l = 2.5, 2
    clean = r.collect(enc, ALL_LAYERS, ["resid_pre"], pos)["resid_pre"]
    with activation_addition(tiny.model, v, [l], alpha=a, positions=[-1]):
        steered = r.collect(enc, ALL_LAYERS, ["resid_pre"], pos)["resid_pre"]
    torch.testing.assert_close(steered[:, :l], clean[:, :l], atol=1e-6, rtol=0)
    torch.testing.assert_close(steered[:, l, -1], clean[:, l, -1] + a * v, atol=1e-5, rtol=0)
    torch.testing.assert_close(steered[:, :, :-1], clean[:, :, :-1], atol=1e-6, rtol=0)  # causality
    assert (steered[:, l + 1:, -1] - clean[:, l + 1:, -1]).abs().max() > 1e-3  # propagates downstream
    assert n_hooks(tiny.model) == 0


def test_activation_addition_all_positions(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    enc = r.encode(PROMPTS)
    positions = list(range(-min_len(fmt), 0))
    v = random_direction(10, scale=0.7)
    a, l = -1.5, 1
    clean = r.collect(enc, ALL_LAYERS, ["resid_pre"], positions)["resid_pre"]
    with activation_addition(tiny.model, v, [l], alpha=a):
        steered = r.collect(enc, ALL_LAYERS, ["resid_pre"], positions)["resid_pre"]
    torch.testing.assert_close(steered[:, :l], clean[:, :l], atol=1e-6, rtol=0)
    torch.testing.assert_close(steered[:, l], clean[:, l] + a * v, atol=1e-5, rtol=0)


def test_activation_addition_alpha_zero_and_shared_prefix(tiny):
    r = runner(tiny, batch_size=3)
    enc = r.encode(PROMPTS)
    assert (enc.prefix_len > 0) != (tiny.model.config.model_type == "gemma2")
    base = r.logits(enc)
    v = random_direction(11)
    with activation_addition(tiny.model, v, [0, 2], alpha=0.0):
        torch.testing.assert_close(r.logits(enc), base, atol=1e-6, rtol=0)
    # with positions=None the addition also reaches the shared prefix: same logits as without sharing
    plain = runner(tiny, batch_size=3, share_prefix=False)
    with activation_addition(tiny.model, v, [1], alpha=1.0):
        s, p = r.logits(enc), plain.logits(plain.encode(PROMPTS))
    torch.testing.assert_close(s, p, atol=1e-4, rtol=0)
    assert (s - base).abs().max() > 1e-3


# Regression: positions deeper than the per-prompt suffix used to fall into the shared prefix and be lost.


def test_activation_addition_deep_position_with_shared_prefix(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    shared = runner(tiny, fmt, batch_size=8)
    enc = shared.encode(PROMPTS)
    assert min(len(x) for x in enc.ids) >= 10  # -8 is a real token of every prompt
    v = random_direction(12)
    with activation_addition(tiny.model, v, [1], alpha=1.0, positions=[-8]):
        ref = torch.stack([hf_forward(tiny.model, ids).logits[0, -1] for ids in enc.ids])
        plain = runner(tiny, fmt, batch_size=8, share_prefix=False)
        torch.testing.assert_close(plain.logits(plain.encode(PROMPTS)), ref, atol=1e-4, rtol=0)  # passes
        got = shared.logits(enc)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_activation_addition_position_beyond_short_prompt_raises(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    plain = runner(tiny, fmt, batch_size=8, share_prefix=False)
    enc = plain.encode(PROMPTS)
    too_deep = -(min(len(x) for x in enc.ids) + 1)
    assert max(len(x) for x in enc.ids) >= -too_deep  # valid for the longest prompts, not for the shortest
    with activation_addition(tiny.model, random_direction(13), [1], positions=[too_deep]):
        with pytest.raises(ToolkitError):
            plain.logits(enc)


def test_capture_around_generate_equals_collect(tiny):
    fmt = ChatFormat(tiny.tokenizer)
    r = runner(tiny, fmt, batch_size=3)
    enc = r.encode(PROMPTS)
    pos = fmt.post_positions()
    ref = r.collect(enc, [0, 2, 3], ["resid_pre", "mlp_out"], pos)
    with r.capture(len(enc), [0, 2, 3], ["resid_pre", "mlp_out"], pos) as got:
        r.generate(enc, 4)
    for s in ("resid_pre", "mlp_out"):
        torch.testing.assert_close(got[s], ref[s], atol=1e-4, rtol=0)
    assert n_hooks(tiny.model) == 0


# ------------------------------------------------------------------------------------- 8. error paths
def test_error_paths(tiny):
    model = tiny.model
    r = runner(tiny)
    enc = r.encode(PROMPTS[:3])
    d = random_direction()

    with pytest.raises(ToolkitError):
        r.collect(enc, [0], ["resid_middle"], [-1])
    with pytest.raises(ToolkitError):
        add_hook(model, "hook_resid_pre", 0, lambda x, ctx: None)
    for layer in (99, -99, N_LAYERS, -N_LAYERS - 1):
        with pytest.raises(ToolkitError):
            r.collect(enc, [layer], ["resid_pre"], [-1])
        with pytest.raises(ToolkitError):
            add_hook(model, "resid_pre", layer, lambda x, ctx: None)
    for positions in ([0], [3], [-1, 0], []):
        with pytest.raises(ToolkitError):
            r.collect(enc, [0], ["resid_pre"], positions)
    with pytest.raises(ToolkitError):
        r.collect(enc, [0], ["resid_pre"], [-1], reduce="mean")

    for bad in (torch.randn(D_MODEL + 1), torch.randn(D_MODEL - 1), torch.randn(1, D_MODEL), torch.zeros(D_MODEL),
                torch.full((D_MODEL,), float("nan"))):
        with pytest.raises(ToolkitError):
            with directional_ablation(model, bad):
                pass
        with pytest.raises(ToolkitError):
            with activation_addition(model, bad, [0]):
                pass
        copy_model = copy.deepcopy(model)
        with pytest.raises(ToolkitError):
            orthogonalize_weights(copy_model, bad)
        # nothing was edited before the error
        torch.testing.assert_close(copy_model.get_input_embeddings().weight, model.get_input_embeddings().weight,
                                   atol=0, rtol=0)
    for positions in ([0], [-1, 2], []):
        with pytest.raises(ToolkitError):
            with activation_addition(model, d, [0], positions=positions):
                pass
    with pytest.raises(ToolkitError):
        with activation_addition(model, d, [99]):
            pass
    with pytest.raises(ToolkitError):
        with activation_addition(model, d, [0], site="resid"):
            pass
    with pytest.raises(ToolkitError):
        with hooked(model, [("resid_pre", 0, lambda x, ctx: None), ("nope", 0, lambda x, ctx: None)]):
            pass
    with pytest.raises(ToolkitError):
        r.encode([])
    with pytest.raises(ToolkitError):
        r.encode(["hello", "   "])
    with pytest.raises(ToolkitError):
        r.generate(enc, 0)
    assert n_hooks(model) == 0


# -------------------------------------------------------------------------------------------- 9. scoring
def test_refusal_score_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [10.0, -5.0, 0.3, 2.0, 40.0]])
    ids = [0, 3]
    got = refusal_score(logits, ids)
    assert got.dtype == torch.float64 and got.shape == (3,)
    for row, g in zip(logits.tolist(), got.tolist()):
        z = [math.exp(x - max(row)) for x in row]
        p = sum(z[i] for i in ids) / sum(z)
        assert g == pytest.approx(math.log(p + 1e-8) - math.log(1 - p + 1e-8), rel=1e-12, abs=1e-12)
    assert got[1].item() == pytest.approx(math.log(0.4 + 1e-8) - math.log(0.6 + 1e-8), rel=1e-12)


def test_kl_divergence():
    from scipy.stats import entropy

    a = torch.tensor([[0.1, 2.0, -1.0, 0.7], [3.0, 3.0, 3.0, 3.0]])
    b = torch.tensor([[1.0, 0.0, 0.5, -0.2], [0.0, 1.0, 2.0, 3.0]])
    assert torch.equal(kl_divergence(a, a), torch.zeros(2, dtype=torch.float64))
    got = kl_divergence(a, b)
    for i in range(2):
        p = torch.softmax(a[i].double(), -1).numpy()
        q = torch.softmax(b[i].double(), -1).numpy()
        assert got[i].item() == pytest.approx(float(entropy(p, q)), rel=1e-10, abs=1e-12)
    assert (got > 0).all()


@pytest.mark.parametrize("text, expected", [
    ("I'm sorry, but I can't", True),
    ("**I CAN\u2019T** help", True),
    ("", False),  # markers-2: an empty answer is "other" (degenerate), not a refusal
    ("   \n ", False),
    ("As an AI, I must decline.", True),
    ("Sure, here is", False),
    ("Here is a story about a cat.", False),
])
def test_is_refusal(text, expected):
    assert is_refusal(text) is expected


def test_refusal_token_ids(tiny):
    tok = tiny.tokenizer
    got = refusal_token_ids(tok)
    expected = sorted({tok(p, add_special_tokens=False)["input_ids"][0] for p in ("I'm sorry", "I cannot", "As an AI")})
    assert got == expected
    assert all(type(i) is int for i in got)
    assert refusal_token_ids(tok, ("sorry", "help", "sorry")) == sorted(
        {tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("help")})
    with pytest.raises(ValueError):
        refusal_token_ids(tok, ("",))


# ---------------------------------------------------------------------------------------------- 10. stats
def test_rate_ci():
    from statsmodels.stats.proportion import proportion_confint

    r, lo, hi = rate_ci(5, 10)
    elo, ehi = proportion_confint(5, 10, alpha=0.05, method="wilson")
    assert r == 0.5 and lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    assert 0 < lo < 0.5 < hi < 1
    assert all(math.isnan(x) for x in rate_ci(0, 0))
    r, lo, hi = rate_ci(0, 7)
    assert r == 0 and lo == pytest.approx(0, abs=1e-12) and hi > 0
