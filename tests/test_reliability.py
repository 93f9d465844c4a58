"""One test (or a small group) per cause of issue 11's bad-input run: each reproduces the failure seen on d503d01
(a silent wrong result, a lost run, a traceback where one ``error:`` line is promised, or a misleading message)
and checks the fixed behaviour exactly. Causes are numbered as in the issue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_lm
from test_cli import D_MODEL, FAST, assert_ok, assert_usage_error, invoke, output_of, tiny_files, write_set
from toolkit.directions import load_direction, save_direction
from toolkit.errors import ToolkitError
from toolkit.models import _folder_hash, resolve_device
from toolkit.prompts import PromptSet, distinct_names, load_prompt_set
from toolkit.runs import OWNER_FILE, STALE_AFTER_S, Run, check_name, clean_stale, default_name, load_run
from toolkit.selection import SelectionConfig

REPO = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict:
    """Every path below ``folder`` (hidden ones included) with its size and mtime: 'nothing new on disk'."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def finish(run: Run, results=None) -> Path:
    return run.finish(model=None, prompt_sets=[], seed=0, params={}, results=results or {})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Qwen2 checkpoint, the harmful/harmless sets, and a direction file that fits the checkpoint."""
    base = tmp_path_factory.mktemp("reliability")
    model, h, b = tiny_files(base)
    direction = base / "dir.safetensors"
    save_direction(direction, torch.randn(D_MODEL, generator=torch.Generator().manual_seed(0)),
                   {"model_id": str(model), "model_hash": _folder_hash(model), "d_model": D_MODEL, "layer": 1,
                    "pos": -1, "site": "resid_pre"})
    return {"base": base, "model": model, "h": h, "b": b, "direction": direction}


# ------------------------------------------------------------------------ 1. identity from the weights' content
def test_1_checkpoints_with_one_config_and_equal_sizes_have_different_hashes(tmp_path, cache):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((a, 0), (b, 1)):
        lm = make_lm("qwen2", seed=seed)
        lm.model.save_pretrained(str(folder))
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    assert [p.stat().st_size for p in sorted(a.glob("*.safetensors"))] == \
        [p.stat().st_size for p in sorted(b.glob("*.safetensors"))]
    assert _folder_hash(a) != _folder_hash(b)  # d503d01: equal (config bytes + names and sizes only)
    # a copy of the same bytes is the same model; the digests are memoised by path, size and mtime
    c = tmp_path / "c"
    c.mkdir()
    for p in a.iterdir():
        (c / p.name).write_bytes(p.read_bytes())
    assert _folder_hash(c) == _folder_hash(a)
    memo = json.loads((cache / "hashes.json").read_text())
    assert any(k.startswith(str((a / "model.safetensors").resolve()) + "|") for k in memo)
    # editing one weight in place (same size) changes the identity
    from safetensors.torch import load_file
    w = load_file(str(c / "model.safetensors"))
    k = next(iter(w))
    w[k] = w[k] + 1
    save_file(w, str(c / "model.safetensors"), metadata={"format": "pt"})
    assert (c / "model.safetensors").stat().st_size == (a / "model.safetensors").stat().st_size
    assert _folder_hash(c) != _folder_hash(a)


def test_1_ablate_refuses_a_direction_of_a_fine_tune_with_the_same_config(files, env, tmp_path):
    other = tmp_path / "finetune"
    lm = make_lm("qwen2", seed=7)
    lm.model.save_pretrained(str(other))
    lm.tokenizer.save_pretrained(str(other))
    res = invoke(["ablate", "--direction", files["direction"], "--harmful", files["h"], "--harmless", files["b"],
                  "--model", other, *FAST, "--limit", "1"])
    assert_usage_error(res, "direction was extracted from model")
    assert not env.exists()


# ------------------------------------------------------------------------ 2. no silent replacement of runs
def test_2_a_second_run_of_one_name_fails_at_start_and_the_first_publishes(tmp_path):
    root = tmp_path / "runs"
    with Run("score", "same", root=root) as first:
        with pytest.raises(ToolkitError, match="being written by another process"):
            Run("score", "same", root=root)
        with pytest.raises(ToolkitError, match="being written by another process"):
            Run("score", "same", force=True, root=root)  # --force cannot take a live run's name either
        finish(first, {"v": 1})
    assert sorted(os.listdir(root / "score")) == ["same"]
    assert sorted(os.listdir(root / "score" / "same")) == ["run.json"]  # the owner file is not published


def test_2_finish_refuses_a_run_that_appeared_meanwhile_unless_forced(tmp_path):
    root = tmp_path / "runs"
    run = Run("score", "raced", root=root)
    with run:
        final = root / "score" / "raced"
        final.mkdir()
        (final / "run.json").write_text('{"theirs": true}')
        with pytest.raises(ToolkitError, match="created by another command"):
            finish(run)  # d503d01: moved the other run aside and replaced it, exit 0
    assert json.loads((final / "run.json").read_text()) == {"theirs": True}
    assert sorted(os.listdir(root / "score")) == ["raced"]
    with Run("score", "raced2", root=root, force=True) as run2:
        (root / "score" / "raced2").mkdir()
        (root / "score" / "raced2" / "run.json").write_text("{}")
        got = finish(run2, {"v": 2})  # forced: replaced
    assert json.loads((got / "run.json").read_text())["results"] == {"v": 2}


def test_2_default_names_are_unique_within_one_second(tmp_path, monkeypatch):
    """20 names in one second: distinct unless two 24-bit suffixes meet (probability 1.1e-5). And when names do
    meet, the second command fails at start instead of replacing the first (d503d01: timestamps only, 3 of 6
    same-second starts collided and the later run won)."""
    names = {default_name() for _ in range(20)}
    assert len(names) == 20
    assert all(len(n.split("-")) == 3 and len(n.split("-")[2]) == 6 for n in names)
    import toolkit.runs

    monkeypatch.setattr(toolkit.runs, "default_name", lambda: "20261202-000000-abcdef")
    with Run("score", root=tmp_path) as first:
        with pytest.raises(ToolkitError, match="being written by another process"):
            Run("score", root=tmp_path)
        finish(first)
    with pytest.raises(ToolkitError, match="already exists"):
        Run("score", root=tmp_path)


def test_2_two_commands_started_together_with_one_name_cannot_both_succeed(files, env):
    """Two real processes (as `xargs -P` would start them): exactly one run is published; the other command
    exits 2 with one error line."""
    args = [sys.executable, "-m", "experiments.entry", "score", str(files["h"]), "--model", str(files["model"]),
            "--limit", "2", "--gen-tokens", "2", "--quiet", "--name", "same", "--dtype", "float32"]
    envv = {**os.environ, "REFUSAL_RUNS": str(env), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=REPO, env=envv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], (codes, outs)
    loser = outs[[p.returncode for p in procs].index(2)][1]
    assert "Traceback" not in loser and sum(line.startswith("error:") for line in loser.splitlines()) == 1
    assert sorted(os.listdir(env / "score")) == ["same"]


# ------------------------------------------------------------------------ 3. --save and --force
def test_3_ablate_save_force_never_deletes_a_folder(files, env, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    common = ["ablate", "--direction", files["direction"], "--harmful", files["h"], "--harmless", files["b"],
              "--model", files["model"], *FAST, "--limit", "1"]
    before = tree(files["model"])
    assert_usage_error(invoke(common + ["--save", mine, "--force"]), "already exists")
    assert_usage_error(invoke(common + ["--save", mine, "--force", "--replace-save"]), "not a checkpoint folder")
    assert (mine / "notes.txt").read_text() == "the user's"
    # d503d01: --save MODEL --force deleted the model folder being evaluated
    assert_usage_error(invoke(common + ["--save", files["model"], "--force", "--replace-save"]),
                       "over the source checkpoint")
    assert tree(files["model"]) == before and not env.exists()


# ------------------------------------------------------------------------ 4. compare validates first
def _fake_run(root: Path, command: str, name: str, summary: str | None) -> Path:
    with Run(command, name, root=root) as run:
        if summary is not None:
            run.path("summary.csv").write_text(summary)
        return finish(run)


@pytest.mark.parametrize("command, summary, needle", [
    ("steer", "set,kind,alpha,mean_score\nh,learned,1,0.5\n", "compare reads score, extract, ablate"),
    ("dose-response", "role,alpha,refusal_rate\nharmful,1,0.5\n", "'dose-response' run"),
    ("patch", "direction,component,mean\nd,attn,0.1\n", "'patch' run"),
    ("score", "", "unreadable summary"),
    ("score", "set,split\nh,test\n", "missing column 'condition'"),
])
def test_4_compare_refuses_what_it_cannot_read_before_the_run_exists(env, command, summary, needle):
    src = _fake_run(env, command, "src", summary)
    before = tree(env)
    assert_usage_error(invoke(["compare", src, "--name", "cmp"]), needle)
    assert tree(env) == before  # d503d01: KeyError after runs/compare/cmp was published


# ------------------------------------------------------------------------ 5. bounds at the boundary
@pytest.mark.parametrize("args, needle", [
    (["score", "--seed", "-1"], "--seed"),
    (["score", "--seed", str(2**64)], "--seed"),
    (["dose-response", "--direction", "x", "--seed", "-1"], "--seed"),
    (["cones", "--seed", "-5"], "--seed"),
    (["patch", "--seed", "-1"], "--seed"),
    (["score", "--limit", "0"], "--limit"),
    (["score", "--batch-size", "0"], "--batch-size"),
    (["steer", "--top-k", "0"], "--top-k"),
    (["cones", "--k-max", "1"], "--k-max"),
    (["plot-residuals", "--fps", "nan"], "--fps"),
    (["plot-residuals", "--fps", "inf"], "--fps"),
    (["extract", "--kl-max", "nan"], "--kl-max"),
    (["extract", "--kl-max", "inf"], "--kl-max"),
    (["extract", "--kl-max", "-1"], "--kl-max"),
    (["extract", "--max-layer-frac", "nan"], "--max-layer-frac"),
])
def test_5_out_of_range_options_fail_before_the_model_loads(env, args, needle, monkeypatch):
    import toolkit.models

    monkeypatch.setattr(toolkit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert_usage_error(invoke(args), needle)
    assert not env.exists()


def test_5_a_nan_kl_threshold_is_refused_by_the_engine_too():
    with pytest.raises(ToolkitError, match="kl_max"):
        SelectionConfig(kl_max=float("nan")).check()  # d503d01: accepted, so the KL filter passed everything


# ------------------------------------------------------------------------ 6. file-system problems
def test_6_runs_folder_that_is_a_file(tmp_path, monkeypatch, files):
    bogus = tmp_path / "runs-file"
    bogus.write_text("not a folder")
    monkeypatch.setenv("REFUSAL_RUNS", str(bogus))
    assert_usage_error(invoke(["score", files["h"], "--model", files["model"], *FAST]), "is a file")
    assert bogus.read_text() == "not a folder"


def test_6_unwritable_runs_folder(tmp_path, monkeypatch):
    root = tmp_path / "runs"

    def deny(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", deny)  # root ignores chmod; a read-only file system behaves like this
    with pytest.raises(ToolkitError, match="cannot write runs under .*Permission denied"):
        Run("score", "x", root=root)
    monkeypatch.undo()
    full = Path.write_text

    def disk_full(self, *a, **k):
        if self.name == OWNER_FILE:
            raise OSError(28, "No space left on device")
        return full(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(ToolkitError, match="No space left"):
        Run("score", "x", root=root)
    assert not root.exists()  # neither the temporary folder nor the runs folders it made


def test_6_long_names_and_save_below_a_file(files, env, tmp_path):
    assert_usage_error(invoke(["score", files["h"], "--model", files["model"], "--name", "n" * 300]), "too long")
    assert check_name("n" * 200) == "n" * 200
    afile = tmp_path / "afile"
    afile.write_text("x")
    t0 = time.time()
    res = invoke(["ablate", "--direction", files["direction"], "--harmful", files["h"], "--harmless", files["b"],
                  "--model", files["model"], *FAST, "--save", afile / "sub" / "out"])
    assert_usage_error(res, "is a file, not a folder")
    assert "baseline" not in output_of(res)  # refused before any evaluation (d503d01: after all of it)
    assert time.time() - t0 < 60 and not env.exists()


# ------------------------------------------------------------------------ 7. no markup in messages
@pytest.mark.parametrize("name", ["in/prompts[test].jsonl", "in/old[/v1].jsonl", "in/[bold]x[/].jsonl"])
def test_7_user_text_in_errors_is_printed_verbatim(env, name):
    line = assert_usage_error(invoke(["score", name]))
    assert name in line  # d503d01: a different name, or a MarkupError traceback


def test_7_hints_in_brackets_survive():
    from experiments.shared import handle_errors

    @handle_errors
    def fail():
        raise ToolkitError("direction has shape [3, 4], expected [d_model]")

    import typer
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command()(fail)
    res = CliRunner().invoke(app, [])
    assert_usage_error(res, "expected [d_model]", "[3, 4]")


# ------------------------------------------------------------------------ 8. empty layer ranges
@pytest.mark.parametrize("spec", ["5:5", "3:1"])
@pytest.mark.parametrize("command", ["extract", "steer"])
def test_8_empty_layer_ranges_are_refused_before_the_model_loads(files, env, command, spec, monkeypatch):
    import toolkit.models

    monkeypatch.setattr(toolkit.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    args = [command, "--model", files["model"], "--layers", spec, "--quiet"]
    if command == "extract":
        args += ["--harmful", files["h"], "--harmless", files["b"]]
    else:
        args += ["--direction", files["direction"], "--sets", files["h"]]
    assert_usage_error(invoke(args), "names no layer")  # d503d01: ValueError from max() after the load
    assert not env.exists()


# ------------------------------------------------------------------------ 9. truncated tensors in a run
def test_9_imprint_of_a_truncated_directions_file(env):
    with Run("cones", "c", root=env) as run:
        good = run.path("directions.safetensors")
        save_file({"directions": torch.randn(3, 8), "layers": torch.arange(3), "resid_norm": torch.ones(3)},
                  str(good), metadata={"meta": json.dumps({"position": -1, "site": "resid_pre"})})
        good.write_bytes(good.read_bytes()[:100])
        folder = finish(run)
    before = tree(env)
    assert_usage_error(invoke(["imprint", folder]), "truncated or not a safetensors file")
    assert tree(env) == before


# ------------------------------------------------------------------------ 10. devices
@pytest.mark.parametrize("device, needle", [("meta", "unknown device"), ("mps", "not available"),
                                            ("bogus", "unknown device"), ("xla", "unknown device")])
def test_10_devices_that_cannot_run_here(device, needle, files, env):
    if device == "mps" and torch.backends.mps.is_available():  # pragma: no cover - an Apple machine
        pytest.skip("MPS exists here")
    with pytest.raises(ToolkitError, match=needle):
        resolve_device(device)
    assert_usage_error(invoke(["score", files["h"], "--model", files["model"], "--device", device]), needle)
    assert not env.exists()


# ------------------------------------------------------------------------ 11. direction metadata
@pytest.mark.parametrize("meta", ["[1, 2]", "\"text\"", "not json", "null"])
def test_11_direction_metadata_that_is_not_an_object(files, env, tmp_path, meta):
    f = tmp_path / "d.safetensors"
    save_file({"direction": torch.ones(D_MODEL)}, str(f), metadata={"meta": meta})
    with pytest.raises(ToolkitError, match="not a JSON object"):
        load_direction(f)
    res = invoke(["ablate", "--direction", f, "--harmful", files["h"], "--harmless", files["b"], "--model",
                  files["model"], *FAST])
    assert_usage_error(res, "not a JSON object")  # d503d01: AttributeError
    assert not env.exists()


# ------------------------------------------------------------------------ 12. Ctrl-C during start-up
def test_12_interrupt_while_importing_is_one_line(monkeypatch, capsys):
    import experiments.entry as entry

    class Interrupting:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "experiments.cli", Interrupting())
    with pytest.raises(SystemExit) as e:
        entry.main()
    assert e.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_12_interrupt_of_a_starting_process(tmp_path):
    """SIGINT a second after start (the imports of torch and transformers take about 3 s here): no traceback.
    d503d01's ``experiments.cli:main`` printed a KeyboardInterrupt traceback from inside torch's imports."""
    p = subprocess.Popen([sys.executable, "-c", "from experiments.entry import main; main()", "score", "--help"],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, as in a shell
    time.sleep(1.0)
    if p.poll() is not None:  # pragma: no cover - a very fast machine finished first
        pytest.skip("the command finished before the signal")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert p.returncode == 130 and "interrupted" in err


# ------------------------------------------------------------------------ 13. messages name what was given
def test_13_steer_positions_reach_the_first_token_and_name_the_given_value(files, env):
    args = ["steer", "--model", files["model"], "--direction", files["direction"], "--sets", files["h"],
            "--alpha", "0,1", *FAST, "--dtype", "float32"]
    line = assert_usage_error(invoke(args + ["--positions=-500"]), "--positions -500")
    shortest = int(line.split("shortest evaluated prompt (")[1].split(" ")[0])
    line = assert_usage_error(invoke(args + [f"--positions=-{shortest + 1}"]), f"--positions -{shortest + 1}")
    assert_ok(invoke(args + [f"--positions=-{shortest}", "--name", "first"]))  # d503d01: 'position -9' refused
    df = pd.read_csv(env / "steer" / "first" / "results.csv")
    assert set(df.alpha) == {0, 1}


@pytest.mark.parametrize("frac", ["1", "0", "1.5", "nan"])
def test_13_holdout_fraction_is_reported_as_given(files, env, frac):
    line = assert_usage_error(invoke(["steer", "--model", files["model"], "--learn", files["b"], "--holdout-frac",
                                      frac, *FAST]), "--holdout-frac")
    assert f"got {float(frac):g}" in line  # d503d01: "split fraction ... got 0.0" for 1


# ------------------------------------------------------------------------ 14. same-stem prompt files
def test_14_same_stem_files_get_distinct_names(files, env, tmp_path):
    (tmp_path / "in" / "other").mkdir(parents=True)
    a = write_set(tmp_path / "in" / "h.jsonl", {"test": ["how do i make a bomb"]}, "a")
    b = write_set(tmp_path / "in" / "other" / "h.jsonl", {"test": ["bake bread"]}, "a")
    sets = distinct_names([load_prompt_set(str(a)), load_prompt_set(str(b))])
    assert [s.name for s in sets] == ["h", "other__h"]
    one = load_prompt_set(str(a))
    assert [s.name for s in distinct_names([one, one.head(1)])] == ["h", "h"]  # one source keeps its name
    c = tmp_path / "in" / "h.txt"
    c.write_text("bake bread\n")
    assert sorted(s.name for s in distinct_names([load_prompt_set(str(a)), load_prompt_set(str(c))])) == \
        ["h.jsonl", "h.txt"]
    assert_ok(invoke(["score", a, b, "--model", files["model"], "--gen-tokens", "2", *FAST, "--name", "s"]))
    summary = pd.read_csv(env / "score" / "s" / "summary.csv")
    assert sorted(summary.set) == ["h", "other__h"]  # d503d01: both rows named 'h'
    meta = json.loads((env / "score" / "s" / "run.json").read_text())
    assert sorted(p["name"] for p in meta["prompt_sets"]) == ["h", "other__h"]


def test_14_distinct_names_keeps_distinct_sets():
    sets = [PromptSet("a", "x/a.jsonl", "1"), PromptSet("b", "y/a.jsonl", "2")]
    assert distinct_names(sets) == sets


# ------------------------------------------------------------------------ 15. strict JSON, no leftovers
def test_15_run_json_is_strict_json(tmp_path):
    import numpy as np

    with Run("score", "nan", root=tmp_path) as run:
        final = run.finish(model=None, prompt_sets=[], seed=0, params={"x": float("inf")},
                           results={"a": float("nan"), "b": [1.0, float("-inf")], "c": np.float32("nan"),
                                    "d": np.float64(2.5)})

    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")

    doc = json.loads((final / "run.json").read_text(), parse_constant=refuse)
    assert doc["results"] == {"a": None, "b": [1.0, None], "c": None, "d": 2.5} and doc["params"] == {"x": None}


def test_15_a_failed_first_command_leaves_no_folder(env, files):
    assert_usage_error(invoke(["score", files["h"], "--model", env.parent / "no-such-model"]), "no such model")
    assert not env.exists()  # d503d01: an empty runs/score/


def test_15_abandoned_temporaries_are_cleaned_at_the_next_start(tmp_path):
    parent = tmp_path / "runs" / "score"
    parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    def tmp(name, owner, age=0.0):
        d = parent / name
        d.mkdir()
        (d / "partial.csv").write_text("x")
        if owner is not None:
            (d / OWNER_FILE).write_text(json.dumps(owner))
        if age:
            os.utime(d, (time.time() - age, time.time() - age))
        return d

    host = socket.gethostname()
    killed = tmp(".killed.tmp", {"host": host, "pid": dead.pid})
    alive = tmp(".alive.tmp", {"host": host, "pid": os.getpid()})
    old = tmp(".old.tmp-abc123", None, age=STALE_AFTER_S + 60)  # d503d01's mkdtemp name, no owner
    fresh = tmp(".fresh.tmp-abc123", None)
    far_old = tmp(".far.tmp", {"host": host + "-elsewhere", "pid": 1}, age=STALE_AFTER_S + 60)
    far_new = tmp(".farnew.tmp", {"host": host + "-elsewhere", "pid": 1})
    with Run("score", "next", root=tmp_path / "runs") as run:
        finish(run)
    assert not killed.exists() and not old.exists() and not far_old.exists()
    assert alive.exists() and fresh.exists() and far_new.exists()
    assert clean_stale(parent) == []


# ------------------------------------------------------------------------ 16. the user's umask
def test_16_run_folders_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with Run("score", "m", root=tmp_path / "runs") as run:
            final = finish(run)
    finally:
        os.umask(old)
    assert final.stat().st_mode & 0o777 == 0o755  # d503d01: 0o700 from mkdtemp
    assert (final / "run.json").stat().st_mode & 0o777 == 0o644
    folder, meta = load_run(final, "score")
    assert folder == final and meta["name"] == "m"


def test_16_saved_checkpoints_follow_the_umask(tmp_path):
    from toolkit.models import write_checkpoint

    lm = make_lm("qwen2")
    old = os.umask(0o027)
    try:
        write_checkpoint(lm.model, lm.tokenizer, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o750  # d503d01: 0o700 from mkdtemp
    assert (tmp_path / "ckpt" / "config.json").stat().st_mode & 0o777 == 0o640
