"""Fast checks of scripts/bench_heretic.py's pure helpers (no Heretic run, no model)."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "bench_heretic.py"
_spec = importlib.util.spec_from_file_location("bench_heretic", _PATH)
bh = importlib.util.module_from_spec(_spec)
sys.modules["bench_heretic"] = bh
_spec.loader.exec_module(bh)

TRIAL_MENU = """
[bold green]Optimization finished![/]

The following trials resulted in Pareto optimal combinations of refusals and KL divergence.

Which trial do you want to use?
[1] [Trial   7] Refusals:  0/40, KL divergence: 0.4123
[2] [Trial   3] Refusals:  2/40, KL divergence: 0.0912
[3] [Trial  12] Refusals:  5/40, KL divergence: 0.0311
[4] Run additional trials
[5] Exit program
Enter number: """

ACTION_MENU = """
Restoring model from trial 3...
* Parameters:
  * direction_index = 12.3

What do you want to do with the decensored model?
[1] Save the model to a local folder
[2] Upload the model to Hugging Face
[3] Chat with the model
[4] Benchmark the model
[5] Return to the trial selection menu
Enter number: """


def test_pareto_front_and_choice():
    trials = [{"i": 1, "refusals": 5, "kl": 0.03}, {"i": 2, "refusals": 2, "kl": 0.09},
              {"i": 3, "refusals": 2, "kl": 0.2}, {"i": 4, "refusals": 0, "kl": 0.41},
              {"i": 5, "refusals": 6, "kl": 0.05}, {"i": 6, "refusals": 9, "kl": 0.01}]
    front = bh.pareto_front(trials)
    assert [t["i"] for t in front] == [4, 2, 1, 6]
    assert bh.choose_trial(front, 0.1)["i"] == 2
    assert bh.choose_trial(front, 0.5)["i"] == 4
    assert bh.choose_trial(front, 0.001)["i"] == 6  # none within the limit: lowest KL
    rates = [{"trial": 0, "refusal_rate": 0.5, "kl": 0.01}, {"trial": 1, "refusal_rate": 0.1, "kl": 0.08}]
    assert bh.choose_trial(bh.pareto_front(rates, refusals="refusal_rate"), 0.1,
                           refusals="refusal_rate")["trial"] == 1
    with pytest.raises(ValueError):
        bh.choose_trial([], 0.1)


def test_parse_menu_and_trial_titles():
    q, choices = bh.parse_menu(TRIAL_MENU)
    assert q == "Which trial do you want to use?"
    assert [i for i, _ in choices] == [1, 2, 3, 4, 5]
    assert bh.parse_trial_choice(choices[2][1]) == {"index": 12, "refusals": 5, "n": 40, "kl": 0.0311}
    assert bh.parse_trial_choice("Run additional trials") is None


def test_answer_walks_save_then_exit(tmp_path):
    state = {"save_dir": tmp_path / "m", "kl_max": 0.1}
    assert bh.answer(TRIAL_MENU, state) == "2"
    assert state["chosen"]["index"] == 3 and len(state["front"]) == 3
    assert bh.answer(ACTION_MENU, state) == "1"
    assert bh.waiting(TRIAL_MENU) and bh.waiting("x\nPath to the folder:: ") and not bh.waiting("* Evaluating...")
    assert bh.answer("\nPath to the folder:: ", state) == str(tmp_path / "m")
    assert bh.answer("How many additional trials do you want to run?: ", state) == ""
    state["saved"] = True
    assert bh.answer(ACTION_MENU, state) == "5"
    assert bh.answer(TRIAL_MENU, state) == "5"
    export = "How do you want to export the model?\n[1] Merge the abliteration LoRA and export the full model\n" \
             "[2] Export the abliteration LoRA only (can be merged later)\nEnter number: "
    assert bh.answer(export, state) == "1"
    resume = "How would you like to proceed?\n[1] Continue the previous run\n[2] Ignore the previous run and start " \
             "from scratch\n[3] Exit program\nEnter number: "
    assert bh.answer(resume, state) == "1"
    with pytest.raises(ValueError):
        bh.answer("Something else?\n[1] a\n[2] b\nEnter number: ", state)
    with pytest.raises(ValueError):
        bh.answer("Password: ", state)


def test_toml_round_trip():
    cfg = {"model": "/m", "dtypes": ["auto"], "batch_size": 16, "kl_divergence_target": 0.01, "seed": 0,
           "export_strategy": "merge", "flag": False, "system_prompt": 'say "hi"\\',
           "pairs": [["<think>", "<think></think>"]],
           "good_prompts": {"dataset": "/p/harmless_train.txt", "column": "text"}}
    assert tomllib.loads(bh.toml_dumps(cfg)) == cfg


def test_datasets_and_config(tmp_path):
    splits = {"harmful_train": ["how to a", "how to b"], "harmless_train": ["bake", "sing"],
              "harmful_eval": ["how to c"], "harmless_eval": ["paint"]}
    ds = bh.heretic_datasets(splits, tmp_path)
    assert set(ds) == {"good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts"}
    assert Path(ds["bad_prompts"]["dataset"]).read_text().splitlines() == ["how to a", "how to b"]
    assert Path(ds["good_evaluation_prompts"]["dataset"]).read_text() == "paint\n"
    cfg = bh.heretic_config("/m", ds, trials=4, startup_trials=1, batch_size=8, seed=3, system="S",
                            checkpoint_dir="/c", prefix_check=False)
    back = tomllib.loads(bh.toml_dumps(cfg))
    assert back["n_trials"] == 4 and back["n_startup_trials"] == 1 and back["batch_size"] == 8
    assert back["export_strategy"] == "merge" and back["response_prefix"] == ""
    assert back["bad_evaluation_prompts"]["dataset"].endswith("harmful_eval.txt")
    with pytest.raises(ValueError):
        bh.write_prompt_file(["two\nlines"], tmp_path / "x.txt")


def test_commands():
    venv = Path("/v")
    cmds = bh.venv_commands(venv, "2.13.0")
    assert cmds[1][-1] == "torch==2.13.0" and cmds[2][-1] == f"heretic-llm=={bh.HERETIC_VERSION}"
    assert bh.heretic_command(venv) == ["/v/bin/heretic"]
    env = bh.heretic_env({"PATH": "/bin"})
    assert env[bh.MENU_ENV] and env["PATH"] == "/bin"
    assert bh.ours_optimize_command(["refusal"], "n", "/m", 5, "S", ["--gen-tokens", "32"], startup=2, n_val=8,
                                    forms="projection") == [
        "refusal", "optimize", "--name", "n", "--model", "/m", "--trials", "5", "--force", "--no-test",
        "--startup", "2", "--n-val", "8", "--forms", "projection", "--system", "S", "--gen-tokens", "32"]
    assert bh.ours_export_command(["refusal"], "n", 3, Path("/o")) == [
        "refusal", "optimize", "--name", "n", "--export", "3", "--save", "/o", "--replace-save"]
    assert bh.default_startup_trials(200) == 60 and bh.default_startup_trials(2) == 1


def test_read_pareto_and_study(tmp_path):
    f = tmp_path / "pareto.csv"
    f.write_text("trial,refusal_rate,kl,layer\n3,0.25,0.05,10\n7,0.0,0.3,12\n")
    rows = bh.read_pareto_csv(f)
    assert rows[0]["trial"] == 3 and rows[1]["kl"] == 0.3 and rows[0]["layer"] == "10"
    f.write_text("trial,refusal,kl,seconds\n3,0.25,0.05,10\n7,0.0,0.3,\n")  # refusal optimize's own columns
    assert [r["refusal_rate"] for r in bh.read_pareto_csv(f)] == [0.25, 0.0]
    assert bh.mean_column(f, "seconds") == (2, 10.0)
    study = {"trials": [
        {"number": 0, "state": "COMPLETE", "params": {"a": 1}, "duration_s": 10.0,
         "user_attrs": {"index": 1, "refusals": 4, "kl_divergence": 0.02, "n_bad_prompts": 10}},
        {"number": 1, "state": "FAIL", "params": {}, "user_attrs": {}, "duration_s": None}]}
    t = bh.heretic_trials(study)
    assert len(t) == 1 and t[0]["index"] == 1 and t[0]["refusals"] == 4 and t[0]["n"] == 10


def test_phase_times():
    lines = [(0.0, "banner"), (1.0, "Loading model /m..."), (5.0, "Loading good prompts from x"),
             (6.0, "Checking for common response prefix..."), (20.0, "Loading good evaluation prompts from y"),
             (30.0, "Calculating per-layer refusal directions..."), (40.0, "Running trial 1 of 2..."),
             (41.0, "* Resetting model..."), (42.0, "* Abliterating..."), (44.0, "* Evaluating..."),
             (54.0, "Elapsed time: 14s"), (55.0, "Running trial 2 of 2..."), (56.0, "* Abliterating..."),
             (57.0, "* Evaluating..."), (67.0, "Elapsed time: 27s"), (68.0, "Optimization finished!"),
             (70.0, "* Abliterating..."), (80.0, "Model saved to /o.")]
    ph = bh.phase_times(lines)
    assert ph["load model"] == 4.0 and ph["response prefix check"] == 14.0 and ph["base evaluation"] == 10.0
    assert ph["trials"] == 28.0 and ph["menu and save"] == 12.0
    assert ph["trial: abliterate"] == 3.0 and ph["trial: evaluate"] == 20.0
    assert bh.phase_times([]) == {}


def test_kl_and_format():
    torch = pytest.importorskip("torch")
    a = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(bh.kl_first_token(a, a), torch.zeros(2, dtype=torch.float64))
    kl = bh.kl_first_token(a, torch.zeros(2, 3))
    assert kl[0] > 0 and kl[1] == 0
    assert bh.fmt_seconds(None) == "-" and bh.fmt_seconds(30) == "30.0 s" and bh.fmt_seconds(600) == "10.0 min"


def test_saved_dtype(tmp_path):
    (tmp_path / "config.json").write_text('{"torch_dtype": "bfloat16"}')
    assert bh.saved_dtype(tmp_path) == "bfloat16"
    assert bh.saved_dtype(tmp_path / "missing") is None
