"""scripts/improvements_study.py end to end on the tiny Qwen2 folder (2 seeds, tiny sizes), the CLI invoked in
process through Typer's CliRunner (the script's ``invoke`` hook), and its statistics against scipy/statsmodels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from statsmodels.stats.multitest import multipletests

from test_cli import PERMISSIVE, invoke, output_of, tiny_files

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import improvements_study as study  # noqa: E402

ARMS_RUN = ["dim", "probe", "caa", "act-scaled", "norm-preserving", "affine"]


def args_for(model, h, b, *extra):
    return ["--models", str(model), "--seeds", "0,1", "--n-train", "3", "--n-val", "4", "--limit", "4",
            "--gen-tokens", "3", "--harmful", str(h), "--harmless", str(b), "--over-refusal", "none", "--dtype",
            "float32", "--batch-size", "4", "--quiet", "--extract-args", " ".join(PERMISSIVE), "--name", "t", *extra]


class Recorder:
    """The script's ``invoke``: the CLI through CliRunner, each call recorded."""

    def __init__(self):
        self.calls, self.failures = [], []

    def __call__(self, args):
        r = invoke(args)
        self.calls.append(list(args))
        if r.exit_code:
            self.failures.append((args[:2], output_of(r)))
        return r.exit_code


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The study run once, then again (resume) in the same runs folder."""
    base = tmp_path_factory.mktemp("study")
    model, h, b = tiny_files(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REFUSAL_RUNS", str(base / "runs"))
        mp.setenv("TQDM_DISABLE", "1")
        mp.chdir(base)
        first = Recorder()
        rc1 = study.main(args_for(model, h, b), invoke=first)
        table1 = (base / "runs" / "study" / "t" / "table.csv").read_text()
        second = Recorder()
        rc2 = study.main(args_for(model, h, b), invoke=second)
    return {"base": base, "runs": base / "runs", "model": model, "rc": (rc1, rc2), "first": first,
            "second": second, "out": base / "runs" / "study" / "t", "table1": table1}


def test_study_runs_every_arm_and_writes_the_table(done):
    assert done["first"].failures == [] and done["rc"][0] == 0
    runs = done["runs"]
    for s in (0, 1):
        for m in ("diff-means", "probe", "caa"):
            assert (runs / "extract" / f"study-tiny-qwen2-{m}-s{s}" / "run.json").is_file()
        for arm in ARMS_RUN:
            meta = json.loads((runs / "ablate" / f"study-tiny-qwen2-{arm}-s{s}" / "run.json").read_text())
            assert meta["seed"] == s and meta["params"]["split"] == "test" and meta["params"]["limit"] == 4
            method = {"probe": "probe", "caa": "caa"}.get(arm, "diff-means")
            assert meta["params"]["direction"].endswith(f"study-tiny-qwen2-{method}-s{s}")
            assert meta["params"]["form"] == {"act-scaled": "projection", "norm-preserving": "norm-preserving",
                                              "affine": "affine"}.get(arm)
            assert meta["params"]["activation_scaled"] == (arm == "act-scaled")
    extract = [c for c in done["first"].calls if c[0] == "extract"]
    assert all("--sample" in c and c[c.index("--n-train") + 1] == "3" for c in extract)
    table = pd.read_csv(done["out"] / "table.csv")
    assert list(table.arm) == ARMS_RUN and set(table.model) == {"tiny-qwen2"}
    assert (table.n_seeds == 2).all()
    assert table.set_index("arm").loc["dim", "survives"] == "baseline"
    assert set(table.survives[table.arm != "dim"]) <= {"yes", "no"}
    md = (done["out"] / "table.md").read_text()
    assert "| survives" in md.replace("  ", " ") or "survives |" in md
    assert md.count("\n") == len(ARMS_RUN) + 2


def test_seed_values_and_statistics_match_direct_computation(done):
    runs = done["runs"]
    per_seed = pd.read_csv(done["out"] / "per_seed.csv")
    assert len(per_seed) == 2 * len(ARMS_RUN)
    for _, r in per_seed.iterrows():  # the seed-level values are the ablate run's own summary
        sm = pd.read_csv(runs / "ablate" / r.run / "summary.csv")
        ab = sm[sm.condition == "ablated"].set_index("set")
        assert r.refusal == pytest.approx(ab.loc["h", "refusal_rate"])
        assert r.kl == pytest.approx(ab.loc["b", "mean_kl"])
        assert np.isnan(r.over_refusal)
    table = pd.read_csv(done["out"] / "table.csv").set_index("arm")
    dim = per_seed[per_seed.arm == "dim"].set_index("seed")
    for arm, g in per_seed.groupby("arm"):
        g = g.set_index("seed").sort_index()
        assert table.loc[arm, "kl_mean"] == pytest.approx(g.kl.mean())
        assert table.loc[arm, "kl_sd"] == pytest.approx(g.kl.std(ddof=1))
        assert table.loc[arm, "refusal_mean"] == pytest.approx(g.refusal.mean())
        if arm != "dim":
            want = st.ttest_rel(g.refusal.to_numpy(), dim.loc[g.index, "refusal"].to_numpy())
            assert np.isnan(table.loc[arm, "p"]) == np.isnan(want.pvalue)
            if not np.isnan(want.pvalue):
                assert table.loc[arm, "p"] == pytest.approx(want.pvalue)
    # the toolkit's own stats commands back the table: seeds per arm, a per-prompt test per arm and seed
    for arm in ARMS_RUN:
        seeds = pd.read_csv(runs / "stats" / f"study-tiny-qwen2-{arm}-seeds" / "seeds.csv")
        row = seeds[(seeds.set == "b") & (seeds.condition == "ablated") & (seeds.metric == "mean_kl")].iloc[0]
        assert row["mean"] == pytest.approx(table.loc[arm, "kl_mean"])
        assert row["sd"] == pytest.approx(table.loc[arm, "kl_sd"])
        if arm != "dim":
            for s in (0, 1):
                tt = pd.read_csv(runs / "stats" / f"study-tiny-qwen2-{arm}-vs-dim-s{s}" / "ttest.csv")
                assert tt.test.iloc[0] == "exact McNemar test" and tt.n_pairs.iloc[0] == 4
                got = per_seed[(per_seed.arm == arm) & (per_seed.seed == s)].mcnemar_p_vs_dim.iloc[0]
                assert got == pytest.approx(tt.p_value.iloc[0])


def test_study_table_against_scipy_and_statsmodels():
    """Refusal rates that differ between seeds (the tiny model's test prompts all comply, so the e2e p is NaN)."""
    rng = np.random.default_rng(0)
    rows = []
    dim = [0.9, 0.8, 0.85]
    arms = {"dim": dim, "a": [0.2, 0.25, 0.15], "b": [0.88, 0.9, 0.7], "c": [0.1, 0.6, 0.3]}
    kls = {"dim": [0.1, 0.12, 0.11], "a": [0.1, 0.11, 0.12], "b": [0.05, 0.05, 0.06], "c": [0.5, 0.6, 0.7]}
    for arm, vals in arms.items():
        for s, v in enumerate(vals):
            rows.append({"model": "m", "arm": arm, "seed": s, "refusal": v, "over_refusal": rng.random(),
                         "kl": kls[arm][s]})
    table = study.study_table(pd.DataFrame(rows)).set_index("arm")
    ps = []
    for arm in ("a", "b", "c"):
        want = st.ttest_rel(arms[arm], dim)
        d = np.subtract(arms[arm], dim)
        assert table.loc[arm, "p"] == pytest.approx(want.pvalue)
        assert table.loc[arm, "t"] == pytest.approx(want.statistic)
        assert table.loc[arm, "d_z"] == pytest.approx(d.mean() / d.std(ddof=1))
        assert table.loc[arm, "refusal_sd"] == pytest.approx(np.std(arms[arm], ddof=1))
        ps.append(want.pvalue)
    holm = multipletests(ps, method="holm")[1]
    assert list(table.loc[["a", "b", "c"], "p_holm"]) == pytest.approx(list(holm))
    # a: lower refusal, Holm p < 0.05 (checked), KL within dim's mean + SD -> survives; b: not significant;
    # c: KL far above dim's
    assert holm[0] < 0.05
    assert table.loc["a", "survives"] == "yes" and table.loc["b", "survives"] == "no"
    assert table.loc["c", "survives"] == "no" and table.loc["dim", "survives"] == "baseline"
    # the KL rule: paired t-tests of KL against dim, Holm across arms
    kps = []
    for arm in ("a", "b", "c"):
        want = st.ttest_rel(kls[arm], kls["dim"])
        assert table.loc[arm, "kl_p"] == pytest.approx(want.pvalue)
        assert table.loc[arm, "kl_diff"] == pytest.approx(np.mean(np.subtract(kls[arm], kls["dim"])))
        kps.append(want.pvalue)
    assert list(table.loc[["a", "b", "c"], "kl_p_holm"]) == pytest.approx(list(multipletests(kps, method="holm")[1]))
    # b: refusal within dim's mean + SD and KL lower (0.053 vs 0.110, consistent) -> survives on KL iff Holm p < 0.05;
    # a: refusal lower but KL not lower; c: KL higher
    assert table.loc["b", "survives_kl"] == ("yes" if table.loc["b", "kl_p_holm"] < 0.05 else "no")
    assert table.loc["a", "survives_kl"] == "no" and table.loc["c", "survives_kl"] == "no"
    assert table.loc["dim", "survives_kl"] == "baseline"


def test_study_table_kl_rule_when_dim_removes_every_refusal():
    """dim at zero refusal: an arm at zero refusal and consistently lower KL survives on KL; one with more refusals
    does not, however low its KL."""
    rows = []
    vals = {"dim": ([0.0, 0.0, 0.0], [0.10, 0.12, 0.09]), "low": ([0.0, 0.0, 0.0], [0.05, 0.06, 0.045]),
            "leaky": ([0.05, 0.1, 0.05], [0.01, 0.012, 0.011])}
    for arm, (ref, kl) in vals.items():
        for s in range(3):
            rows.append({"model": "m", "arm": arm, "seed": s, "refusal": ref[s], "over_refusal": 0.0, "kl": kl[s]})
    table = study.study_table(pd.DataFrame(rows)).set_index("arm")
    p_low = st.ttest_rel(vals["low"][1], vals["dim"][1]).pvalue
    p_leaky = st.ttest_rel(vals["leaky"][1], vals["dim"][1]).pvalue
    holm = multipletests([p_low, p_leaky], method="holm")[1]
    assert table.loc["low", "kl_p_holm"] == pytest.approx(holm[0])
    assert table.loc["low", "survives"] == "no"  # cannot beat zero refusals
    assert table.loc["low", "survives_kl"] == ("yes" if holm[0] < 0.05 else "no")
    assert holm[0] < 0.05  # the synthetic effect is large and consistent
    assert table.loc["leaky", "survives_kl"] == "no"


def test_second_run_resumes_without_rerunning(done):
    assert done["rc"][1] == 0 and done["second"].failures == []
    assert not [c for c in done["second"].calls if c[0] in ("extract", "ablate")]
    steps = pd.read_csv(done["out"] / "steps.csv")
    made = steps[steps.command.isin(["extract", "ablate"])]
    assert len(made) == 2 * (3 + len(ARMS_RUN)) and (made.status == "skipped (exists)").all()
    assert (done["out"] / "table.csv").read_text() == done["table1"]  # the same runs give the same table
    assert any(c[:2] == ["stats", "seeds"] for c in done["second"].calls)  # the stats are redone from the runs


@pytest.mark.parametrize("extra, needle", [
    (["--models", "no-such-alias"], "no-such-alias"),
    (["--arms", "dim,bogus"], "unknown arm 'bogus'"),
    (["--seeds", "0"], "--seeds"),
    (["--limit", "0"], "--limit"),
    (["--heads-from", "other=p"], "not one of --models"),
])
def test_bad_input_exits_2_before_any_run(tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "runs"))
    rec = Recorder()
    rc = study.main(["--models", str(tmp_path), *extra], invoke=rec)
    err = capsys.readouterr().err
    assert rc == 2 and rec.calls == []
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_heads_arm_is_skipped_with_a_note_without_a_patch_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "runs"))
    a = study.parse_args(["--models", str(tmp_path), "--arms", "dim,heads"])
    cfg = study.check(a)
    assert cfg["arms"] == ["dim", "heads"] and cfg["heads"] == {}
    calls = []
    table, per_seed, log, notes = study.run_study(a, cfg, lambda args: calls.append(args) or 1)  # all fail
    assert not any("--heads-from" in c for c in calls) and table.empty and per_seed.empty
    assert any("heads arm skipped (no --heads-from" in n for n in notes)
    assert [x["status"] for x in log] == ["failed (exit 1)"] * 3  # one extract per seed, nothing after
    a2 = study.parse_args(["--models", str(tmp_path), "--arms", "heads", "--heads-from", "runs/patch/p",
                           "--top-heads", "3"])
    assert study.check(a2)["heads"] == {str(tmp_path): "runs/patch/p"}
