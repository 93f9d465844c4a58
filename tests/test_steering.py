"""Steering engine: alpha grids, positions, random controls, hash splits, Refusal Dial directions, the degeneration
judge, context caches (exact against full passes), continuation log-likelihoods, and steered evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import PROMPTS, make_lm
from toolkit.errors import ToolkitError
from toolkit.evaluation import Coherence, Degeneration, evaluate, judged
from toolkit.index_spec import PositionSpec
from toolkit.interventions import activation_addition, directional_ablation
from toolkit.runner import Runner
from toolkit.scoring import is_degenerate, refusal_score
from toolkit.steering import (dial_direction, direction_seed, hash_split, monotone_range, parse_alphas,
                              random_directions, scale_value)
from toolkit.templates import ChatFormat


# ------------------------------------------------------------------------------------------------ grids
def test_alpha_range_is_inclusive_and_exact():
    a = parse_alphas("-8:4:0.5")
    assert len(a) == 25 and a[0] == -8 and a[-1] == 4 and 0.0 in a
    assert parse_alphas("1:-1:-1") == [-1.0, 0.0, 1.0]
    assert parse_alphas("0:0.3:0.1") == [0.0, 0.1, 0.2, 0.3]
    assert parse_alphas("2, -1 ,0") == [-1.0, 0.0, 2.0]
    assert parse_alphas("3") == [3.0]


@pytest.mark.parametrize("spec, needle", [
    ("", "empty"), ("0:1:0", "must not be 0"), ("1:0:1", "goes away"), ("0:1:0.3", "does not divide"),
    ("a,b", "numbers"), ("1,1", "repeated"), ("nan", "finite"), ("0:inf:1", "finite"), ("0:1000:1", "at most"),
    ("1:2", "start:stop:step"),
])
def test_bad_alpha_grids(spec, needle):
    with pytest.raises(ToolkitError, match=needle):
        parse_alphas(spec)


def test_positions():  # steering.parse_positions became toolkit.index_spec.PositionSpec (parse, then resolve)
    post = [-5, -4, -3, -2, -1]
    assert PositionSpec.parse("all").resolve(post) is None
    assert PositionSpec.parse("last").resolve(post) == (-1,)
    assert PositionSpec.parse("post").resolve(post) == tuple(post)
    assert PositionSpec.parse("-3,-1").resolve(post) == (-3, -1)
    for bad in ("0", "1,-1", "first", ""):
        with pytest.raises(ToolkitError):
            PositionSpec.parse(bad)


# ------------------------------------------------------------------------------------------------ controls
def test_hash_split_is_stable_disjoint_and_seeded():
    ids = [f"p{i}" for i in range(400)]
    m = hash_split(ids, seed=0)
    assert np.array_equal(m, hash_split(ids, seed=0))
    # membership depends on the id only: reversing the order or dropping prompts does not move the others
    assert np.array_equal(hash_split(ids[::-1], 0), m[::-1])
    assert np.array_equal(hash_split(ids[:100], 0), m[:100])
    train = {i for i, t in zip(ids, m) if t}
    hold = {i for i, t in zip(ids, m) if not t}
    assert train.isdisjoint(hold) and train | hold == set(ids)
    assert 160 < len(train) < 240  # about half
    assert not np.array_equal(m, hash_split(ids, seed=1))
    assert hash_split(ids, 0, frac=0.25).sum() < m.sum()
    with pytest.raises(ToolkitError, match="unique"):
        hash_split(["a", "a"], 0)
    with pytest.raises(ToolkitError, match="fraction"):
        hash_split(ids, 0, frac=1.0)


def test_random_directions_are_reproducible_unit_and_orthogonal():
    a, sa = random_directions(5, 64, seed=3)
    b, sb = random_directions(5, 64, seed=3)
    assert torch.equal(a, b) and sa == sb
    assert torch.allclose(a.norm(dim=-1), torch.ones(5), atol=1e-6)
    c, _ = random_directions(3, 64, seed=3)
    assert torch.equal(a[:3], c)  # direction i does not depend on how many are drawn
    d, _ = random_directions(5, 64, seed=4)
    assert not torch.allclose(a, d)
    assert sa[2] == direction_seed(3, "random", 2)
    r = torch.randn(64)
    o, so = random_directions(4, 64, seed=3, orthogonal_to=r)
    cos = (o.double() @ (r.double() / r.double().norm())).abs()
    assert float(cos.max()) < 1e-6
    assert torch.allclose(o.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert so[0] != sa[0]
    with pytest.raises(ToolkitError):
        random_directions(2, 64, 0, orthogonal_to=torch.zeros(64))


def test_dial_direction_is_top_minus_bottom_mean():
    acts = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows [0,1], [2,3], ...
    scores = np.array([0.5, 3.0, -1.0, 2.0, -2.0, 0.0])
    d, top, bottom = dial_direction(acts, scores, 2)
    assert list(top) == [1, 3] and sorted(bottom) == [2, 4]
    expected = acts[[1, 3]].double().mean(0) - acts[[2, 4]].double().mean(0)
    assert torch.equal(d, expected)
    with pytest.raises(ToolkitError, match="k <= n/2"):
        dial_direction(acts, scores, 4)


def test_scales_and_monotone_range():
    assert scale_value("unit", 5.0, 20.0) == 1.0
    assert scale_value("raw", 5.0, 20.0) == 5.0
    assert scale_value("resid", 5.0, 20.0) == 20.0
    with pytest.raises(ToolkitError):
        scale_value("resid", 5.0, None)
    with pytest.raises(ToolkitError):
        scale_value("bogus", 5.0, 1.0)
    assert monotone_range([-2, -1, 0, 1, 2], [3, 1, 2, 4, 3]) == (-1.0, 1.0)
    assert monotone_range([-1, 0, 1], [0, 1, 2]) == (-1.0, 1.0)


@pytest.mark.parametrize("text, expected", [
    ("", True), ("ok", True), ("!!!!!!!!", True), ("aaaaaaaaab", True), ("hahahahaha", True),
    ("abcabcabcabcabc", True), ("... --- ...", True),
    ("I'm sorry, but I can't help with that.", False), ("Sure, here is a recipe for bread.", False),
    ("ha ha ha", False),
])
def test_degeneration_judge(text, expected):
    assert is_degenerate(text) is expected


# ------------------------------------------------------------------------------------------------ runner
@pytest.fixture(scope="module")
def qwen():
    lm = make_lm("qwen2")
    return lm, Runner(lm, ChatFormat(lm.tokenizer), batch_size=3, progress=False)


def test_alpha_zero_leaves_logits_unchanged(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(PROMPTS)
    base = r.logits(enc)
    v = torch.randn(tiny.d_model)
    for positions in (None, [-1], r.fmt.post_positions()):
        with activation_addition(tiny.model, v, [1], alpha=0.0, positions=positions):
            assert torch.equal(r.logits(enc), base)
    res = evaluate(r, enc, judged([3, 4]), intervention=activation_addition(tiny.model, v, [1], alpha=0.0))
    assert np.array_equal(res.scores, refusal_score(base, [3, 4]).numpy())


@pytest.mark.parametrize("start", [0, 2])
def test_context_cache_matches_full_passes(tiny, start):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(PROMPTS)
    post = r.fmt.post_positions()
    ctx = r.context(enc, len(post), start_layer=start)
    assert ctx.head_once  # the LM head alone reproduces the logits (Gemma 2: with soft-capping)
    base = r.logits(enc)
    assert torch.allclose(r.logits(enc, context=ctx), base, atol=1e-5)
    v = torch.randn(tiny.d_model) * 3
    for layer, positions in ((2, post), (3, [-1]), (2, [-2, -1])):
        for site in ("resid_pre", "attn_out", "resid_post"):
            with activation_addition(tiny.model, v, [layer], alpha=1.5, positions=positions, site=site):
                full = r.logits(enc)
                cached = r.logits(enc, context=ctx)
            assert not torch.allclose(full, base, atol=1e-3)
            assert torch.allclose(cached, full, atol=1e-5), (layer, positions, site)
    # the cache is not consumed by use
    assert torch.allclose(r.logits(enc, context=ctx), base, atol=1e-5)


def test_context_cache_refuses_what_it_cannot_serve(qwen):
    lm, r = qwen
    enc = r.encode(PROMPTS)
    ctx = r.context(enc, 2, start_layer=2)
    v = torch.randn(lm.d_model)
    with activation_addition(lm.model, v, [2], alpha=1.0):  # every position
        with pytest.raises(ToolkitError, match="every position"):
            r.logits(enc, context=ctx)
    with directional_ablation(lm.model, v):
        with pytest.raises(ToolkitError, match="every position"):
            r.logits(enc, context=ctx)
    with activation_addition(lm.model, v, [2], alpha=1.0, positions=[-3]):
        with pytest.raises(ToolkitError, match="beyond the context"):
            r.logits(enc, context=ctx)
    with activation_addition(lm.model, v, [1], alpha=1.0, positions=[-1]):
        with pytest.raises(ToolkitError, match="before the context's start layer"):
            r.logits(enc, context=ctx)
    with pytest.raises(ToolkitError, match="other prompts"):
        r.logits(r.encode(PROMPTS[:3]), context=ctx)
    with activation_addition(lm.model, v, [2], alpha=1.0, positions=[-1]):
        with pytest.raises(ToolkitError, match="without interventions"):
            r.context(enc, 2)
    with pytest.raises(ToolkitError, match="k >= 1"):
        r.context(enc, 0)
    # after the errors, the model is intact: no hook or skipped block is left behind
    assert torch.allclose(r.logits(enc, context=ctx), r.logits(enc), atol=1e-5)


def test_continuation_logprob_matches_direct_computation(qwen):
    lm, r = qwen
    enc = r.encode(PROMPTS[:4])
    texts, _, toks = r.generate(enc, 5, with_tokens=True)
    for t, ids in zip(texts, toks):
        assert lm.tokenizer.decode(ids, skip_special_tokens=True) == t
    conts = [[5, 6, 7], [8], [], [9, 10]]
    got = r.continuation_logprob(enc, conts)
    assert math.isnan(got[2])
    for i in (0, 1, 3):
        ids = torch.tensor([enc.ids[i] + conts[i]])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
        n, m = len(enc.ids[i]), len(conts[i])
        expected = np.mean([float(lp[n - 1 + j, conts[i][j]]) for j in range(m)])
        assert got[i] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ToolkitError, match="continuations"):
        r.continuation_logprob(enc, conts[:2])


def test_evaluate_with_generation_judges_and_scores(qwen):
    lm, r = qwen
    enc = r.encode(PROMPTS[:4])
    v = torch.randn(lm.d_model)
    res = evaluate(r, enc, [*judged([3]), Degeneration(), Coherence()], gen_tokens=4,
                   intervention=activation_addition(lm.model, v, [1], alpha=2.0, positions=[-1]))
    assert len(res.completions) == 4 and res.refusals.dtype == bool and res.get("degenerate").dtype == bool
    assert res.get("coherence").shape == (4,)
    # the score of a generating evaluation equals the score of a logits pass under the same steering
    with activation_addition(lm.model, v, [1], alpha=2.0, positions=[-1]):
        logits = r.logits(enc)
    assert np.allclose(res.scores, refusal_score(logits, [3]).numpy(), atol=1e-4)
    assert [is_degenerate(t) for t in res.completions] == list(res.get("degenerate"))


def test_continuation_logprob_from_a_prompt_cache_is_exact(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(PROMPTS)
    conts = [[5, 6, 7], [8], [], [9, 10], [11, 12, 13, 14], [5], [6, 6], [7]]
    ctx = r.context(enc, 1)
    plain = r.continuation_logprob(enc, conts)
    cached = r.continuation_logprob(enc, conts, context=ctx)
    assert np.isnan(cached[2]) and np.isnan(plain[2])
    assert np.allclose(np.delete(cached, 2), np.delete(plain, 2), atol=1e-4)
    with pytest.raises(ToolkitError, match="k = 1"):
        r.continuation_logprob(enc, conts, context=r.context(enc, 2))
    with activation_addition(tiny.model, torch.randn(tiny.d_model), [1], alpha=1.0, positions=[-1]):
        with pytest.raises(ToolkitError, match="unmodified"):
            r.continuation_logprob(enc, conts, context=ctx)


@pytest.mark.parametrize("method", ["geometric-median", "pca", "probe"])
def test_dial_direction_other_estimators_use_the_same_groups(method):
    from toolkit.estimators import estimate

    g = torch.Generator().manual_seed(11)
    acts = torch.randn(12, 5, generator=g)
    scores = np.arange(12, dtype=float)[::-1].copy()
    d, top, bottom = dial_direction(acts, scores, 4, method=method)
    assert top.tolist() == [0, 1, 2, 3] and bottom.tolist() == [8, 9, 10, 11]
    want = estimate(method, acts[:4], acts[8:]).directions
    torch.testing.assert_close(d, want)


def test_dial_direction_refuses_prompt_level_methods():
    with pytest.raises(ToolkitError, match="unknown estimator 'caa'"):
        dial_direction(torch.zeros(4, 3), np.zeros(4), 1, method="caa")
