"""The one evaluation path (toolkit/evaluation.py): a pass under an optional intervention, then pluggable measures.

Each built-in measure is checked against the function it wraps, computed independently; the intervention is open
during the pass only (so coherence is the unmodified model's), and a measure of one's own plugs in.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import PROMPTS
from toolkit.errors import ToolkitError
from toolkit.evaluation import (Coherence, Degeneration, Evaluation, KLFromBase, MarkerJudge, Measure, RefusalScore,
                                evaluate, judged)
from toolkit.hooks import ActiveHooks, active_hooks
from toolkit.interventions import activation_addition, directional_ablation
from toolkit.runner import Runner
from toolkit.scoring import is_degenerate, is_refusal, kl_divergence, refusal_score
from toolkit.templates import ChatFormat

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = [3, 4]


def runner(lm) -> Runner:
    return Runner(lm, ChatFormat(lm.tokenizer), batch_size=3, progress=False)


def vec(lm, seed=2, scale=4.0):
    return torch.randn(lm.d_model, generator=torch.Generator().manual_seed(seed)) * scale


def test_logits_pass_scores_and_skips_completion_measures(tiny):
    r = runner(tiny)
    enc = r.encode(PROMPTS)
    ev = evaluate(r, enc, [*judged(IDS), Degeneration(), Coherence()])
    assert set(ev.values) == {"score"}
    assert ev.completions is None and ev.tokens is None and ev.refusals is None and ev.get("coherence") is None
    assert np.array_equal(ev.scores, refusal_score(r.logits(enc), IDS).numpy())
    assert ev.scores.dtype == np.float64


def test_generation_pass_measures_equal_their_functions(tiny):
    """Scores from the generation's first step equal a logits pass under the same intervention; the judge and
    degeneration verdicts are those of the scoring functions; coherence is the UNMODIFIED model's likelihood of the
    steered completions (the intervention is closed before measures run), which differs from the steered model's."""
    r = runner(tiny)
    enc = r.encode(PROMPTS)
    v = vec(tiny)
    ev = evaluate(r, enc, [*judged(IDS), Degeneration(), Coherence()], gen_tokens=4,
                  intervention=activation_addition(tiny.model, v, [1], alpha=1.5))
    assert active_hooks(tiny.model) == ActiveHooks()
    with activation_addition(tiny.model, v, [1], alpha=1.5):
        steered = r.logits(enc)
        under = r.continuation_logprob(enc, ev.tokens)
    assert np.allclose(ev.scores, refusal_score(steered, IDS).numpy(), atol=1e-4)
    assert list(ev.refusals) == [is_refusal(t) for t in ev.completions] and ev.refusals.dtype == bool
    assert list(ev.get("degenerate")) == [is_degenerate(t) for t in ev.completions]
    plain = r.continuation_logprob(enc, ev.tokens)
    assert np.allclose(ev.get("coherence"), plain, equal_nan=True)
    finite = np.isfinite(plain)
    assert finite.any() and not np.allclose(plain[finite], under[finite])


def test_coherence_from_a_prompt_cache_equals_a_full_pass(tiny):
    r = runner(tiny)
    enc = r.encode(PROMPTS)
    ctx = r.context(enc, 1)
    a = evaluate(r, enc, [Coherence(ctx)], gen_tokens=3, intervention=directional_ablation(tiny.model, vec(tiny)))
    b = evaluate(r, enc, [Coherence()], gen_tokens=3, intervention=directional_ablation(tiny.model, vec(tiny)))
    assert a.tokens == b.tokens
    assert np.allclose(a.get("coherence"), b.get("coherence"), atol=1e-4, equal_nan=True)


def test_kl_from_base_and_context_passes(tiny):
    r = runner(tiny)
    enc = r.encode(PROMPTS)
    base = evaluate(r, enc, judged(IDS))
    same = evaluate(r, enc, [RefusalScore(tuple(IDS)), KLFromBase(base)])
    assert np.allclose(same.get("kl"), 0.0, atol=1e-9)
    v = vec(tiny)
    ctx = r.context(enc, 2, start_layer=1)
    steer = evaluate(r, enc, [KLFromBase(base)], context=ctx,
                     intervention=activation_addition(tiny.model, v, [1], alpha=2.0, positions=[-2, -1]))
    with activation_addition(tiny.model, v, [1], alpha=2.0, positions=[-2, -1]):
        full = r.logits(enc)
    assert np.allclose(steer.get("kl"), kl_divergence(base.logits, full).numpy(), atol=1e-4)
    assert (steer.get("kl") > 1e-6).all()
    with pytest.raises(ToolkitError, match="every position"):  # the context cannot serve this intervention
        evaluate(r, enc, judged(IDS), context=ctx, intervention=directional_ablation(tiny.model, v))
    assert active_hooks(tiny.model) == ActiveHooks()


def test_a_measure_of_ones_own_plugs_in(tiny):
    """A new measure (here: completion length in tokens) needs only a name, what it reads and ``compute``; it sees
    the values of measures listed before it, and is skipped without completions."""

    class Length(Measure):
        name = "length"
        needs = frozenset({"completions"})

        def compute(self, ev, runner, enc):
            assert "refusal" in ev.values
            return np.array([len(t) for t in ev.tokens])

    r = runner(tiny)
    enc = r.encode(PROMPTS[:4])
    ev = evaluate(r, enc, [*judged(IDS), Length()], gen_tokens=3)
    assert list(ev.get("length")) == [len(t) for t in ev.tokens] and max(ev.get("length")) <= 3
    assert "length" not in evaluate(r, enc, [*judged(IDS), Length()]).values


def test_bad_calls(tiny):
    r = runner(tiny)
    enc = r.encode(PROMPTS[:2])
    with pytest.raises(ToolkitError, match="two measures named 'score'"):
        evaluate(r, enc, [RefusalScore((3,)), RefusalScore((4,))])
    with pytest.raises(ToolkitError, match="gen_tokens must be >= 0"):
        evaluate(r, enc, judged(IDS), gen_tokens=-1)
    with pytest.raises(ToolkitError, match="no refusal scores"):
        _ = evaluate(r, enc, [MarkerJudge()]).scores
    with pytest.raises(ToolkitError, match="logits of both"):
        Evaluation(None).kl_from(Evaluation(torch.zeros(2, 5)))
