"""lm-evaluation-harness adapter (toolkit.lm_eval_adapter): lm-eval's multiple-choice accuracy equals a hand
computation from plain forward passes, with and without hook interventions and after a weight edit; a missing
lm-eval and an unknown task are one-line ToolkitErrors.

The task is tests/data/lm_eval_tasks/tiny_mc.yaml: six items whose words are all in the tiny tokenizer's vocabulary.
Everything runs offline (the dataset is a local jsonl read by Hugging Face ``datasets``' json builder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# datasets reads these when it is imported (lm-eval imports it lazily, after this module is collected).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from conftest import make_lm
from toolkit.errors import ToolkitError
from toolkit.hooks import ActiveHooks, active_hooks
from toolkit.interventions import activation_addition, directional_ablation, orthogonalize_weights

TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK = "refusal_toolkit_tiny_mc"


@pytest.fixture
def lm_eval_ready(monkeypatch):
    """lm-eval importable (else skip), the working directory at the task folder (its data_files are relative), and
    progress bars off."""
    pytest.importorskip("lm_eval")
    monkeypatch.chdir(TASKS)
    monkeypatch.setenv("TQDM_DISABLE", "1")


def items() -> list[dict]:
    return [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines() if line.strip()]


@torch.no_grad()
def hand_loglikelihoods(lm) -> list[list[float]]:
    """Per item, per choice: summed log-probability (nats) of the choice's tokens after the question, from one
    unbatched ``lm.model(ids)`` pass per (question, choice). The continuation is ``" " + choice`` (lm-eval's default
    target delimiter); its tokens are those of ``question + " " + choice`` after the question's tokens."""
    tok = lm.tokenizer
    out = []
    for it in items():
        ctx = tok.encode(it["question"])
        row = []
        for choice in it["choices"]:
            whole = tok.encode(it["question"] + " " + choice)
            assert whole[:len(ctx)] == ctx and len(whole) > len(ctx)
            logp = torch.log_softmax(lm.model(torch.tensor([whole])).logits[0].double(), -1)
            row.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        out.append(row)
    return out


def hand_acc(lls: list[list[float]]) -> float:
    hits = [max(range(len(row)), key=row.__getitem__) == it["label"] for row, it in zip(lls, items())]
    return sum(hits) / len(hits)


def lm_eval_loglikelihoods(result) -> list[list[float]]:
    rows = sorted(result.samples[TASK], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in rows]


def run(lm, **kw):
    from toolkit.lm_eval_adapter import run_lm_eval

    return run_lm_eval(lm, [TASK], include_path=TASKS, batch_size=4, **kw)


def no_hooks_left(model) -> bool:
    return active_hooks(model) == ActiveHooks() and not any(
        m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma2"])
def test_acc_equals_hand_computation(lm_eval_ready, family):
    lm = make_lm(family)
    res = run(lm)
    hand = hand_loglikelihoods(lm)
    got = lm_eval_loglikelihoods(res)
    assert [len(r) for r in got] == [len(r) for r in hand]
    for g, h in zip(got, hand):
        assert g == pytest.approx(h, abs=1e-4)
    m = res.metrics[TASK]
    assert m["acc"] == hand_acc(hand)  # exact: a count over six items
    assert 0.0 <= m["acc_norm"] <= 1.0 and m["acc_stderr"] is not None and m["acc_stderr"] > 0
    assert res.n_samples == {TASK: 6} and res.tasks == [TASK] and res.limit is None
    d = res.describe()
    assert json.loads(json.dumps(d)) == d
    assert d["lm_eval_version"] and d["model_id"] == f"tiny-{family}" and d["intervention"] is False
    assert lm.tokenizer.padding_side == "left"  # HFLM restores what it changes


def test_limit_counts_items(lm_eval_ready):
    res = run(make_lm("qwen2"), limit=2)
    assert res.n_samples == {TASK: 2} and res.limit == 2 and len(res.samples[TASK]) == 2


def test_hook_intervention_is_active_during_eval_only(lm_eval_ready):
    lm = make_lm("qwen2")
    plain = hand_loglikelihoods(lm)
    v = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(1)) * 20

    res = run(lm, intervention=activation_addition(lm.model, v, layers=[1]))
    assert no_hooks_left(lm.model)
    assert res.intervention is True and res.describe()["intervention"] is True
    with activation_addition(lm.model, v, layers=[1]):
        steered = hand_loglikelihoods(lm)
    got = lm_eval_loglikelihoods(res)
    for g, h, p in zip(got, steered, plain):
        assert g == pytest.approx(h, abs=1e-4)
        assert max(abs(a - b) for a, b in zip(g, p)) > 1e-2  # the hooks changed the scores
    assert res.metrics[TASK]["acc"] == hand_acc(steered)
    assert hand_loglikelihoods(lm) == plain  # nothing left behind

    d = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2))
    res = run(lm, intervention=directional_ablation(lm.model, d))
    assert no_hooks_left(lm.model)
    with directional_ablation(lm.model, d):
        ablated = hand_loglikelihoods(lm)
    for g, h in zip(lm_eval_loglikelihoods(res), ablated):
        assert g == pytest.approx(h, abs=1e-4)


def test_position_addressed_intervention_is_refused(lm_eval_ready):
    lm = make_lm("qwen2")
    v = torch.ones(lm.d_model)
    with pytest.raises(ToolkitError, match="prompt positions"):
        run(lm, intervention=activation_addition(lm.model, v, layers=[1], positions=[-1]))
    assert no_hooks_left(lm.model)


def test_edited_weights_are_evaluated_as_edited(lm_eval_ready):
    lm = make_lm("qwen2")  # tied embeddings: the edit unties the LM head; HFLM's tie_weights() must not re-tie it
    info = orthogonalize_weights(lm.model, torch.randn(lm.d_model, generator=torch.Generator().manual_seed(3)))
    assert info["untied_lm_head"]
    head = lm.model.get_output_embeddings().weight.detach().clone()
    res = run(lm)
    assert torch.equal(lm.model.get_output_embeddings().weight, head)
    for g, h in zip(lm_eval_loglikelihoods(res), hand_loglikelihoods(lm)):
        assert g == pytest.approx(h, abs=1e-4)


def test_missing_lm_eval_is_a_toolkit_error(monkeypatch):
    from toolkit.lm_eval_adapter import run_lm_eval

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(ToolkitError) as e:
        run_lm_eval(make_lm("qwen2"), [TASK], include_path=TASKS)
    assert str(e.value) == "lm-evaluation-harness is not installed: pip install 'refusal-toolkit[lm-eval]'"


def test_unknown_task_is_a_one_line_toolkit_error(lm_eval_ready):
    from toolkit.lm_eval_adapter import run_lm_eval

    lm = make_lm("qwen2")
    d = torch.ones(lm.d_model)
    with pytest.raises(ToolkitError) as e:
        run_lm_eval(lm, [TASK, "no_such_task_xyz"], include_path=TASKS, intervention=directional_ablation(lm.model, d))
    msg = str(e.value)
    assert "no_such_task_xyz" in msg and TASK not in msg.split(":", 1)[1] and "\n" not in msg
    assert "Traceback" not in msg
    assert no_hooks_left(lm.model)


@pytest.mark.parametrize("kw, needle", [({"limit": 0}, "limit"), ({"batch_size": 0}, "batch_size"),
                                        ({"num_fewshot": -1}, "num_fewshot"), ({"include_path": "/no/such"}, "folder")])
def test_bad_arguments(kw, needle):
    from toolkit.lm_eval_adapter import run_lm_eval

    args = {"include_path": TASKS} | kw
    with pytest.raises(ToolkitError, match=needle):
        run_lm_eval(make_lm("qwen2"), [TASK], **args)
