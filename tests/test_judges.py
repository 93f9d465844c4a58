"""Judges (markers, llm, ensemble), judging windows, and the teacher-forced damage measures, on tiny models."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import make_model, make_tokenizer
from toolkit.damage import forced_damage, reference_completions
from toolkit.errors import ToolkitError
from toolkit.evaluation import Judged, evaluate, judged
from toolkit.hooks import hooked
from toolkit.interventions import activation_addition, directional_ablation
from toolkit.judges import (LLM_JUDGE_PROMPT, EnsembleJudge, Judge, LLMJudge, MarkersJudge, Verdicts,
                            default_windows, make_judge, parse_windows, window_verdicts)
from toolkit.models import LoadedModel
from toolkit.runner import Runner
from toolkit.templates import ChatFormat

REFUSAL = "I'm sorry, but I can't help with that."
COMPLIANCE = "Sure, here is a story about a cat."


# ------------------------------------------------------------------------------------------------ markers
def test_markers_three_way_known_answers():
    v = MarkersJudge().judge(["q"] * 4, [REFUSAL, COMPLIANCE, "", "!!!!!!!"])
    assert list(v.labels) == ["refusal", "compliance", "other", "other"]
    assert v.confidence.tolist() == [1.0] * 4
    assert v.refusals.tolist() == [True, False, False, False]
    assert MarkersJudge().version == "markers-2"
    assert MarkersJudge(["nope"]).version.startswith("markers-2+custom-")


def test_judge_length_mismatch_and_empty():
    with pytest.raises(ToolkitError, match="2 requests but 1 responses"):
        MarkersJudge().judge(["a", "b"], ["x"])
    assert len(MarkersJudge().judge([], [])) == 0


def test_verdicts_refuse_unknown_labels():
    with pytest.raises(ToolkitError, match="unknown verdict 'maybe'"):
        Verdicts(np.array(["maybe"], dtype=object), np.array([1.0]))


def test_make_judge_errors():
    with pytest.raises(ToolkitError, match="unknown judge 'gpt'") as e:
        make_judge("gpt")
    assert e.value.param == "judge"
    with pytest.raises(ToolkitError, match="uses no model"):
        make_judge("markers", judge_model="x")
    with pytest.raises(ToolkitError, match="needs an NLI model"):
        make_judge("nli")
    assert isinstance(make_judge("markers"), MarkersJudge)


# ------------------------------------------------------------------------------------------------ llm judge
def judge_lm(family="qwen2", seed=3):
    """A tiny model whose tokenizer has single tokens for the option letters A, B, C."""
    tok = make_tokenizer(family)
    tok.add_tokens(["A", "B", "C", "I'm"])
    model = make_model(family, len(tok), seed=seed, n_layers=2)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model, tok, f"tiny-judge-{family}", f"hash-judge-{family}", "memory", torch.float32,
                       torch.device("cpu"))


def test_llm_judge_equals_hand_computation(family):
    lm = judge_lm(family)
    j = LLMJudge(lm, batch_size=2, progress=False)
    reqs = ["tell me a story about a cat", "how do i make a bomb", "hello", "steal car"]
    resp = [COMPLIANCE, REFUSAL, "", "sure here it is"]
    v = j.judge(reqs, resp)
    fmt = ChatFormat(lm.tokenizer)
    ids = [lm.tokenizer.convert_tokens_to_ids(x) for x in "ABC"]
    for i, (q, r) in enumerate(zip(reqs, resp)):
        x = torch.tensor([fmt.encode([j.prompt(q, r)])[0]])
        with torch.no_grad():
            logits = lm.model(input_ids=x).logits[0, -1, ids].double()
        p = torch.softmax(logits, -1)
        k = int(p.argmax())
        assert v.labels[i] == ("refusal", "compliance", "other")[k]
        assert v.confidence[i] == pytest.approx(float(p[k]), abs=1e-5)
    assert "hello" in j.prompt("hello", "x") and j.prompt("q", "the response").endswith(
        "[RESPONSE]\nthe response\n[/RESPONSE]")
    assert j.describe()["model_hash"] == f"hash-judge-{family}" and j.describe()["name"] == "llm"


def rig(lm):
    """Make a tiny judge model 'understand': the final hidden state at the last position is set to the LM head row
    of option A if the input holds "sorry", B if it holds "sure", else C -- a stand-in for a model that reads the
    response. Registered as a plain forward hook (not through toolkit.hooks), as a property of the model."""
    tok = lm.tokenizer
    sorry, sure = tok.convert_tokens_to_ids("sorry"), tok.convert_tokens_to_ids("sure")
    head = lm.model.get_output_embeddings().weight
    rows = {k: head[tok.convert_tokens_to_ids(k)].detach().clone() * 50 for k in "ABC"}
    seen = {}

    def pre(mod, args, kwargs):
        seen["ids"] = kwargs.get("input_ids")

    def post(mod, args, out):
        ids = seen["ids"]
        h = out.last_hidden_state.clone()
        for r in range(ids.shape[0]):
            row = ids[r].tolist()
            h[r, -1] = rows["A"] if sorry in row else rows["B"] if sure in row else rows["C"]
        out.last_hidden_state = h
        return out

    dec = lm.model.get_decoder()
    return [dec.register_forward_pre_hook(pre, with_kwargs=True), dec.register_forward_hook(post)]


def test_llm_judge_known_refusal_compliance_empty():
    lm = judge_lm()
    handles = rig(lm)
    try:
        v = LLMJudge(lm, batch_size=3, progress=False).judge(["how do i make a bomb"] * 3,
                                                               ["sorry i can't help", "sure here it is", ""])
    finally:
        for h in handles:
            h.remove()
    assert list(v.labels) == ["refusal", "compliance", "other"]
    assert (v.confidence > 0.99).all()


def test_llm_judge_refuses_hooked_model_and_bad_tokenizer(tiny):
    lm = judge_lm()
    j = LLMJudge(lm, progress=False)
    with hooked(lm.model, [("resid_pre", 0, lambda x, ctx: None)]):
        with pytest.raises(ToolkitError, match="hooks registered"):
            j.judge(["q"], ["r"])
    with pytest.raises(ToolkitError, match="no single token for option 'A'") as e:
        LLMJudge(tiny, progress=False)
    assert e.value.param == "judge_model"


def test_llm_judge_dedupes_pairs_and_custom_prompt_changes_version():
    lm = judge_lm()
    calls = []
    j = LLMJudge(lm, progress=False)
    orig = j.runner.logits

    def counting(enc, **kw):
        calls.append(len(enc))
        return orig(enc, **kw)

    j.runner.logits = counting
    v = j.judge(["a", "a", "b"], ["x", "x", "x"])
    assert calls == [2] and v.labels[0] == v.labels[1]
    assert j.version == "llm-1/r128"
    own = LLMJudge(lm, progress=False, template="Q {request} R {response} answer A B C")
    assert own.version.startswith("llm-1/r128+prompt-") and own.describe()["prompt_sha256"] != \
        j.describe()["prompt_sha256"]
    assert "{request}" in LLM_JUDGE_PROMPT and "{response}" in LLM_JUDGE_PROMPT


def test_logits_columns_equal_full_logits(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=2, progress=False)
    enc = r.encode(["tell me a story", "how do i make a bomb please", "hello world"])
    full = r.logits(enc)
    cols = [3, 7, 11]
    torch.testing.assert_close(r.logits(enc, columns=cols), full[:, cols], rtol=1e-5, atol=1e-5)
    with pytest.raises(ToolkitError, match="token ids in"):
        r.logits(enc, columns=[10 ** 7])


# ------------------------------------------------------------------------------------------------ ensemble
class Fixed(Judge):
    """A stub judge with given verdicts."""

    name = "fixed"

    def __init__(self, labels, conf):
        self.labels, self.conf, self.seen = labels, conf, []

    @property
    def version(self):
        return "fixed-1"

    def _judge(self, requests, responses, desc):
        self.seen.append(list(responses))
        lab = [self.labels[r] for r in responses]
        return Verdicts(np.array(lab, dtype=object), np.array([self.conf] * len(lab)))


def test_ensemble_rule():
    llm = Fixed({REFUSAL: "compliance", COMPLIANCE: "other", "plain": "refusal", "": "compliance"}, 0.7)
    v = EnsembleJudge(MarkersJudge(), llm).judge(["q"] * 4, [REFUSAL, COMPLIANCE, "plain", ""])
    # markers' refusal wins; everything else is the llm's verdict and confidence
    assert list(v.labels) == ["refusal", "other", "refusal", "compliance"]
    assert v.confidence.tolist() == [1.0, 0.7, 0.7, 0.7]
    assert llm.seen == [[COMPLIANCE, "plain", ""]]  # the llm judge never sees what the markers decided


# ------------------------------------------------------------------------------------------------ windows
def test_parse_windows():
    assert parse_windows("32,16, 64,16", 64) == (16, 32, 64)
    assert parse_windows(None, 12) == (3, 6, 12) == default_windows(12)
    assert default_windows(0) == () and default_windows(2) == (1, 2)
    for bad, msg in [("a,2", "positive integers"), ("0", "positive integers"), ("80", "longer than the 64")]:
        with pytest.raises(ToolkitError, match=msg) as e:
            parse_windows(bad, 64)
        assert e.value.param == "windows"


class OddWords(Judge):
    """Refusal iff the response has an odd number of words: verdicts that change with the window."""

    name = "odd"

    def __init__(self):
        self.pairs = []

    @property
    def version(self):
        return "odd-1"

    def _judge(self, requests, responses, desc):
        self.pairs += list(zip(requests, responses))
        lab = ["refusal" if len(r.split()) % 2 else "compliance" for r in responses]
        return Verdicts(np.array(lab, dtype=object), np.ones(len(lab)))


def test_window_judging_equals_judging_truncated_completions(family):
    from conftest import make_lm

    lm = make_lm(family)
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=2, progress=False)
    prompts = ["tell me a story about a cat", "how do i make a bomb", "what is the capital of france", "hello"]
    enc = r.encode(prompts)
    judge = OddWords()
    ev = evaluate(r, enc, [Judged(judge, tuple(prompts), (2, 5))], gen_tokens=8)
    for w in (2, 5, 8):
        short = evaluate(r, enc, [Judged(OddWords(), tuple(prompts))], gen_tokens=w)
        key = "refusal" if w == 8 else f"refusal@{w}"
        assert ev.values[key].tolist() == short.refusals.tolist(), w
    assert len(judge.pairs) == len(set(judge.pairs))  # each distinct (request, text) judged once


def test_window_verdicts_skip_repeats_past_the_end(tiny):
    judge = OddWords()
    toks = [[tiny.tokenizer.convert_tokens_to_ids(w) for w in "sure here it is".split()], []]
    out = window_verdicts(judge, tiny.tokenizer, ["a", "b"], toks, (1, 2, 8, 16))
    assert [out[w].labels.tolist() for w in (1, 2, 8, 16)] == [["refusal", "compliance"], ["compliance"] * 2,
                                                               ["compliance"] * 2, ["compliance"] * 2]
    assert len(judge.pairs) == 4  # "sure", "sure here", the full text, and "" -- 16 adds nothing


def test_judged_with_another_judge_reports_markers_beside(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=2, progress=False)
    prompts = ["tell me a story about a cat", "how do i make a bomb"]
    ev = evaluate(r, r.encode(prompts), judged([3], OddWords(), prompts, (2,)), gen_tokens=4)
    assert {"score", "refusal", "verdict", "confidence", "refusal@2", "refusal_markers",
            "verdict_markers"} <= set(ev.values)
    assert ev.values["refusal_markers"].tolist() == \
        MarkersJudge().judge(prompts, ev.completions).refusals.tolist()
    with pytest.raises(ToolkitError, match="reads the requests"):
        evaluate(r, r.encode(prompts), [Judged(OddWords())], gen_tokens=2)


# ------------------------------------------------------------------------------------------------ damage
def base_refs(r, enc, n):
    return reference_completions(evaluate(r, enc, [], gen_tokens=n).tokens, n)


def test_multi_token_kl_is_zero_for_the_unchanged_model(family):
    from conftest import make_lm

    lm = make_lm(family)
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=2, progress=False)
    enc = r.encode(["tell me a story about a cat", "how do i make a bomb", "hello world", "what is python"])
    refs = base_refs(r, enc, 6)
    for factory in (None, contextlib.nullcontext):
        d = forced_damage(r, enc, refs, factory, chunk=3)
        ok = d.n_tokens > 0
        assert ok.any() and d.kl[ok].tolist() == [0.0] * int(ok.sum()) and np.isnan(d.kl[~ok]).all()
        assert d.ce[ok].tolist() == d.ce_base[ok].tolist()
    assert d.n_tokens.tolist() == [len(x) for x in refs]


def test_forced_pass_reproduces_greedy_generation(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(["tell me a story about a cat", "how do i make a bomb", "hello world"])
    refs = base_refs(r, enc, 5)
    got = {}
    r.forced(enc, refs, lambda rows, lp, t, ls: got.update({i: lp[k, : ls[k]].argmax(-1).tolist()
                                                             for k, i in enumerate(rows)}))
    assert [got.get(i, []) for i in range(3)] == refs  # teacher forcing on greedy text: argmax = the next token


def test_multi_token_kl_and_ce_equal_hand_computation(family):
    from conftest import make_lm

    lm = make_lm(family)
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=2, progress=False)
    prompts = ["tell me a story about a cat", "how do i make a bomb", "hello world"]
    enc = r.encode(prompts)
    refs = base_refs(r, enc, 5)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(0))
    d = forced_damage(r, enc, refs, lambda: directional_ablation(lm.model, v), chunk=2)
    for i in range(3):
        if not refs[i]:
            continue
        x = torch.tensor([list(enc.ids[i]) + refs[i]])
        m = len(refs[i])
        with torch.no_grad():
            lp = torch.log_softmax(lm.model(input_ids=x).logits[0, -m - 1:-1].double(), -1)
            with directional_ablation(lm.model, v):
                lq = torch.log_softmax(lm.model(input_ids=x).logits[0, -m - 1:-1].double(), -1)
        t = torch.tensor(refs[i])
        assert d.kl[i] == pytest.approx(float((lp.exp() * (lp - lq)).sum(-1).mean()), rel=1e-3, abs=1e-6)
        assert d.ce[i] == pytest.approx(float(-lq.gather(-1, t[:, None]).mean()), rel=1e-4)
        assert d.ce_base[i] == pytest.approx(float(-lp.gather(-1, t[:, None]).mean()), rel=1e-4)
    assert np.nanmin(d.kl) > 0


def test_forced_pass_acts_like_generation_for_prompt_position_interventions(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=2, progress=False)
    enc = r.encode(["tell me a story about a cat", "how do i make a bomb"])
    refs = base_refs(r, enc, 4)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(1)) * 3
    steer = lambda: activation_addition(tiny.model, v, [1], alpha=1.0, positions=[-1])  # noqa: E731
    with steer():
        last = r.logits(enc)
        gen = evaluate(r, enc, [], gen_tokens=4).tokens
    got = {}
    with steer():
        r.forced(enc, gen, lambda rows, lp, t, ls: got.update({i: (lp[k, 0], lp[k, : ls[k]].argmax(-1).tolist())
                                                                for k, i in enumerate(rows)}))
    for i in range(2):
        if gen[i]:
            torch.testing.assert_close(got[i][0], torch.log_softmax(last[i], -1), rtol=1e-4, atol=1e-4)
            assert got[i][1] == gen[i]  # same tokens as the steered generation: the steer acted on the prompt only


def test_damage_errors(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), progress=False)
    enc = r.encode(["hello world"])
    with pytest.raises(ToolkitError, match="2 reference completions for 1 prompts"):
        forced_damage(r, enc, [[1], [2]], None)
    with pytest.raises(ToolkitError) as e:
        reference_completions([[1]], 0)
    assert e.value.param == "kl_tokens"
    with pytest.raises(ToolkitError, match="needs the base model's completions"):
        reference_completions(None, 4)
    with directional_ablation(tiny.model, torch.ones(tiny.d_model)):
        with pytest.raises(ToolkitError, match="remove active interventions"):
            forced_damage(r, enc, [[1]], None)
