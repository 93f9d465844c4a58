"""``refusal steer`` and ``refusal dose-response`` end to end on a tiny Qwen2 checkpoint (Typer CliRunner)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from test_cli import assert_ok, assert_usage_error, entries, invoke, tiny_files
from toolkit.directions import load_direction, save_direction
from toolkit.steering import hash_split

FAST = ["--quiet", "--batch-size", "4"]


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("steer")
    return (base, *tiny_files(base))


def steer_args(tiny_env, *extra):
    base, model, h, b = tiny_env
    return ["steer", "--model", model, "--learn", b, "--top-k", "2", "--sets", h, "--layers", "2",
            "--alpha", "-2:2:1", "--random", "3", "--orthogonal", "2", *FAST, *extra]


def test_steer_learns_controls_and_writes_a_tidy_run(tiny_env, runs):
    base, model, h, b = tiny_env
    out = assert_ok(invoke(steer_args(tiny_env, "--name", "s1")))
    run = runs / "steer" / "s1"
    assert {"results.csv", "summary.csv", "band.csv", "steer.png", "direction_L2.safetensors", "run.json"} <= entries(run)
    assert (run / "steer.png").stat().st_size > 1000
    df = pd.read_csv(run / "results.csv")
    assert set(df.kind) == {"learned", "random", "orthogonal"}
    # holdout: the learned set appears as two disjoint halves given by the hash split; the other set whole
    hmask = dict(zip([f"b-{i:02d}" for i in range(1, 13)], hash_split([f"b-{i:02d}" for i in range(1, 13)], 0)))
    learned0 = df[(df.kind == "learned") & (df.alpha == 0)]
    train_ids = set(learned0[learned0.part == "train"].id)
    hold_ids = set(learned0[learned0.part == "holdout"].id)
    assert train_ids == {i for i, t in hmask.items() if t} and hold_ids == {i for i, t in hmask.items() if not t}
    assert set(learned0[learned0.set == "h"].part) == {"all"} and len(learned0[learned0.set == "h"]) == 4  # test split
    # one row per direction x alpha x prompt; alpha 0 is the shared baseline for every direction
    n_prompts = 12 + 4
    assert len(df) == (1 + 3 + 2) * 5 * n_prompts
    base_scores = df[df.alpha == 0].groupby(["set", "part", "id"]).score.nunique()
    assert (base_scores == 1).all()
    # steering changes the score, and the learned direction file is what was steered with (unit * scale)
    moved = df[(df.kind == "learned") & (df.alpha == 2)].set_index(["set", "id"]).score
    still = learned0.set_index(["set", "id"]).score
    assert (moved - still.loc[moved.index]).abs().max() > 1e-3
    d, meta = load_direction(run / "direction_L2.safetensors")
    assert meta["layer"] == 2 and meta["learned_on"]["n"] == len(train_ids)
    band = pd.read_csv(run / "band.csv")
    assert {"mean_score_random_low", "mean_score_random_high", "mean_score_random_p",
            "mean_score_orthogonal_low"} <= set(band.columns)
    assert len(band) == 3 * 5  # (train, holdout, h) x alphas
    summ = pd.read_csv(run / "summary.csv")
    r0 = summ[(summ.kind == "random") & (summ.alpha == 1) & (summ.set == "h")]
    lo = band[(band.alpha == 1) & (band.set == "h")]
    assert float(lo.mean_score_random_low.iloc[0]) == pytest.approx(np.percentile(r0.mean_score, 2.5))
    meta = json.loads((run / "run.json").read_text())
    assert meta["results"]["scale"]["kind"] == "resid" and meta["params"]["random"] == 3
    assert "Spearman" in out


def test_random_control_is_reproducible_by_seed(tiny_env, runs):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        assert_ok(invoke(steer_args(tiny_env, "--name", name, "--seed", seed, "--no-plot")))
    read = {n: pd.read_csv(runs / "steer" / n / "results.csv") for n in "abc"}
    ra, rb, rc = (read[n][read[n].kind == "random"] for n in "abc")
    pd.testing.assert_frame_equal(ra.reset_index(drop=True), rb.reset_index(drop=True))
    assert set(ra.direction_seed) != set(rc.direction_seed)
    # the seeds command aggregates the two seeds' summaries row by row; the same seed twice is refused
    assert_ok(invoke(["stats", "seeds", runs / "steer" / "a", runs / "steer" / "c", "--name", "agg"]))
    agg = pd.read_csv(runs / "stats" / "agg" / "seeds.csv")
    sa, sc = (pd.read_csv(runs / "steer" / n / "summary.csv") for n in "ac")
    key = (sa.kind == "learned") & (sa.set == "h") & (sa.alpha == 2)
    row = agg[(agg.kind == "learned") & (agg.set == "h") & (agg.alpha == 2) & (agg.metric == "mean_score")]
    assert len(row) == 1 and row.n_seeds.iloc[0] == 2
    expected = (sa[key].mean_score.iloc[0] + sc[(sc.kind == "learned") & (sc.set == "h") & (sc.alpha == 2)]
                .mean_score.iloc[0]) / 2
    assert row["mean"].iloc[0] == pytest.approx(expected)
    assert_usage_error(invoke(["stats", "seeds", runs / "steer" / "a", runs / "steer" / "b"]), "seed")


def test_steer_with_a_direction_file_and_generation(tiny_env, runs, tmp_path):
    base, model, h, b = tiny_env
    d = torch.randn(32)
    f = tmp_path / "dir.safetensors"
    save_direction(f, d, {"layer": 1, "model_hash": None})
    assert_ok(invoke(["steer", "--model", model, "--direction", f, "--sets", f"{h},{b}", "--alpha", "0,3",
                      "--random", "2", "--gen-tokens", "3", "--positions", "last", "--scale", "raw",
                      "--name", "g", *FAST]))
    df = pd.read_csv(runs / "steer" / "g" / "results.csv")
    assert set(df.layer) == {1} and set(df.part) == {"all"}
    assert df.refusal.notna().all() and df.degenerate.notna().all()
    assert df.scale.iloc[0] == pytest.approx(float(d.norm()), rel=1e-6)
    summ = pd.read_csv(runs / "steer" / "g" / "summary.csv")
    assert {"refusal_rate", "degenerate_rate", "mean_coherence"} <= set(summ.columns)


@pytest.mark.parametrize("extra, needle", [
    (["--alpha", "0:1:0.3"], "does not divide"),
    (["--alpha", "1:0:1"], "goes away"),
    (["--site", "resid_side"], "unknown hook site"),
    (["--scale", "huge"], "--scale"),
    (["--positions", "0"], "negative"),
    (["--layers", "9"], "out of range"),
    (["--top-k", "5"], "needs at least 10"),
])
def test_steer_bad_input(tiny_env, runs, extra, needle):
    assert_usage_error(invoke(steer_args(tiny_env, *extra)), needle)
    assert not (runs / "steer").exists() or not any((runs / "steer").iterdir())


def test_steer_needs_one_direction_source(tiny_env, runs):
    base, model, h, b = tiny_env
    assert_usage_error(invoke(["steer", "--model", model, "--sets", h, *FAST]), "exactly one")
    assert_usage_error(invoke(["steer", "--model", model, "--direction", base / "runs" / "nope", *FAST]), "no run")


def test_dose_response_fits_and_reports(tiny_env, runs, tmp_path):
    base, model, h, b = tiny_env
    f = tmp_path / "dir.safetensors"
    save_direction(f, torch.randn(32), {"layer": 2})
    out = assert_ok(invoke(["dose-response", "--model", model, "--direction", f, "--harmful", h, "--benign", b,
                            "--alpha", "0:4:2", "--gen-tokens", "3", "--bootstrap", "100", "--name", "d", *FAST]))
    run = runs / "dose-response" / "d"
    assert {"results.csv", "summary.csv", "fits.csv", "dose_response.png", "run.json"} <= entries(run)
    df = pd.read_csv(run / "results.csv")
    assert len(df) == 3 * 8 and set(df.role) == {"harmful", "benign"}
    summ = pd.read_csv(run / "summary.csv")
    h0 = summ[(summ.role == "harmful") & (summ.alpha == 0)].iloc[0]
    flags = df[(df.role == "harmful") & (df.alpha == 0)].refusal
    assert h0.refusal_rate == pytest.approx(flags.mean()) and h0.n == 4
    fits = pd.read_csv(run / "fits.csv")
    assert set(fits.role) == {"harmful", "benign"}
    assert "ED50" in out and "TI-S" in out


@pytest.mark.parametrize("extra, needle", [
    (["--alpha", "0,1"], "at least 3"),
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--bootstrap", "5"], "--bootstrap"),
])
def test_dose_response_bad_input(tiny_env, runs, tmp_path, extra, needle):
    base, model, h, b = tiny_env
    f = tmp_path / "dir.safetensors"
    save_direction(f, torch.randn(32), {"layer": 2})
    assert_usage_error(invoke(["dose-response", "--model", model, "--direction", f, "--harmful", h, "--benign", b,
                               *FAST, *extra]), needle)


def test_generation_does_not_change_what_is_learned(tiny_env, runs):
    # the baseline's activation capture must see only the prompt pass, not the coherence pass after generation
    for name, gen in (("nogen", "0"), ("gen", "3")):
        assert_ok(invoke(steer_args(tiny_env, "--name", name, "--gen-tokens", gen, "--random", "0",
                                    "--orthogonal", "0", "--alpha", "0,1", "--no-plot")))
    d0, m0 = load_direction(runs / "steer" / "nogen" / "direction_L2.safetensors")
    d1, m1 = load_direction(runs / "steer" / "gen" / "direction_L2.safetensors")
    assert torch.equal(d0, d1)
    s0 = json.loads((runs / "steer" / "nogen" / "run.json").read_text())["results"]["scale"]["resid_norm"]
    s1 = json.loads((runs / "steer" / "gen" / "run.json").read_text())["results"]["scale"]["resid_norm"]
    assert s0 == pytest.approx(s1, rel=1e-6)
    g = pd.read_csv(runs / "steer" / "gen" / "results.csv")
    assert g.coherence.notna().any() and (g.coherence.dropna() < 0).all()


def test_steer_at_all_positions_matches_hooks_without_context(tiny_env, runs, tmp_path):
    # --positions all cannot use a context cache; its scores equal a direct activation addition at every position
    from toolkit.interventions import activation_addition
    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set
    from toolkit.runner import Runner
    from toolkit.scoring import refusal_token_ids, refusal_score
    from toolkit.templates import ChatFormat

    base, model, h, b = tiny_env
    d = torch.randn(32)
    f = tmp_path / "dir.safetensors"
    save_direction(f, d, {"layer": 1})
    assert_ok(invoke(["steer", "--model", model, "--direction", f, "--sets", h, "--alpha", "0,2", "--positions",
                      "all", "--scale", "unit", "--name", "all", *FAST]))
    df = pd.read_csv(runs / "steer" / "all" / "results.csv")
    got = df[df.alpha == 2].set_index("id").score
    lm = load_model(str(model))
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=4, progress=False)
    ps = load_prompt_set(str(h)).select("test")
    with activation_addition(lm.model, d / d.norm(), [1], alpha=2.0):
        logits = r.logits(r.encode(ps.prompts))
    expected = refusal_score(logits, refusal_token_ids(lm.tokenizer)).numpy()
    assert np.allclose(got.loc[ps.ids].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(df[df.alpha == 0].set_index("id").score.loc[ps.ids].to_numpy(), expected, atol=1e-3)


def test_more_bad_input(tiny_env, runs, tmp_path):
    base, model, h, b = tiny_env
    f = tmp_path / "nolayer.safetensors"
    save_direction(f, torch.randn(32), {})
    assert_usage_error(invoke(["dose-response", "--model", model, "--direction", f, "--harmful", h, "--benign", b,
                               *FAST]), "--layer")
    assert_usage_error(invoke(["steer", "--model", model, "--learn", b, "--top-k", "2", "--sets", tmp_path / "missing.jsonl",
                               *FAST]), "missing.jsonl")
    wide = tmp_path / "wide.safetensors"
    save_direction(wide, torch.randn(64), {"layer": 1})
    assert_usage_error(invoke(["steer", "--model", model, "--direction", wide, "--sets", h, *FAST]), "d_model")


def test_sigterm_leaves_no_half_written_run(tiny_env, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    base, model, h, b = tiny_env
    runs_dir = tmp_path / "runs"
    f = tmp_path / "dir.safetensors"
    save_direction(f, torch.randn(32), {"layer": 1})
    code = ("import sys; from experiments.cli import main; sys.argv = ['refusal'] + sys.argv[1:]; main()")
    args = ["steer", "--model", str(model), "--direction", str(f), "--sets", str(h), "--alpha=-2:2:0.02",
            "--random", "100", "--name", "killed", "-q", "-b", "4"]
    env = dict(os.environ, REFUSAL_RUNS=str(runs_dir))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (runs_dir / "steer").is_dir() or not any((runs_dir / "steer").iterdir()):
        assert proc.poll() is None and time.time() - t0 < 60, "the run never started"
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert entries(runs_dir / "steer") == set()


def test_steer_method_learns_with_another_estimator(tiny_env, runs):
    """--method probe learns the direction from the same top-k/bottom-k groups; its file records the estimator and its
    unit direction differs from the Refusal Dial's (diff-means) one."""
    from toolkit.directions import Direction

    for m in ("diff-means", "probe"):
        assert_ok(invoke(steer_args(tiny_env, "--method", m, "--random", "0", "--orthogonal", "0", "--alpha", "0:1:1",
                                    "--no-plot", "--name", f"m-{m}")))
    d = {m: Direction.load(runs / "steer" / f"m-{m}" / "direction_L2.safetensors") for m in ("diff-means", "probe")}
    assert d["probe"].extra["estimator"] == "probe" and "probe" in d["probe"].method
    assert d["diff-means"].extra["estimator"] == "diff-means"
    cos = float(torch.nn.functional.cosine_similarity(d["probe"].vector, d["diff-means"].vector, dim=0))
    assert cos < 1 - 1e-4
    r = invoke(steer_args(tiny_env, "--method", "caa", "--name", "m-caa"))
    assert r.exit_code == 2 and "caa" in r.output
