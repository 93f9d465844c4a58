"""The judges through the command line: score/ablate judge columns and windows, `refusal judge`, the judge recorded
in run.json, and compare refusing runs judged by different judges."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from test_cli import FAST, HARMFUL, HARMLESS, assert_ok, assert_usage_error, invoke, write_set
from test_judges import judge_lm
from toolkit.judges import LABELS, MarkersJudge


@pytest.fixture
def files(tmp_path):
    return write_set(tmp_path / "h.jsonl", HARMFUL, "h"), write_set(tmp_path / "b.jsonl", HARMLESS, "b")


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory):
    """A tiny judge model (its tokenizer has the option letters) saved as a Hugging Face folder."""
    lm = judge_lm()
    folder = tmp_path_factory.mktemp("tiny-judge")
    lm.model.save_pretrained(str(folder))
    lm.tokenizer.save_pretrained(str(folder))
    return folder


def score(files, model, name, *extra):
    h, b = files
    return invoke(["score", h, b, "--split", "test", "--model", model, *FAST, "--gen-tokens", "8",
                   "--name", name, *extra])


def test_score_records_judge_and_windows(env, files, tiny_folder):
    assert_ok(score(files, tiny_folder, "s"))
    run = env / "score" / "s"
    meta = json.loads((run / "run.json").read_text())
    assert meta["judge"] == MarkersJudge().describe()
    assert meta["params"]["windows"] == [2, 4, 8] and meta["params"]["judge"] == "markers"
    df = pd.read_csv(run / "scores.csv", keep_default_na=False)
    assert {"verdict", "confidence", "refusal@2", "refusal@4", "refusal@8"} <= set(df.columns)
    assert "refusal_markers" not in df.columns  # the markers judge is not reported beside itself
    assert set(df.verdict) <= set(LABELS)
    expect = MarkersJudge().judge([""] * len(df), df.completion.tolist())
    assert df.verdict.tolist() == list(expect.labels)
    assert df["refusal@8"].tolist() == df.refusal.tolist()  # the longest window is the whole completion
    sm = pd.read_csv(run / "summary.csv")
    for c in ("other_rate", "refusal_rate@2", "refusal_rate@4", "refusal_rate@8", "window_changed"):
        assert c in sm.columns, c
    for s, g in df.groupby("set"):
        row = sm[sm.set == s].iloc[0]
        assert row.other_rate == pytest.approx((g.verdict == "other").mean())
        assert row.window_changed == pytest.approx((g["refusal@8"] != g["refusal@4"]).mean())


def test_score_with_llm_judge_reports_markers_beside(env, files, tiny_folder, judge_folder):
    from toolkit.models import _folder_hash

    assert_ok(score(files, tiny_folder, "llm", "--judge", "llm", "--judge-model", judge_folder, "--windows", "4",
                    "--dtype", "float32"))
    run = env / "score" / "llm"
    meta = json.loads((run / "run.json").read_text())
    assert meta["judge"]["name"] == "llm" and meta["judge"]["model_hash"] == _folder_hash(Path(judge_folder))
    df = pd.read_csv(run / "scores.csv", keep_default_na=False)
    assert {"verdict", "confidence", "refusal@4", "refusal_markers", "verdict_markers"} <= set(df.columns)
    assert set(df.verdict) <= set(LABELS)
    assert df.confidence.between(1 / 3, 1).all()
    sm = pd.read_csv(run / "summary.csv")
    assert "refusal_rate_markers" in sm.columns


def test_bad_windows_and_judge(env, files, tiny_folder):
    assert_usage_error(score(files, tiny_folder, "w", "--windows", "2,x"), "--windows", "positive integers")
    assert_usage_error(score(files, tiny_folder, "w", "--windows", "9"), "--windows", "longer than the 8")
    assert_usage_error(score(files, tiny_folder, "w", "--judge", "gpt"), "--judge")
    assert_usage_error(score(files, tiny_folder, "w", "--judge", "nli"), "--judge-model", "NLI model")
    assert not (env / "score" / "w").exists()


def test_rejudge_a_run(env, files, tiny_folder, judge_folder):
    assert_ok(score(files, tiny_folder, "s"))
    assert_ok(invoke(["judge", "runs/score/s", "--judge", "markers", "--name", "again", "--quiet"]))
    run = env / "judge" / "again"
    v = pd.read_csv(run / "verdicts.csv", keep_default_na=False)
    src = pd.read_csv(env / "score" / "s" / "scores.csv", keep_default_na=False)
    assert v.completion.tolist() == src.completion.tolist()
    assert v.refusal.tolist() == src.refusal.tolist() == v.refusal_before.tolist()
    sm = pd.read_csv(run / "summary.csv")
    assert sorted(sm.set) == ["b", "h"] and (sm.agreement == 1.0).all()
    meta = json.loads((run / "run.json").read_text())
    assert meta["judge"]["name"] == "markers" and meta["results"]["source_judge"]["name"] == "markers"
    # the llm judge reads the requests from the recorded prompt files
    assert_ok(invoke(["judge", "runs/score/s", "--judge", "llm", "--judge-model", judge_folder, "--dtype",
                      "float32", "--name", "llm", "--quiet"]))
    v = pd.read_csv(env / "judge" / "llm" / "verdicts.csv", keep_default_na=False)
    assert set(v.verdict) <= set(LABELS) and len(v) == len(src)


def test_rejudge_refuses_changed_prompt_file(env, files, tiny_folder):
    assert_ok(score(files, tiny_folder, "s"))
    h, _ = files
    h.write_text(h.read_text() + "\n")
    assert_usage_error(invoke(["judge", "runs/score/s", "--name", "x"]), "changed since the run")
    assert not (env / "judge" / "x").exists()
    assert_usage_error(invoke(["judge", "runs/nope", "--name", "x"]), "no run at")


def test_compare_refuses_mixed_judges(env, files, tiny_folder):
    assert_ok(score(files, tiny_folder, "a"))
    assert_ok(score(files, tiny_folder, "b"))
    meta_path = env / "score" / "b" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["judge"] = {"name": "llm", "version": "llm-1/r256", "model": "m", "model_hash": "abc123"}
    meta_path.write_text(json.dumps(meta))
    err = assert_usage_error(invoke(["compare", "runs/score/a", "runs/score/b", "--name", "c"]),
                             "markers markers-2", "llm llm-1/r256", "--allow-mixed-judges")
    assert "not comparable" in err
    assert_ok(invoke(["compare", "runs/score/a", "runs/score/b", "--name", "c", "--allow-mixed-judges"]))
    table = pd.read_csv(env / "compare" / "c" / "comparison.csv")
    assert set(table.judge) == {"markers markers-2", "llm llm-1/r256 [abc123]"}


def test_ablate_damage_with_capability(env, files, tiny_folder, tmp_path):
    """ablate with the capability check on (cloze-scored, so the tiny tokenizer needs no letters), a short
    multi-token KL and no over-refusal set: damage.csv has one row per condition with every measure. (The tiny
    folder's tokenizer reloads as a Qwen2Tokenizer that encodes some words to nothing; these choices encode.)"""
    import torch

    from toolkit.directions import Direction
    from toolkit.models import _folder_hash

    cap = tmp_path / "cap.jsonl"
    cap.write_text("".join(json.dumps({"id": f"c{i}", "category": "facts", "question": q, "choices": ch,
                                       "answer": "A"}) + "\n"
                           for i, (q, ch) in enumerate([("what is the capital of france",
                                                         ["paris", "france", "berlin", "madrid"]),
                                                        ("tell me a story", ["a cat", "sure here it is", "paris",
                                                                             "berlin"])])))
    d = tmp_path / "d.safetensors"
    Direction(torch.randn(32, generator=torch.Generator().manual_seed(0)), layer=1, site="resid_pre", position=-1,
              model_hash=_folder_hash(Path(tiny_folder))).save(d)
    h, b = files
    r = invoke(["ablate", "--direction", d, "--harmful", h, "--harmless", b, "--model", tiny_folder, *FAST,
                "--capability", "--capability-set", cap, "--kl-tokens", "3", "--over-refusal", "none", "--name", "dm"])
    assert_ok(r)
    dm = pd.read_csv(env / "ablate" / "dm" / "damage.csv")
    assert dm.condition.tolist() == ["baseline", "ablated"]
    assert {"kl_first", "kl_multi", "ce", "capability", "capability_ci_low", "capability_n"} <= set(dm.columns)
    assert dm.capability_n.tolist() == [2, 2] and set(dm.capability) <= {0.0, 0.5, 1.0}
    meta = json.loads((env / "ablate" / "dm" / "run.json").read_text())
    assert meta["damage"]["capability"]["n"] == 2 and meta["damage"]["over_refusal"] is None
    assert meta["damage"]["kl_multi"]["tokens"] == 3
