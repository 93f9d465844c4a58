"""Conditional activation steering (CAST, Lee et al. 2024): condition similarity, threshold calibration, the gated
activation addition (exact against unconditional and unsteered passes, prompt by prompt, through sorted batches,
context caches and generation), and ``refusal steer --condition`` end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import PROMPTS, make_lm
from toolkit.cast import Calibration, calibrate_threshold, condition_similarity, conditional_addition, gate_from
from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.interventions import activation_addition
from toolkit.runner import Encoded, Runner
from toolkit.templates import ChatFormat

MIXED = np.array([True, False, False, True, True, False, True, False])  # one gate per conftest.PROMPTS


@pytest.fixture(scope="module")
def qwen():
    lm = make_lm("qwen2")
    return lm, Runner(lm, ChatFormat(lm.tokenizer), batch_size=3, progress=False)


def _vec(seed=1, d=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g) * 3


# ------------------------------------------------------------------------------------------------ similarity
def test_similarity_equals_a_direct_computation(tiny):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(PROMPTS)
    c = Direction(_vec(), layer=2, site="resid_mid")
    post = r.fmt.post_positions()
    sims = condition_similarity(r, enc, c)
    assert sims.dtype == np.float64 and sims.shape == (len(PROMPTS),)
    with r.capture(len(PROMPTS), [2], ["resid_mid"], post) as acts:
        r.logits(enc)  # a full pass, no early stop
    h = acts["resid_mid"][:, 0].double().mean(1)
    cv = c.vector.double()
    expected = (h @ cv) / (h.norm(dim=-1) * cv.norm())
    assert np.allclose(sims, expected.numpy(), rtol=0, atol=1e-12)
    assert len(set(np.round(sims, 6))) > 1
    # last position only; an explicit layer overrides the direction's
    last = condition_similarity(r, enc, c, positions=[-1], layer=1, site="resid_pre")
    with r.capture(len(PROMPTS), [1], ["resid_pre"], [-1]) as acts:
        r.logits(enc)
    h1 = acts["resid_pre"][:, 0, 0].double()
    assert np.allclose(last, ((h1 @ cv) / (h1.norm(dim=-1) * cv.norm())).numpy(), rtol=0, atol=1e-12)


def test_similarity_stops_after_the_condition_layer(qwen):
    lm, r = qwen
    from toolkit.hooks import decoder_layers

    seen = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i, b in
               enumerate(decoder_layers(lm.model))]
    head = lm.model.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append("head"))
    try:
        condition_similarity(r, r.encode(PROMPTS), Direction(_vec(), layer=1, site="resid_post"))
    finally:
        for h in handles + [head]:
            h.remove()
    # the shared prefix is computed once through every block (its cache); then each of the three batches of
    # prompts stops right after block 1: no later block, no LM head
    assert seen.count(0) == seen.count(1) == 1 + 3
    assert seen.count(2) == seen.count(3) == 1 and "head" not in seen


def test_similarity_bad_input(qwen):
    lm, r = qwen
    enc = r.encode(PROMPTS)
    with pytest.raises(ToolkitError, match="d_model") as e:
        condition_similarity(r, enc, Direction(torch.randn(64), layer=1))
    assert e.value.param == "condition"
    with pytest.raises(ToolkitError, match="no layer") as e:
        condition_similarity(r, enc, Direction(_vec()))
    assert e.value.param == "layer"
    with pytest.raises(ToolkitError, match="out of range"):
        condition_similarity(r, enc, Direction(_vec(), layer=7))
    with pytest.raises(ToolkitError, match="unknown hook site"):
        condition_similarity(r, enc, _vec(), layer=1, site="z")


# ------------------------------------------------------------------------------------------------ threshold
def test_calibrate_separable_values_gives_the_midpoint():
    cal = calibrate_threshold([0.5, 0.9, 0.7], [0.1, -0.2, 0.3, 0.25])
    assert cal == Calibration(0.4, 1.0, 1.0, 0.0)
    assert gate_from([0.5, 0.9, 0.7], cal.threshold).all() and not gate_from([0.1, -0.2, 0.3], cal.threshold).any()


def test_calibrate_overlap_and_ties():
    # pos 0.2 sits among the negatives: best is 0.5 (TPR 2/3, FPR 0, bal 5/6) vs 0.15 (TPR 1, FPR 1/2, bal 3/4)
    cal = calibrate_threshold([0.2, 0.6, 0.8], [0.1, 0.3, 0.4, 0.0])
    assert cal.threshold == pytest.approx(0.5) and cal.balanced_accuracy == pytest.approx(5 / 6)
    assert cal.true_positive_rate == pytest.approx(2 / 3) and cal.false_positive_rate == 0.0
    # two equally good gaps: 0.2|0.3 and 0.5|0.6 both give bal 0.75; the higher threshold wins (fewest steered)
    cal = calibrate_threshold([0.3, 0.6], [0.2, 0.5])
    assert cal.balanced_accuracy == pytest.approx(0.75) and cal.threshold == pytest.approx(0.55)
    # positives below every negative: the best gate is to steer nothing... or everything; both 0.5, nothing wins
    cal = calibrate_threshold([0.0], [1.0])
    assert cal.threshold == float("inf") and cal.balanced_accuracy == 0.5
    # every value equal: one tie, nothing steered
    assert calibrate_threshold([0.5, 0.5], [0.5]).threshold == float("inf")


def test_calibrate_ties_between_gaps_take_the_higher():
    # thresholds 0.2 (TPR 1/2, FPR 0) and 0.1 (TPR 1, FPR 1/2) both give 0.75: gap 0.15..0.2 wins over 0.0..0.1
    cal = calibrate_threshold([0.1, 0.2], [0.0, 0.15])
    assert cal.threshold == pytest.approx(0.175) and cal.balanced_accuracy == pytest.approx(0.75)


@pytest.mark.parametrize("pos, neg, param", [([], [0.1], "sims_pos"), ([0.1], [float("nan")], "sims_neg")])
def test_calibrate_bad_input(pos, neg, param):
    with pytest.raises(ToolkitError) as e:
        calibrate_threshold(pos, neg)
    assert e.value.param == param


def test_nan_threshold_is_refused():
    with pytest.raises(ToolkitError, match="not a number"):
        gate_from([0.1], float("nan"))


# ------------------------------------------------------------------------------------------------ the gated hook
def _gated_logits(r, lm, enc, v, gate, **kw):
    with conditional_addition(lm.model, v, [2], alpha=1.5, gate=gate, **kw):
        return r.logits(enc)


@pytest.mark.parametrize("positions", [[-2, -1], None])
def test_open_and_closed_gates_equal_unconditional_and_unsteered(tiny, positions):
    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=3, progress=False)
    enc = r.encode(PROMPTS)
    v = _vec()
    sims = np.linspace(-1, 1, len(PROMPTS))
    plain = r.logits(enc)
    with activation_addition(tiny.model, v, [2], alpha=1.5, positions=positions):
        steered = r.logits(enc)
    assert not torch.allclose(plain, steered, atol=1e-3)
    opened = _gated_logits(r, tiny, enc, v, gate_from(sims, float("-inf")), positions=positions)
    closed = _gated_logits(r, tiny, enc, v, gate_from(sims, float("inf")), positions=positions)
    assert torch.equal(opened, steered)
    assert torch.equal(closed, plain)


def _alone(r, lm, prompt, v, steer, positions):
    enc = r.encode([prompt])
    if not steer:
        return r.logits(enc)[0]
    with activation_addition(lm.model, v, [2], alpha=1.5, positions=positions):
        return r.logits(enc)[0]


@pytest.mark.parametrize("positions", [[-3, -1], None])
def test_mixed_gate_steers_exactly_the_gated_rows(qwen, positions):
    lm, r = qwen  # batch size 3 < 8 prompts, batches sorted by length
    v = _vec()
    enc = r.encode(PROMPTS)
    if positions is None:  # every position: the shared prefix would be steered for all or none
        with pytest.raises(ToolkitError, match="prompts are not known"):
            _gated_logits(r, lm, enc, v, MIXED, positions=None)
        enc = Encoded(enc.ids, 0)
    got = _gated_logits(r, lm, enc, v, MIXED, positions=positions)
    for i, p in enumerate(PROMPTS):
        want = _alone(r, lm, p, v, MIXED[i], positions)
        assert torch.allclose(got[i], want, atol=1e-5, rtol=1e-5), (i, MIXED[i])
        other = _alone(r, lm, p, v, not MIXED[i], positions)
        assert not torch.allclose(got[i], other, atol=1e-3)


def test_mixed_gate_with_a_context_cache(qwen):
    lm, r = qwen
    v = _vec()
    enc = r.encode(PROMPTS)
    ctx = r.context(enc, 2, start_layer=2)
    with conditional_addition(lm.model, v, [2], alpha=1.5, gate=MIXED, positions=[-2, -1]):
        cached = r.logits(enc, context=ctx)
        full = r.logits(enc)
    assert torch.allclose(cached, full, atol=1e-5)
    plain = r.logits(enc)
    assert torch.equal(full[~torch.from_numpy(MIXED)], plain[~torch.from_numpy(MIXED)])
    assert not torch.allclose(full[torch.from_numpy(MIXED)], plain[torch.from_numpy(MIXED)], atol=1e-3)


@pytest.mark.parametrize("positions", [[-2, -1], None])
def test_mixed_gate_in_generation(qwen, positions):
    lm, r = qwen
    v = _vec(2) * 4
    enc = r.encode(PROMPTS) if positions is not None else Encoded(r.encode(PROMPTS).ids, 0)
    with conditional_addition(lm.model, v, [1], alpha=2.0, gate=MIXED, positions=positions):
        texts, first, toks = r.generate(enc, 4, with_tokens=True)
    steered_texts = []
    for i, p in enumerate(PROMPTS):
        one = r.encode([p])
        ctx = activation_addition(lm.model, v, [1], alpha=2.0, positions=positions) if MIXED[i] else None
        with ctx if ctx is not None else torch.no_grad():
            t, f, k = r.generate(one, 4, with_tokens=True)
        assert t[0] == texts[i] and k[0] == toks[i], i
        assert torch.allclose(f[0], first[i], atol=1e-5)
        if MIXED[i]:
            steered_texts.append(t[0])
    plain, _ = r.generate(r.encode(PROMPTS), 4)
    assert [plain[i] for i in range(len(PROMPTS)) if not MIXED[i]] == [texts[i] for i in range(len(PROMPTS))
                                                                         if not MIXED[i]]
    assert any(plain[i] != texts[i] for i in range(len(PROMPTS)) if MIXED[i])


def test_gate_bad_input(qwen):
    lm, r = qwen
    v = _vec()
    for bad in ([], [[True, False]], [1, 0]):
        with pytest.raises(ToolkitError) as e:
            with conditional_addition(lm.model, v, [1], gate=bad):
                pass
        assert e.value.param == "gate"
    with pytest.raises(ToolkitError, match="gate covers 2"):
        with conditional_addition(lm.model, v, [1], gate=[True, False], positions=[-1]):
            r.logits(r.encode(PROMPTS))
    with pytest.raises(ToolkitError, match="d_model"):
        with conditional_addition(lm.model, torch.randn(64), [1], gate=[True]):
            pass
    with pytest.raises(ToolkitError, match="needs layers"):
        with conditional_addition(lm.model, v, gate=[True]):
            pass
    from toolkit.hooks import active_hooks
    assert active_hooks(lm.model).layers == ()


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    from test_cli import tiny_files
    from toolkit.directions import save_direction

    base = tmp_path_factory.mktemp("cast")
    model, h, b = tiny_files(base)
    g = torch.Generator().manual_seed(5)
    steer_f, cond_f = base / "steer.safetensors", base / "cond.safetensors"
    save_direction(steer_f, torch.randn(32, generator=g), {"layer": 2})
    # the condition: difference in means of h and b training prompts at block 1's output (post-instruction mean)
    from test_cli import HARMFUL, HARMLESS
    from toolkit.models import load_model

    lm = load_model(str(model), dtype="float32")
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=4, progress=False)
    means = [r.collect(r.encode(s["train"]), [1], ["resid_post"], r.fmt.post_positions())["resid_post"][:, 0]
             .double().mean((0, 1)) for s in (HARMFUL, HARMLESS)]
    save_direction(cond_f, (means[0] - means[1]).float(), {"layer": 1, "site": "resid_post"})
    return base, model, h, b, steer_f, cond_f


def cast_args(cli_env, *extra):
    base, model, h, b, steer_f, cond_f = cli_env
    return ["steer", "--model", model, "--direction", steer_f, "--condition", cond_f, "--calibrate-sets", f"{h},{b}",
            "--sets", f"{h},{b}", "--alpha", "0,2", "--random", "2", "--orthogonal", "0", "--scale", "unit",
            "--quiet", "--batch-size", "3", "--dtype", "float32", "--no-plot", *extra]


def _side(df, kind, alpha):
    return df[(df.kind == kind) & (df.alpha == alpha)].set_index(["set", "id"]).sort_index()


def test_steer_condition_auto_threshold_end_to_end(cli_env, runs):
    from test_cli import assert_ok, invoke
    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set

    base, model, h, b, steer_f, cond_f = cli_env
    out = assert_ok(invoke(cast_args(cli_env, "--name", "c")))
    run = runs / "steer" / "c"
    df = pd.read_csv(run / "results.csv")
    assert set(df.kind) == {"learned", "random", "conditional"}
    assert {"condition_similarity", "gated"} <= set(df.columns)
    meta = json.loads((run / "run.json").read_text())
    info = meta["results"]["condition"]
    assert (info["layer"], info["site"], info["threshold_mode"]) == (1, "resid_post", "auto")
    # the similarities are the engine's, the threshold is the calibration on the two sets' train splits
    lm = load_model(str(model), dtype="float32")
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=3, progress=False)
    cond = Direction.resolve(str(cond_f))
    ps = {n: load_prompt_set(str(f)) for n, f in (("h", h), ("b", b))}
    sims = {n: condition_similarity(r, r.encode(p.select("train").prompts), cond) for n, p in ps.items()}
    cal = calibrate_threshold(sims["h"], sims["b"])
    assert info["threshold"] == pytest.approx(cal.threshold, abs=1e-12)
    assert info["calibration"]["balanced_accuracy"] == pytest.approx(cal.balanced_accuracy)
    test_h = ps["h"].select("test")
    direct = condition_similarity(r, r.encode(test_h.prompts), cond)
    got = df[(df.kind == "conditional") & (df.alpha == 2) & (df.set == "h")].set_index("id").loc[test_h.ids]
    assert np.allclose(got.condition_similarity.to_numpy(), direct, atol=1e-6)
    assert (got.gated.to_numpy() == (got.condition_similarity.to_numpy() >= info["threshold"])).all()
    # conditional steering: gated prompts exactly as unconditional steering, the others as the baseline
    cond2, learned2, base0 = _side(df, "conditional", 2), _side(df, "learned", 2), _side(df, "learned", 0)
    gated = cond2.gated.astype(bool)
    assert 0 < gated.sum() < len(gated), "the toy threshold should gate some prompts only"
    assert np.allclose(cond2.score[gated], learned2.score[gated], atol=1e-5)
    assert np.allclose(cond2.score[~gated], base0.score[~gated], atol=1e-5)
    assert not np.allclose(learned2.score[~gated], base0.score[~gated], atol=1e-3)
    # cast.csv: per set, the gate rate and both means; run.json's gate rates agree
    cast = pd.read_csv(run / "cast.csv")
    assert list(cast.columns) == ["layer", "set", "part", "alpha", "gate_rate", "n", "mean_score_unconditional",
                                  "mean_score_conditional"]
    row = cast[(cast.set == "h") & (cast.alpha == 2)].iloc[0]
    assert row.gate_rate == pytest.approx(got.gated.mean())
    assert row.gate_rate == pytest.approx(info["gate_rate"]["h/all"])
    assert row.mean_score_conditional == pytest.approx(cond2.loc["h"].score.mean())
    assert row.mean_score_unconditional == pytest.approx(learned2.loc["h"].score.mean())
    assert "CAST" in out and f"h (all): gate rate {row.gate_rate:.2f}" in out
    # the summary keeps one conditional row per point; band.csv and stats control still see learned vs random
    summ = pd.read_csv(run / "summary.csv")
    assert len(summ[summ.kind == "conditional"]) == 2 * 2
    assert len(pd.read_csv(run / "band.csv")) == 2 * 2
    assert_ok(invoke(["stats", "control", run, "--name", "ctl"]))


@pytest.mark.parametrize("threshold, other", [("-inf", "learned"), ("inf", "baseline")])
def test_steer_condition_infinite_thresholds(cli_env, runs, threshold, other):
    from test_cli import assert_ok, invoke

    name = "open" if threshold == "-inf" else "shut"
    assert_ok(invoke(cast_args(cli_env, "--threshold", threshold, "--name", name)))
    df = pd.read_csv(runs / "steer" / name / "results.csv")
    cond = _side(df, "conditional", 2)
    want = _side(df, "learned", 2) if other == "learned" else _side(df, "learned", 0)
    assert cond.gated.all() if other == "learned" else not cond.gated.any()
    assert (cond.score.to_numpy() == want.score.to_numpy()).all()
    info = json.loads((runs / "steer" / name / "run.json").read_text())["results"]["condition"]
    assert info["threshold_mode"] == "given" and "calibration" not in info


def test_steer_condition_at_every_position_with_generation(cli_env, runs):
    from test_cli import assert_ok, invoke

    assert_ok(invoke(cast_args(cli_env, "--positions", "all", "--gen-tokens", "3", "--condition-layer", "-3",
                               "--random", "0", "--name", "g")))
    df = pd.read_csv(runs / "steer" / "g" / "results.csv")
    meta = json.loads((runs / "steer" / "g" / "run.json").read_text())
    assert meta["results"]["condition"]["layer"] == 1  # -3 of 4 blocks
    cond2, learned2, base0 = _side(df, "conditional", 2), _side(df, "learned", 2), _side(df, "learned", 0)
    gated = cond2.gated.astype(bool)
    assert 0 < gated.sum() < len(gated)
    assert (cond2.completion[gated].fillna("") == learned2.completion[gated].fillna("")).all()
    assert (cond2.completion[~gated].fillna("") == base0.completion[~gated].fillna("")).all()
    assert np.allclose(cond2.score[gated], learned2.score[gated], atol=1e-5)
    assert np.allclose(cond2.score[~gated], base0.score[~gated], atol=1e-5)
    assert cond2.coherence.notna().any()
    cast = pd.read_csv(runs / "steer" / "g" / "cast.csv")
    assert {"refusal_rate_unconditional", "refusal_rate_conditional"} <= set(cast.columns)


def test_steer_without_condition_is_unchanged(cli_env, runs):
    from test_cli import assert_ok, entries, invoke

    base, model, h, b, steer_f, cond_f = cli_env
    assert_ok(invoke(["steer", "--model", model, "--direction", steer_f, "--sets", h, "--alpha", "0,2", "--quiet",
                      "--no-plot", "--name", "plain"]))
    df = pd.read_csv(runs / "steer" / "plain" / "results.csv")
    assert set(df.kind) == {"learned"} and "gated" not in df.columns
    assert "cast.csv" not in entries(runs / "steer" / "plain")
    assert json.loads((runs / "steer" / "plain" / "run.json").read_text())["results"]["condition"] is None


def test_steer_condition_bad_input(cli_env, runs, tmp_path):
    from test_cli import assert_usage_error, invoke
    from toolkit.directions import save_direction

    wide, nolayer = tmp_path / "wide.safetensors", tmp_path / "nolayer.safetensors"
    save_direction(wide, torch.randn(64), {"layer": 1})
    save_direction(nolayer, torch.randn(32), {})
    base, model, h, b, steer_f, cond_f = cli_env
    cases = [
        (["--threshold", "high"], ["--threshold", "number or auto"]),
        (["--threshold", "nan"], ["--threshold"]),
        (["--calibrate-sets", h], ["--calibrate-sets", "two sets"]),
        (["--calibrate-split", "nope"], []),
        (["--condition-layer", "9"], ["--condition-layer", "out of range"]),
        (["--condition", wide], ["--condition", "d_model"]),
        (["--condition", nolayer], ["--condition-layer", "no layer"]),
        (["--condition", tmp_path / "missing.safetensors"], []),
    ]
    for extra, needles in cases:
        assert_usage_error(invoke(cast_args(cli_env, *extra)), *needles)
        assert not (runs / "steer").exists() or not any((runs / "steer").iterdir()), extra


def test_forced_and_continuation_passes_report_caller_rows(qwen):
    # prompts with empty continuations are skipped; the rows handed to hooks stay caller indices (the gate's order)
    lm, r = qwen
    from toolkit.hooks import hooked

    enc = r.encode(PROMPTS)
    conts = [[] if i % 3 == 0 else [5, 6][: 1 + i % 2] for i in range(len(PROMPTS))]
    keep = {i for i, c in enumerate(conts) if c}
    seen = []

    def spy(x, ctx):
        if ctx.state.rows is not None:
            seen.append((ctx.state.phase, tuple(ctx.state.rows.tolist())))

    with hooked(lm.model, [("resid_pre", 0, spy)], write=False):
        r.forced(enc, conts, lambda *a: None)
        forced = list(seen)
        seen.clear()
        r.continuation_logprob(enc, conts)
    for got in (forced, seen):
        rows = {i for _, rs in got for i in rs}
        assert rows == keep, got


def test_mixed_gate_in_continuation_passes(qwen):
    # every position, no shared prefix: the likelihood of a continuation is steered for the gated prompts only,
    # also when prompts with an empty continuation are skipped (rows stay caller indices)
    lm, r = qwen
    v = _vec()
    enc = Encoded(r.encode(PROMPTS).ids, 0)
    conts = [[] if i == 0 else [5, 6, 7][: 1 + i % 3] for i in range(len(PROMPTS))]
    with conditional_addition(lm.model, v, [2], alpha=1.5, gate=MIXED):
        got = r.continuation_logprob(enc, conts)
    plain = r.continuation_logprob(enc, conts)
    with activation_addition(lm.model, v, [2], alpha=1.5):
        steered = r.continuation_logprob(enc, conts)
    assert np.isnan(got[0])
    want = np.where(MIXED, steered, plain)
    assert np.allclose(got[1:], want[1:], atol=1e-5)
    assert not np.allclose(steered[1:], plain[1:], atol=1e-3)
