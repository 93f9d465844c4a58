"""Activation patching (``toolkit/patching.py`` and ``refusal patch``) on the tiny Qwen2, Llama and Gemma 2 models of
conftest.py, which have 4 query heads and 2 key/value heads (grouped-query attention).

Exactness checks compare patched passes with independent computations: the clean and corrupted runs themselves,
plain full forward passes, attention-output patches and ``o_proj`` applied by hand.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_lm
from test_cli import assert_ok, assert_usage_error, entries, invoke, save_tiny
from toolkit.errors import ToolkitError
from toolkit.hooks import SITES, decoder_layers
from toolkit.patching import (Component, capture, head_components, head_layout, head_outputs, normalised_effect,
                              pair_by_length, parse_sites, patched_logits, patching, run_patching, site_components)
from toolkit.runner import Runner
from toolkit.scoring import refusal_score
from toolkit.templates import ChatFormat

IDS = [3, 4]  # "refusal" token ids for the tiny models: any fixed pair of tokens serves
N_LAYERS = 4
# pairs of equal word (= token) count with the in-memory word-level tokenizers; caller order is not length order
CLEAN = ["how do i make a bomb", "hack computer", "steal a car please"]
CORRUPT = ["tell me story about a cat", "bake bread", "write a poem please"]
# one length only, for patches at every position of the prompt
CLEAN4 = ["how do i kill", "steal a car please", "hack computer please explain"]
CORRUPT4 = ["write a poem please", "tell me a story", "bake good bread please"]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def runner(lm, batch_size: int = 2) -> Runner:
    return Runner(lm, ChatFormat(lm.tokenizer), batch_size=batch_size, progress=False)


def scores(logits: torch.Tensor) -> np.ndarray:
    return refusal_score(logits, IDS).numpy()


# --------------------------------------------------------------------------------------------- pairing
def test_pairing_takes_nearest_unused_length_in_file_order():
    pairs, dropped = pair_by_length([5, 7, 6, 9], [6, 5, 5, 8], max_len_diff=0)
    assert [(p.harmful, p.harmless) for p in pairs] == [(0, 1), (2, 0)] and dropped == 2
    assert all(p.harmful_len == p.harmless_len for p in pairs)
    # within one token: 7 ties between 6 and 8 -> the earlier harmless prompt; 6 then takes the other 5
    pairs, dropped = pair_by_length([5, 7, 6, 9], [6, 5, 5, 8], max_len_diff=1)
    assert [(p.harmful, p.harmless) for p in pairs] == [(0, 1), (1, 0), (2, 2), (3, 3)] and dropped == 0
    assert [p.harmless_len for p in pairs] == [5, 6, 5, 8]
    pairs, _ = pair_by_length([5, 7, 6, 9], [6, 5, 5, 8], max_len_diff=1, max_pairs=2)
    assert len(pairs) == 2
    with pytest.raises(ToolkitError, match="no harmful prompt has a harmless partner within 0"):
        pair_by_length([5, 6], [7, 8])
    with pytest.raises(ToolkitError, match="empty"):
        pair_by_length([], [5])
    with pytest.raises(ToolkitError, match="max_len_diff: must be >= 0"):
        pair_by_length([5], [5], max_len_diff=-1)


# ------------------------------------------------------------------------------------------- exactness
def test_full_patch_recovers_the_clean_score_and_an_identical_patch_nothing(tiny):
    r = runner(tiny)
    clean, corrupt = r.encode(CLEAN4), r.encode(CORRUPT4)
    n_tok = len(clean.ids[0])
    assert {len(x) for x in clean.ids + corrupt.ids} == {n_tok}
    every = tuple(range(-n_tok, 0))
    sites = {s: list(range(N_LAYERS)) for s in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")}
    lc, ac = capture(r, clean, sites, every)
    lx, ax = capture(r, corrupt, sites, every)
    sc, sx = scores(lc), scores(lx)
    assert np.abs(sc - sx).min() > 1e-3  # the two runs differ for every pair
    for site in ("resid_pre", "resid_mid", "resid_post"):
        for layer in range(N_LAYERS):
            c = Component(site, layer, every)
            den = scores(patched_logits(r, corrupt, [c], [ac.get(site, layer, every)])[0])
            noi = scores(patched_logits(r, clean, [c], [ax.get(site, layer, every)])[0])
            np.testing.assert_allclose(den, sc, atol=1e-4, err_msg=f"denoise {site} L{layer}")
            np.testing.assert_allclose(noi, sx, atol=1e-4, err_msg=f"noise {site} L{layer}")
            assert normalised_effect(den[None], sc, sx, 0)["normalised"][0] == pytest.approx(1, abs=1e-4)
            assert normalised_effect(noi[None], sc, sx, 0)["normalised"][0] == pytest.approx(0, abs=1e-4)
    # the embedding plus every attention and MLP output, patched together, rebuild the clean run
    comps = [Component("resid_pre", 0, every)] + [Component(s, l, every) for l in range(N_LAYERS)
                                                  for s in ("attn_out", "mlp_out")]
    with contextlib.ExitStack() as stack:
        for c in comps:
            stack.enter_context(patching(r, [c], [ac.get(c.site, c.layer, every)], len(CLEAN4)))
        np.testing.assert_allclose(scores(r.logits(corrupt)), sc, atol=1e-4)
    # the post-instruction tokens are the same in both prompts, so their embeddings are: patching them is a no-op
    post = tuple(r.fmt.post_positions())
    c = Component("resid_pre", 0, post)
    den = scores(patched_logits(r, corrupt, [c], [ac.get("resid_pre", 0, post)])[0])
    # same values, but a prefix-shared pass against a full one: float32 rounding order differs between CPU kernels
    # (AVX-512 vs AVX2), so allow 16 float32 ulps of the scores' magnitude
    np.testing.assert_allclose(den, sx, rtol=0, atol=16 * np.finfo(np.float32).eps * max(1.0, np.abs(sx).max()))
    assert normalised_effect(den[None], sc, sx, 0)["normalised"][0] == pytest.approx(0, abs=1e-5)


def test_stacked_context_passes_equal_plain_full_passes(tiny):
    r = runner(tiny, batch_size=2)  # several batches, sorted by length: rows are not in caller order
    clean, corrupt = r.encode(CLEAN), r.encode(CORRUPT)
    assert [len(x) for x in clean.ids] == [len(x) for x in corrupt.ids] and len({len(x) for x in clean.ids}) == 3
    comps = site_components(SITES, [0, 2, 3], [-3, -1]) + head_components([1, 3], 4, [-2, -1])
    comps.append(Component("z", 2, (-2, -1)))  # every head at once
    res = run_patching(r, clean, corrupt, comps, IDS, max_rows=4)  # 4 rows // batch 2: 2 components per pass
    # per direction: (3 layers x 2 depths) groups of 5 sites -> 6 x 3 passes; 2 layers x 4 heads -> 2 x 2; z -> 1
    assert res.n_passes == 2 * (18 + 4 + 1) and res.scores["denoise"].shape == (len(comps), 3)
    sites = {"resid_pre": [0, 2, 3], "resid_mid": [0, 2, 3], "resid_post": [0, 2, 3], "attn_out": [0, 2, 3],
             "mlp_out": [0, 2, 3], "z": [1, 2, 3]}
    lc, ac = capture(r, clean, sites, [-3, -2, -1])
    lx, ax = capture(r, corrupt, sites, [-3, -2, -1])
    np.testing.assert_allclose(res.clean, scores(lc), atol=1e-5)
    np.testing.assert_allclose(res.corrupt, scores(lx), atol=1e-5)
    lay = head_layout(tiny.model)
    for direction, target, src in (("denoise", corrupt, ac), ("noise", clean, ax)):
        vals = []
        for c in comps:
            v = src.get(c.site, c.layer, c.positions)
            vals.append(v[..., lay.head_slice(c.head)] if c.head is not None else v)
        plain = np.stack([scores(lg) for lg in patched_logits(r, target, comps, vals)])
        np.testing.assert_allclose(res.scores[direction], plain, atol=1e-4, err_msg=direction)
    # the last block's output at the last position fixes the logits: patching it swaps the runs exactly
    j = comps.index(Component("resid_post", 3, (-1,)))
    np.testing.assert_allclose(res.scores["denoise"][j], res.clean, atol=1e-4)
    np.testing.assert_allclose(res.scores["noise"][j], res.corrupt, atol=1e-4)


@pytest.mark.parametrize("crop", [True, False])
def test_contexts_for_shorter_depths_equal_fresh_contexts(tiny, crop, monkeypatch):
    from transformers import DynamicCache

    from toolkit.patching import _contexts_by_depth

    if not crop:  # a cache that cannot be cropped (e.g. a full sliding window): the tokens are run instead
        monkeypatch.setattr(DynamicCache, "crop", lambda self, n: (_ for _ in ()).throw(RuntimeError("no")))
    r = runner(tiny)
    enc = r.encode(CLEAN)
    ctxs = _contexts_by_depth(r, r.context(enc, 4), [1, 2, 4])
    assert sorted(ctxs) == [1, 2, 4]
    base = r.logits(enc)
    for k in (1, 2):
        assert ctxs[k].k == k
        torch.testing.assert_close(r.logits(enc, context=ctxs[k]), base, atol=1e-5, rtol=1e-5)
        v = torch.randn(3, 1, tiny.d_model, generator=torch.Generator().manual_seed(k)) * 3
        with patching(r, [Component("resid_pre", 1, (-k,))], [v], 3):
            cached, full = r.logits(enc, context=ctxs[k]), r.logits(enc)
        assert not torch.allclose(full, base, atol=1e-3)
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- heads
def test_heads_are_query_heads_with_their_kv_groups(tiny):
    lay = head_layout(tiny.model)
    cfg = tiny.model.config
    assert (lay.n_heads, lay.n_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert lay.n_heads * lay.head_dim == decoder_layers(tiny.model)[0].self_attn.o_proj.in_features
    assert [lay.kv_group(h) for h in range(4)] == [0, 0, 1, 1]
    assert len(head_components([0, 2], lay.n_heads, [-1])) == 8


def test_head_outputs_sum_to_o_proj_with_gqa(tiny):
    r = runner(tiny)
    enc = r.encode(CLEAN)
    _, acts = capture(r, enc, {"z": [1, 3]}, [-3, -2, -1])
    for layer in (1, 3):
        z = acts.get("z", layer, [-3, -2, -1])  # [n, 3, n_heads * head_dim]
        o_proj = decoder_layers(tiny.model)[layer].self_attn.o_proj
        per_head = head_outputs(tiny.model, layer, z)  # [n, 3, n_heads, d_model]
        assert per_head.shape == (3, 3, 4, tiny.d_model)
        bias = o_proj.bias if o_proj.bias is not None else 0
        with torch.no_grad():
            torch.testing.assert_close(per_head.sum(-2) + bias, o_proj(z), atol=1e-5, rtol=1e-5)
        lay = head_layout(tiny.model)
        w = o_proj.weight
        for h in range(4):  # one head alone: its z slice times its columns of W_O
            torch.testing.assert_close(per_head[..., h, :], z[..., lay.head_slice(h)] @ w[:, lay.head_slice(h)].T,
                                       atol=1e-5, rtol=1e-5)


def test_one_head_patch_replaces_only_that_heads_slice(tiny):
    r = runner(tiny)
    clean, corrupt = r.encode(CLEAN), r.encode(CORRUPT)
    pos = [-2, -1]
    _, ac = capture(r, clean, {"z": [2]}, [-3, -2, -1])
    _, ax = capture(r, corrupt, {"z": [2]}, [-3, -2, -1])
    lay = head_layout(tiny.model)
    for h in range(lay.n_heads):
        sl = lay.head_slice(h)
        c = Component("z", 2, tuple(pos), h)
        with patching(r, [c], [ac.get("z", 2, pos)[..., sl]], len(CLEAN)):
            _, seen = capture(r, corrupt, {"z": [2]}, [-3, -2, -1])  # registered after the patch: sees its result
        z, zc, zx = seen.get("z", 2, [-3, -2, -1]), ac.get("z", 2, [-3, -2, -1]), ax.get("z", 2, [-3, -2, -1])
        assert torch.equal(z[:, 1:, sl], zc[:, 1:, sl])  # the patched head at the patched positions: clean
        others = torch.ones(z.shape[-1], dtype=torch.bool)
        others[sl] = False
        assert torch.equal(z[:, 1:, others], zx[:, 1:, others])  # the other heads (same KV group too): corrupted
        assert torch.equal(z[:, 0], zx[:, 0])  # position -3 untouched
        assert not torch.equal(zc[:, 1:, sl], zx[:, 1:, sl])


def test_all_heads_together_equal_an_attn_out_patch(tiny):
    r = runner(tiny)
    clean, corrupt = r.encode(CLEAN), r.encode(CORRUPT)
    post = tuple(r.fmt.post_positions())
    _, ac = capture(r, clean, {"z": [1], "attn_out": [1]}, post)
    lay = head_layout(tiny.model)
    z = ac.get("z", 1, post)
    whole = patched_logits(r, corrupt, [Component("z", 1, post)], [z])[0]
    attn = patched_logits(r, corrupt, [Component("attn_out", 1, post)], [ac.get("attn_out", 1, post)])[0]
    torch.testing.assert_close(whole, attn, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(whole, r.logits(corrupt), atol=1e-3)
    with contextlib.ExitStack() as stack:  # each head patched by its own hook, all at once
        for h in range(lay.n_heads):
            stack.enter_context(patching(r, [Component("z", 1, post, h)], [z[..., lay.head_slice(h)]], len(CLEAN)))
        torch.testing.assert_close(r.logits(corrupt), whole, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ statistics
def test_normalised_effect_and_its_bootstrap():
    rng = np.random.default_rng(5)
    clean, corrupt = rng.normal(1, 1, 12), rng.normal(-3, 1, 12)
    patched = np.stack([clean, corrupt, 0.3 * clean + 0.7 * corrupt + rng.normal(0, 0.5, 12)])
    eff = normalised_effect(patched, clean, corrupt, n_boot=400, seed=3)
    assert eff["normalised"][0] == pytest.approx(1) and eff["normalised"][1] == pytest.approx(0, abs=1e-12)
    assert (eff["ci_low"][0], eff["ci_high"][0]) == pytest.approx((1, 1))
    assert (eff["ci_low"][1], eff["ci_high"][1]) == pytest.approx((0, 0), abs=1e-12)
    expect = (patched[2].mean() - corrupt.mean()) / (clean.mean() - corrupt.mean())
    assert eff["normalised"][2] == pytest.approx(expect) and float(eff["gap"]) == pytest.approx(clean.mean() - corrupt.mean())
    # the interval is the percentile interval of the ratio of resampled means, pairs resampled together
    idx = np.random.default_rng(3).integers(0, 12, size=(400, 12))
    ratios = [(patched[2, i].mean() - corrupt[i].mean()) / (clean[i].mean() - corrupt[i].mean()) for i in idx]
    assert (eff["ci_low"][2], eff["ci_high"][2]) == pytest.approx(tuple(np.percentile(ratios, [2.5, 97.5])))
    assert eff["ci_low"][2] < expect < eff["ci_high"][2]
    other = normalised_effect(patched, clean, corrupt, n_boot=400, seed=4)
    assert other["ci_low"][2] != eff["ci_low"][2]
    assert np.isnan(normalised_effect(patched, clean, corrupt, n_boot=0)["ci_low"]).all()


# ----------------------------------------------------------------------------------------- engine errors
def test_engine_refuses_bad_components(family):
    lm = make_lm(family)
    r = runner(lm)
    clean, corrupt = r.encode(CLEAN), r.encode(CORRUPT)
    with pytest.raises(ToolkitError, match="unknown hook site 'resid_side'"):
        parse_sites("resid_pre,resid_side")
    with pytest.raises(ToolkitError, match="no site"):
        parse_sites(" , ")
    for comp, needle in ((Component("resid_pre", 99, (-1,)), "layer 99 is out of range"),
                         (Component("z", 1, (-1,), 4), "head 4 is out of range"),
                         (Component("resid_side", 1, (-1,)), "unknown hook site"),
                         (Component("resid_pre", 1, (0,)), "negative"),
                         (Component("resid_pre", 1, (-40,)), "at least 41 tokens")):
        with pytest.raises(ToolkitError, match=needle):
            run_patching(r, clean, corrupt, [comp], IDS)
    with pytest.raises(ToolkitError, match="needs pairs"):
        run_patching(r, clean, r.encode(CORRUPT[:2]), [Component("resid_pre", 1, (-1,))], IDS)
    with pytest.raises(ToolkitError, match="direction"):
        run_patching(r, clean, corrupt, [Component("resid_pre", 1, (-1,))], IDS, ["sideways"])
    for comp, shape in ((Component("resid_pre", 1, (-2, -1)), (3, 1, lm.d_model)),
                        (Component("resid_pre", 1, (-1,)), (3, 1, 8)),
                        (Component("z", 1, (-1,), 2), (3, 1, 32))):  # one head is head_dim = 8 wide
        with pytest.raises(ToolkitError, match="shape"):
            with patching(r, [comp], [torch.zeros(shape)], 3):
                pass
    # nothing is left registered after the errors
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == 0


# ------------------------------------------------------------------------------------------------- CLI
# The tiny checkpoint's tokenizer, reloaded from its folder, keeps only "i", "a" and punctuation as tokens, so the
# CLI prompts are made of those; pairs are checked from pairs.csv against the reloaded tokenizer's lengths.
HARMFUL = ["i a .", "a ! i ?", "i , a", "? i a !"]
HARMLESS = ["a i ?", "a a ! i", "i . a", "! a a ?", "a . i . a . i"]
UNPAIRED = ["a", "i a . i a . i a"]


def write_jsonl(path: Path, prompts: list[str], prefix: str) -> Path:
    path.write_text("".join(json.dumps({"id": f"{prefix}-{i + 1:02d}", "prompt": p}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


@pytest.fixture(scope="module")
def patch_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("patch")
    return (save_tiny(base / "tiny-qwen2"), write_jsonl(base / "h.jsonl", HARMFUL, "h"),
            write_jsonl(base / "b.jsonl", HARMLESS, "b"), write_jsonl(base / "u.jsonl", UNPAIRED, "u"), base)


def patch_args(env, *extra):
    model, h, b, *_ = env
    return ["patch", "--model", model, "--harmful", h, "--harmless", b, "--quiet", "--batch-size", "3",
            "--bootstrap", "200", *extra]


def test_patch_cli_writes_a_tidy_run(patch_env, runs):
    model, *_ = patch_env
    out = assert_ok(invoke(patch_args(patch_env, "--layers", "0,3", "--sites", "resid_pre,attn_out,mlp_out,resid_post",
                                      "--top", "5", "--name", "p")))
    run = runs / "patch" / "p"
    files = {"results.csv", "summary.csv", "pairs.csv", "patch_denoise.png", "patch_noise.png", "heads_denoise.png",
             "heads_noise.png", "run.json"}
    assert files <= entries(run)
    for f in files:
        assert (run / f).stat().st_size > (1000 if f.endswith(".png") else 50), f
    # pairs: each harmful prompt in order with the first unused harmless prompt of equal formatted length
    from transformers import AutoTokenizer

    fmt = ChatFormat(AutoTokenizer.from_pretrained(str(model)))
    hl, bl = [len(x) for x in fmt.encode(HARMFUL)], [len(x) for x in fmt.encode(HARMLESS)]
    expected, used = [], set()
    for i, n in enumerate(hl):
        j = next((j for j, m in enumerate(bl) if m == n and j not in used), None)
        if j is not None:
            used.add(j)
            expected.append((f"h-{i + 1:02d}", f"b-{j + 1:02d}"))
    pairs = pd.read_csv(run / "pairs.csv")
    assert list(zip(pairs.harmful_id, pairs.harmless_id)) == expected and len(expected) >= 3
    assert (pairs.harmful_len == pairs.harmless_len).all() and (pairs.len_diff == 0).all()
    n = len(pairs)
    # tidy results: one row per direction x component x pair
    res = pd.read_csv(run / "results.csv")
    assert list(res.columns) == ["direction", "site", "layer", "position", "positions", "head", "kv_group",
                                 "component", "pair", "harmful_id", "harmless_id", "score", "clean_score",
                                 "corrupt_score"]
    n_pos = 8  # the 5 post-instruction positions and the last 8: -8..-1
    n_comp = 4 * 2 * n_pos + 2 * 4  # sites x layers x positions, layers x 4 query heads
    assert len(res) == 2 * n_comp * n and set(res.direction) == {"denoise", "noise"}
    heads = res[res.site == "z"]
    assert sorted(heads["head"].unique()) == [0, 1, 2, 3] and (heads.kv_group == heads["head"] // 2).all()
    assert heads.position.isna().all() and set(heads.positions) == {"-5,-4,-3,-2,-1"}
    assert res[res.site != "z"]["head"].isna().all()
    # summary: normalised from the means over pairs; the last block's output at the last position is a full patch
    summ = pd.read_csv(run / "summary.csv")
    assert len(summ) == 2 * n_comp
    full = summ[(summ.site == "resid_post") & (summ.layer == 3) & (summ.position == -1)].set_index("direction")
    assert full.loc["denoise", "normalised"] == pytest.approx(1, abs=1e-4)
    assert full.loc["noise", "normalised"] == pytest.approx(0, abs=1e-4)
    g = res[(res.direction == "denoise") & (res.component == "L0 attn_out p-2")]
    s = summ[(summ.direction == "denoise") & (summ.component == "L0 attn_out p-2")].iloc[0]
    assert s.normalised == pytest.approx((g.score.mean() - pairs.corrupt_score.mean())
                                         / (pairs.clean_score.mean() - pairs.corrupt_score.mean()))
    assert s.ci_low <= s.normalised <= s.ci_high and s.n_pairs == n
    noise = summ[summ.direction == "noise"]
    np.testing.assert_allclose(noise.effect, 1 - noise.normalised)
    meta = json.loads((run / "run.json").read_text())
    r = meta["results"]
    assert r["baseline"]["clean_mean"] == pytest.approx(pairs.clean_score.mean())
    assert r["heads"] == {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "positions": [-5, -4, -3, -2, -1]}
    assert len(r["top"]["denoise"]) == 5 and r["pairs"]["n"] == n and r["n_components"] == n_comp
    best = summ[summ.direction == "denoise"].sort_values("effect", ascending=False).iloc[0]
    assert r["top"]["denoise"][0]["component"] == best.component
    assert "top components" in out and best.component in out


def test_patch_cli_one_direction_without_heads(patch_env, runs):
    assert_ok(invoke(patch_args(patch_env, "--layers", "1", "--direction", "noise", "--no-heads", "--positions",
                                "-2,-1", "--name", "q")))
    run = runs / "patch" / "q"
    assert {"patch_noise.png", "summary.csv"} <= entries(run)
    assert not {"patch_denoise.png", "heads_noise.png"} & entries(run)
    summ = pd.read_csv(run / "summary.csv")
    assert set(summ.direction) == {"noise"} and set(summ.position) == {-2, -1} and set(summ.layer) == {1}
    assert len(summ) == 3 * 2


@pytest.mark.parametrize("extra, needle", [
    (["--sites", "resid_pre,resid_side"], "unknown hook site 'resid_side'"),
    (["--layers", "99"], "layer 99 is out of range"),
    (["--direction", "sideways"], "--direction"),
    (["--positions", "0"], "negative"),
    (["--positions", "-30"], "at least 31 tokens"),
    (["--pairs", "0"], "--pairs"),
    (["--max-len-diff", "-1"], "--max-len-diff"),
    (["--head-positions", "first"], "--head-positions: must be"),
])
def test_patch_cli_bad_input(patch_env, runs, extra, needle):
    assert_usage_error(invoke(patch_args(patch_env, *extra)), needle)
    assert not (runs / "patch").exists() or not any((runs / "patch").iterdir())


def test_patch_cli_sets_that_cannot_pair(patch_env, runs, tmp_path):
    model, h, b, u, base = patch_env
    assert_usage_error(invoke(["patch", "--model", model, "--harmful", h, "--harmless", u, "--quiet"]),
                       "no harmful prompt has a harmless partner within 0 token(s)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert_usage_error(invoke(["patch", "--model", model, "--harmful", h, "--harmless", empty, "--quiet"]),
                       "no prompts")
    assert not (runs / "patch").exists() or not any((runs / "patch").iterdir())
