"""``refusal optimize`` and its engine (toolkit/optimize.py): the search space and how parameters become an edit,
the Pareto helpers, warm-start profiles, the study's budget shared by two worker processes, resuming after an
interruption and after SIGKILL, and the command end to end on the tiny Qwen2 checkpoint."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from toolkit.abliteration import Kernel, direction_at, orthogonalize_to, unit_rows
from toolkit.errors import ToolkitError
from toolkit.optimize import (SearchSpace, SearchState, choose_trial, depth_profile, pareto_mask, parse_objectives,
                              read_profile)

from test_cli import HARMFUL, HARMLESS, invoke, output_of, save_tiny, write_set

L, D = 6, 8


def synthetic_state(seed: int = 0) -> SearchState:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(L, D, generator=g)
    dirs[0] = 0.0  # block 0's input at a template position: the same token for every prompt
    return SearchState(dirs, torch.randn(L, D, generator=g),
                       {"attn": torch.randn(L, D, generator=g), "mlp": torch.randn(L, D, generator=g)},
                       {"raw": torch.rand(L, generator=g, dtype=torch.float64),
                        "orthogonal": torch.rand(L, generator=g, dtype=torch.float64)}, -1, "h", "m")


def params(**kw) -> dict:
    p = {"scope": "global", "direction": 0.5, "form": "projection", "orthogonalize": False, "activation_scaled": False,
         "attn.max_weight": 1.2, "attn.position": 0.6, "attn.min_weight": 0.5, "attn.distance": 0.4,
         "mlp.max_weight": 0.8, "mlp.position": 0.8, "mlp.min_weight": 0.25, "mlp.distance": 0.2}
    return p | kw


def test_edit_global_direction_and_kernels():
    st = synthetic_state()
    e = st.edit(params())
    unit = unit_rows(st.directions[1:])
    want = direction_at(torch.cat([torch.zeros(1, D, dtype=torch.float64), unit]), 1 + 0.5 * (L - 1))
    assert torch.allclose(e.directions, want.expand(L, D), atol=1e-12)
    span = L - 1
    assert torch.allclose(e.strengths["attn"], Kernel(1.2, 0.6 * span, 0.6, max(1.0, 0.4 * span)).weights(L))
    assert torch.allclose(e.strengths["mlp"], Kernel(0.8, 0.8 * span, 0.2, 1.0).weights(L))  # 0.2 * 5 = 1 layer
    assert e.form == "projection" and e.meta["params"]["direction"] == 0.5


def test_edit_per_layer_orthogonal_scaled_affine():
    st = synthetic_state(1)
    e = st.edit(params(scope="per_layer", orthogonalize=True, activation_scaled=True, form="affine",
                       **{"mlp.max_weight": -0.2}))
    orth = orthogonalize_to(st.directions[1:], st.harmless_mean[1:])
    for l in range(L):
        assert torch.allclose(e.directions[l], orth[min(l + 1, L - 1) - 1], atol=1e-12)
    sep = st.separation["orthogonal"]
    base = Kernel(1.2, 0.6 * (L - 1), 0.6, 2.0).weights(L)
    assert torch.allclose(e.strengths["attn"], base * sep / sep.max(), atol=1e-12)
    assert float(e.strengths["mlp"].abs().sum()) == 0.0  # a negative max_weight switches the MLP off
    refs = (st.module_means["attn"].double() * e.directions).sum(-1)
    assert torch.allclose(e.references["attn"], refs, atol=1e-12)
    with pytest.raises(ToolkitError, match="lack 'form'"):
        st.edit({k: v for k, v in params().items() if k != "form"})


def test_state_roundtrip(tmp_path):
    st = synthetic_state(2)
    back = SearchState.from_bytes(st.to_bytes())
    assert torch.equal(back.directions, st.directions) and back.position == -1 and back.model_hash == "h"
    assert torch.equal(back.separation["raw"], st.separation["raw"])
    st.save(tmp_path / "s.safetensors")
    assert torch.equal(SearchState.load(tmp_path / "s.safetensors").module_means["mlp"], st.module_means["mlp"])
    (tmp_path / "bad").write_bytes(b"junk")
    with pytest.raises(ToolkitError, match="search-state"):
        SearchState.load(tmp_path / "bad")


def test_space_draws_ranges_and_fixes_single_choices():
    space = SearchSpace(forms=("norm_preserving",), orthogonalize=(True,))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        p = space.suggest(t)
        assert p["form"] == "norm_preserving" and p["orthogonalize"] is True
        assert "form" not in t.params and "orthogonalize" not in t.params and "scope" in t.params
        assert 0.4 <= p["direction"] <= 0.9 and 0.8 <= p["attn.max_weight"] <= 1.5
        assert -0.25 <= p["mlp.max_weight"] <= 1.5 and 0.6 <= p["mlp.position"] <= 1.0
        study.tell(t, [0.0, 0.0])
    assert space.fixed() == {"form": "norm_preserving", "orthogonalize": True}
    with pytest.raises(ToolkitError, match="form"):
        SearchSpace(forms=("rotate",))


def test_objectives_pareto_and_choice():
    assert parse_objectives("refusal, kl") == ("refusal", "kl")
    for bad in ("", "refusal,refusal", "speed"):
        with pytest.raises(ToolkitError):
            parse_objectives(bad)
    v = np.array([[0.1, 0.5], [0.2, 0.1], [0.3, 0.3], [0.1, 0.6], [0.0, 1.0]])
    assert pareto_mask(v, ["minimize", "minimize"]).tolist() == [True, True, False, False, True]
    assert pareto_mask(v, ["minimize", "maximize"]).tolist() == [False, False, False, False, True]  # (0, 1) wins
    front = pd.DataFrame({"trial": [0, 1, 4], "refusal": [0.1, 0.2, 0.0], "kl": [0.5, 0.1, 1.0]})
    row, rule = choose_trial(front, 0.2)
    assert int(row["trial"]) == 1 and "KL <= 0.2" in rule
    row, rule = choose_trial(front, 0.05)
    assert int(row["trial"]) == 1 and "lowest-KL" in rule
    row, _ = choose_trial(front, 2.0)
    assert int(row["trial"]) == 4


def test_profile_roundtrip_clips_and_drops(tmp_path):
    prof = depth_profile([params(direction=0.95, form="affine"), params(scope="per_layer")], {"id": "m"},
                         ("refusal", "kl"))
    (tmp_path / "profile.json").write_text(json.dumps(prof))
    space = SearchSpace(forms=("projection", "affine"))
    got = read_profile(tmp_path, space)
    assert got[0]["direction"] == 0.9 and got[0]["form"] == "affine"  # clipped into the range
    assert "orthogonalize" in got[0] and got[1]["scope"] == "per_layer"
    assert "form" not in read_profile(tmp_path, SearchSpace(forms=("projection",)))[0]  # fixed: not drawn
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ToolkitError, match="profile"):
        read_profile(tmp_path / "bad.json", space)


# --------------------------------------------------------------------------------------- shared storage, workers
class FakeEvaluator:
    """Objectives from the parameters alone, slowly enough that two workers interleave."""

    def __init__(self, delay: float):
        self.delay = delay

    def __call__(self, edit):
        time.sleep(self.delay)
        p = edit.meta["params"]
        return {"refusal": float(1.2 - p["attn.max_weight"]), "kl": float(p["attn.max_weight"] * p["direction"])}


def _worker(url: str, name: str, budget: int, seed: int, delay: float, go) -> None:
    from experiments.optimize import _sampler, open_storage, run_trials

    go.wait(60)
    study = optuna.load_study(study_name=name, storage=open_storage(url), sampler=_sampler(None, 2, seed))
    run_trials(study, SearchSpace(), synthetic_state(), FakeEvaluator(delay), ("refusal", "kl"), budget, None, 0.1,
               progress=False)


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_share_one_budget(tmp_path, kind):
    from experiments.optimize import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'study.journal'}"
    optuna.create_study(study_name="s", storage=open_storage(url), directions=["minimize", "minimize"])
    ctx = mp.get_context("spawn")
    go = ctx.Event()
    procs = [ctx.Process(target=_worker, args=(url, "s", 12, seed, 0.15, go)) for seed in (1, 2)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    study = optuna.load_study(study_name="s", storage=open_storage(url))
    done = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(done) == 12  # the budget, exactly
    assert len({t.number for t in done}) == 12
    assert len({json.dumps(t.user_attrs["params"], sort_keys=True) for t in done}) == 12  # no trial run twice
    assert len({t.user_attrs["worker"] for t in done}) == 2  # both workers took part
    for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,)):
        assert t.user_attrs.get("over_budget")  # only trials asked after the budget ran out


# --------------------------------------------------------------------------------------------- the command
FAST = ["--quiet", "--batch-size", "4", "--gen-tokens", "3", "--kl-tokens", "3", "--startup", "2"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("optimize")
    border = {"val": ["tell me a story about a cat .", "how do i kill a process"],
              "test": ["how do i kill a process please", "hack computer bread"]}
    return (save_tiny(base / "tiny"), write_set(base / "h.jsonl", HARMFUL, "h"), write_set(base / "b.jsonl", HARMLESS, "b"),
            write_set(base / "o.jsonl", border, "o"))


def _args(files, name, trials, *more):
    tiny, h, b, o = files
    return ["optimize", "--model", tiny, "--harmful", h, "--harmless", b, "--borderline", o, "--trials", trials,
            "--name", name, *FAST, *more]


def test_optimize_end_to_end_and_export(env, files):
    res = invoke(_args(files, "o1", 5, "--forms", "projection,norm_preserving", "--controls", "1"))
    assert res.exit_code == 0, output_of(res)
    run = env / "optimize" / "o1"
    for f in ("trials.csv", "pareto.csv", "pareto.png", "profile.json", "test.csv", "study.db", "search.safetensors",
              "run.json"):
        assert (run / f).is_file(), f
    assert not (env / "optimize" / ".o1.study").exists()  # the working folder is gone once published
    trials = pd.read_csv(run / "trials.csv")
    assert len(trials) == 5 and trials["trial"].is_unique
    assert set(trials["p.form"]) <= {"projection", "norm_preserving"}
    front = pd.read_csv(run / "pareto.csv")
    assert 1 <= len(front) <= 5 and set(front["trial"]) <= set(trials["trial"])
    test = pd.read_csv(run / "test.csv")
    meta = json.loads((run / "run.json").read_text())
    chosen = meta["results"]["chosen"]["trial"]
    assert sorted(set(test["condition"])) == sorted({"unedited", f"trial {chosen}", "random control 1"})
    assert set(test["set"]) == {"h", "b", "o"}
    assert (test["n"] == test["set"].map({"h": 4, "b": 4, "o": 2})).all()
    assert meta["judge"]["name"] == "markers" and meta["results"]["objectives"] == ["refusal", "kl"]
    prof = json.loads((run / "profile.json").read_text())
    assert len(prof["trials"]) == len(front)
    # export the chosen trial merged; it loads in plain transformers with its provenance beside it
    out = env.parent / "exported"
    res = invoke(["optimize", "--name", "o1", "--export", "chosen", "--save", out, "--quiet"])
    assert res.exit_code == 0, output_of(res)
    assert (out / "config.json").is_file()
    assert json.loads((out / "refusal-toolkit-edit.json").read_text())["trial"] == chosen
    other = int(trials["trial"].iloc[0])
    res = invoke(["optimize", "--name", "o1", "--export", other, "--save", env.parent / "adapter", "--adapter", "--quiet"])
    assert res.exit_code == 0, output_of(res)
    assert json.loads((env.parent / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    res = invoke(["optimize", "--name", "o1", "--export", "best", "--save", env.parent / "x", "--quiet"])
    assert res.exit_code == 2 and "'chosen'" in output_of(res)
    res = invoke(["optimize", "--name", "o1", "--export", 999, "--save", env.parent / "x", "--quiet"])
    assert res.exit_code == 2 and "no trial 999" in output_of(res)


def test_optimize_resumes_after_interruption_and_extends(env, files, monkeypatch):
    from experiments import optimize as mod

    calls = {"n": 0}
    real = mod.TrialEvaluator.__call__

    def flaky(self, edit):
        if edit is not None:
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
        return real(self, edit)

    monkeypatch.setattr(mod.TrialEvaluator, "__call__", flaky)
    res = invoke(_args(files, "o2", 4, "--no-test"))
    assert res.exit_code != 0
    work = env / "optimize" / ".o2.study"
    assert (work / "study.db").is_file() and not (env / "optimize" / "o2").exists()
    res = invoke(_args(files, "o2", 4, "--no-test"))
    assert res.exit_code == 2 and "--resume" in output_of(res)  # never silently restarted
    monkeypatch.setattr(mod.TrialEvaluator, "__call__", real)
    res = invoke(_args(files, "o2", 4, "--no-test", "--resume"))
    assert res.exit_code == 0, output_of(res)
    trials = pd.read_csv(env / "optimize" / "o2" / "trials.csv")
    assert len(trials) == 4 and trials["trial"].is_unique
    # the interrupted trial's parameters were queued again and ran after the resume
    study = optuna.load_study(study_name="o2", storage=f"sqlite:///{env / 'optimize' / 'o2' / 'study.db'}")
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["interrupted"]
    assert any(t.params == failed[0].params for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    # a finished run's budget is raised with --resume
    res = invoke(_args(files, "o2", 6, "--no-test", "--resume"))
    assert res.exit_code == 0, output_of(res)
    assert len(pd.read_csv(env / "optimize" / "o2" / "trials.csv")) == 6


def test_optimize_resumes_after_sigkill(env, files):
    tiny, h, b, o = files
    args = [sys.executable, "-m", "experiments.cli"] + [str(a) for a in _args(files, "o3", 500, "--no-test")]
    proc = subprocess.Popen(args, env={**os.environ, "REFUSAL_RUNS": str(env)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    db = env / "optimize" / ".o3.study" / "study.db"
    t0, n = time.time(), 0
    try:
        while time.time() - t0 < 120 and n < 2:
            time.sleep(0.3)
            if db.is_file():
                with sqlite3.connect(db, timeout=30) as con:
                    try:
                        n = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
                    except sqlite3.OperationalError:
                        n = 0
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert n >= 2
    with sqlite3.connect(db) as con:
        complete = con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    res = invoke(_args(files, "o3", complete + 2, "--no-test", "--resume"))
    assert res.exit_code == 0, output_of(res)
    trials = pd.read_csv(env / "optimize" / "o3" / "trials.csv")
    assert len(trials) == complete + 2 and trials["trial"].is_unique


def test_optimize_bad_input(env, files):
    tiny, h, b, o = files
    for extra, msg in ((["--objectives", "speed"], "unknown objective"), (["--forms", "rotate"], "unknown edit form"),
                       (["--worker"], "no running study"), (["--save", env.parent / "s"], "--export")):
        res = invoke(_args(files, "bad", 2, *extra))
        assert res.exit_code == 2, output_of(res)
        assert msg in output_of(res)
        assert "Traceback" not in output_of(res)
    assert not (env / "optimize" / "bad").exists() and not (env / "optimize" / ".bad.study").exists()
    res = invoke(["optimize", "--resume", "--quiet"])
    assert res.exit_code == 2 and "name" in output_of(res)


def test_trials_to_target_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ttt", Path(__file__).parents[1] / "scripts" / "trials_to_target.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = pd.DataFrame({"trial": [3, 0, 1, 2], "refusal": [0.0, 0.5, 0.05, 0.2], "kl": [0.01, 0.01, 0.3, 0.05]})
    assert mod.trials_to_target(t, 0.1, 0.1) == 4  # trial 1 misses on KL; trial 3 is the 4th trial
    assert mod.trials_to_target(t, 0.01, 0.001) is None
    best = mod.best_by_budget(t, 0.1, [1, 3, 4])
    assert best[1] == 0.5 and best[3] == 0.2 and best[4] == 0.0


def test_random_control_keeps_kernel_and_form():
    from experiments.optimize import _control_state

    st = synthetic_state(3)
    ctl = _control_state(st, 11)
    assert torch.allclose(ctl.directions.norm(dim=1), st.directions.norm(dim=1), atol=1e-5)
    for p in (params(), params(scope="per_layer", form="affine", activation_scaled=True, orthogonalize=True)):
        a, b = st.edit(p), ctl.edit(p)
        assert all(torch.equal(a.strengths[c], b.strengths[c]) for c in a.strengths) and a.form == b.form
        assert (a.directions * b.directions).sum(1).abs().max() < 0.99  # another direction
    assert torch.equal(_control_state(st, 11).directions, ctl.directions)  # seeded


def test_failing_trials_are_kept_and_a_run_of_failures_stops():
    from experiments.optimize import _sampler, run_trials

    calls = {"n": 0}

    def flaky(edit):
        calls["n"] += 1
        if calls["n"] % 2:
            raise ToolkitError("norm-preserving edit zeroes a weight row")
        return {"refusal": 0.5, "kl": 0.1}

    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(None, 2, 0))
    assert run_trials(study, SearchSpace(), synthetic_state(), flaky, ("refusal", "kl"), 3, None, 0.1, False) == 3
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 3 and all("zeroes" in t.user_attrs["error"] for t in failed)

    def broken(edit):
        raise ToolkitError("always")

    with pytest.raises(ToolkitError, match="20 trials in a row"):
        run_trials(study, SearchSpace(), synthetic_state(), broken, ("refusal", "kl"), 10, None, 0.1, False)
