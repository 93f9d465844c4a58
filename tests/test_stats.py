"""Statistics helpers (:mod:`toolkit.stats`) and the ``refusal stats`` commands, without a model.

The helpers are checked against scipy/statsmodels on fixed data and against hand-derived numbers; the commands
run through Typer's ``CliRunner`` on fake run folders (run.json plus CSV tables) written here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st
from statsmodels.stats.multitest import multipletests

from test_cli import assert_ok, assert_usage_error, invoke
from toolkit.errors import ToolkitError
from toolkit.stats import (adjust_pvalues, aggregate_seeds, bootstrap_ed50, ed50, logistic_fit, mcnemar_exact,
                           paired_ttest, random_control, therapeutic_index, welch_ttest)

A = [2.1, 3.4, 1.9, 5.0, 4.2, 3.3, 2.8, 4.9]
B = [1.8, 2.9, 2.2, 4.1, 3.0, 3.1, 2.0, 4.4]
T_975_DF2 = 4.302652729749462  # scipy.stats.t.ppf(0.975, 2)


# ------------------------------------------------------------------------------------------------ t-tests
def test_paired_ttest_matches_scipy():
    r = paired_ttest(A, B)
    ref = st.ttest_rel(A, B)
    ci = ref.confidence_interval(0.95)
    d = np.subtract(A, B)
    assert r["test"] == "paired t-test"
    assert r["n_pairs"] == 8
    assert r["mean_a"] == pytest.approx(np.mean(A)) and r["mean_b"] == pytest.approx(np.mean(B))
    assert r["mean_diff"] == pytest.approx(d.mean())
    assert (r["statistic"], r["p_value"], r["df"]) == pytest.approx((ref.statistic, ref.pvalue, 7))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert r["effect_size_name"] == "d_z"
    assert r["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))


def test_welch_ttest_matches_scipy():
    a, b = A, B[:6]
    r = welch_ttest(a, b)
    ref = st.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert r["test"] == "Welch t-test"
    assert (r["n_a"], r["n_b"]) == (8, 6)
    assert (r["statistic"], r["p_value"], r["df"]) == pytest.approx((ref.statistic, ref.pvalue, ref.df))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((ci.low, ci.high))
    pooled = math.sqrt((7 * np.var(a, ddof=1) + 5 * np.var(b, ddof=1)) / 12)
    assert r["mean_diff"] == pytest.approx(np.mean(a) - np.mean(b))
    assert r["effect_size_name"] == "cohen_d"
    assert r["effect_size"] == pytest.approx((np.mean(a) - np.mean(b)) / pooled)


@pytest.mark.parametrize("call, message", [
    (lambda: paired_ttest([1.0], [2.0]), "at least 2 pairs"),
    (lambda: paired_ttest([1.0, 2.0, 3.0], [2.0, 1.0]), "equal lengths"),
    (lambda: welch_ttest([1.0, 2.0], [3.0]), "at least 2 values per side"),
    (lambda: paired_ttest([1.0, float("nan")], [2.0, 1.0]), "finite"),
])
def test_ttest_bad_input(call, message):
    with pytest.raises(ToolkitError, match=message):
        call()


def test_mcnemar_exact_matches_binomtest():
    # 3 both True, 2 a False/b True (b01), 7 a True/b False (b10), 4 both False
    a = [True] * 3 + [False] * 2 + [True] * 7 + [False] * 4
    b = [True] * 3 + [True] * 2 + [False] * 7 + [False] * 4
    r = mcnemar_exact(a, b)
    assert r["test"] == "exact McNemar test"
    assert (r["n_pairs"], r["b01"], r["b10"]) == (16, 2, 7)
    assert (r["rate_a"], r["rate_b"]) == (10 / 16, 5 / 16)
    assert r["statistic"] == 2
    assert r["p_value"] == pytest.approx(st.binomtest(2, 9, 0.5).pvalue)
    assert mcnemar_exact([True, False], [True, False])["p_value"] == 1.0  # no discordant pairs
    with pytest.raises(ToolkitError, match="booleans"):
        mcnemar_exact([0.5, 1], [1, 0])


def test_adjust_pvalues_known_values():
    p = [0.01, 0.04, 0.03, 0.005]
    holm, name = adjust_pvalues(p, "holm")
    assert name == "Holm"
    np.testing.assert_allclose(holm, [0.03, 0.06, 0.06, 0.02])
    bh, name = adjust_pvalues(p, "bh")
    assert name == "Benjamini-Hochberg"
    np.testing.assert_allclose(bh, [0.02, 0.04, 0.04, 0.02])
    none, name = adjust_pvalues(p, "none")
    assert name == "none"
    np.testing.assert_allclose(none, p)
    with_nan, _ = adjust_pvalues([0.01, float("nan"), 0.04, 0.03, 0.005], "holm")  # NaN not counted
    np.testing.assert_allclose(with_nan, [0.03, np.nan, 0.06, 0.06, 0.02])
    with pytest.raises(ToolkitError, match="unknown correction 'bonferonni'"):
        adjust_pvalues(p, "bonferonni")


def test_random_control_fixed_example():
    randoms = np.arange(-2, 8)  # -2 .. 7
    r = random_control(5.5, randoms)
    assert r["n_random"] == 10
    assert r["random_mean"] == 2.5
    assert (r["band_low"], r["band_high"]) == pytest.approx((-1.775, 6.775))
    assert r["percentile"] == 80.0
    assert r["p_value"] == pytest.approx(3 / 11)  # |6|, |7| >= 5.5
    assert r["exceeds_band"] is False
    r = random_control(-9.0, randoms)
    assert (r["percentile"], r["p_value"], r["exceeds_band"]) == (0.0, pytest.approx(1 / 11), True)
    with pytest.raises(ToolkitError, match="at least 1 random"):
        random_control(1.0, [])


def test_random_control_prediction_interval_t_test():
    from scipy import stats as st

    randoms = np.arange(-2, 8)
    r = random_control(5.5, randoms)
    sd = np.std(randoms, ddof=1)
    t = (5.5 - 2.5) / (sd * np.sqrt(1 + 1 / 10))
    assert r["t"] == pytest.approx(t)
    assert r["p_parametric"] == pytest.approx(2 * st.t.sf(t, 9))
    # a learned effect far outside the random effects gets a p-value below the empirical floor 1/(n+1)
    far = random_control(40.0, randoms)
    assert far["p_value"] == pytest.approx(1 / 11) and far["p_parametric"] < 1e-4
    assert np.isnan(random_control(1.0, [0.5])["p_parametric"])  # one random effect: no spread


# ------------------------------------------------------------------------------------------------ dose-response
DOSES = np.linspace(0.0, 8.0, 9)


def logistic_units(n_units: int, ed: float, slope: float, seed: int) -> np.ndarray:
    """Bernoulli responses [n_units, 9] from a logistic curve with the given ED50 and slope."""
    rng = np.random.default_rng(seed)
    p = 1 / (1 + np.exp(-slope * (DOSES - ed)))
    return rng.random((n_units, len(DOSES))) < p


def test_logistic_fit_recovers_curve_and_bootstrap_covers_ed50():
    y = logistic_units(400, 4.0, 1.0, seed=0)  # intercept -4, slope 1
    fit = logistic_fit(np.tile(DOSES, 400), y.ravel())
    assert fit.status == "ok" and fit.converged and fit.n == 3600 and fit.note == ""
    assert fit.slope == pytest.approx(1.0, abs=3 * fit.se_slope)
    assert fit.intercept == pytest.approx(-4.0, abs=3 * fit.se_intercept)
    assert fit.cov.shape == (2, 2)
    assert fit.se_slope == pytest.approx(math.sqrt(fit.cov[1, 1]))
    value, reason = ed50(fit, 0, 8)
    assert value == pytest.approx(-fit.intercept / fit.slope) and "inside [0, 8]" in reason

    small = logistic_units(60, 4.0, 1.0, seed=1)
    r = bootstrap_ed50(DOSES, small, 0, 8, n_resamples=200, seed=0)
    assert r["ci_low"] < 4.0 < r["ci_high"]
    assert r["ci_low"] <= r["ed50"] <= r["ci_high"]
    assert (r["n_resamples"], r["n_inside"], r["n_undefined"]) == (200, 200, 0)
    assert "bootstrap" in r["method"]
    again = bootstrap_ed50(DOSES, small, 0, 8, n_resamples=200, seed=0)
    assert (again["ci_low"], again["ci_high"]) == (r["ci_low"], r["ci_high"])  # seeded


def test_ed50_none_when_curve_does_not_cross_in_grid():
    y = logistic_units(80, 12.0, 0.6, seed=2)  # true ED50 12, beyond the grid [0, 8]
    fit = logistic_fit(np.tile(DOSES, 80), y.ravel())
    value, reason = ed50(fit, 0, 8)
    assert value is None
    p_lo, p_hi = fit.predict([0, 8])
    assert reason == f"fitted rate stays below 50 % on [0, 8] ({p_lo:.2f} to {p_hi:.2f})"
    r = bootstrap_ed50(DOSES, y, 0, 8, n_resamples=100, seed=0)
    assert r["ed50"] is None and r["reason"] == reason
    assert r["ci_high"] == math.inf  # open-ended, never extrapolated
    assert r["n_plus_inf"] > 0

    above, reason = ed50(logistic_fit(np.tile(DOSES, 80), (~y[:, ::-1]).ravel()), 0, 8)  # mirrored: above 50 %
    assert above is None and reason.startswith("fitted rate stays above 50 % on [0, 8]")


def test_ed50_degenerate_fits():
    x = [0, 1, 2, 3, 0, 1, 2, 3]
    const = logistic_fit(x, [0] * 8)
    assert const.status == "constant"
    assert ed50(const, 0, 3) == (None, "rate stays below 50 % on [0, 3] (constant response: all 8 responses are 0; "
                                       "no curve fitted)")
    sep = logistic_fit(x, [0, 0, 1, 1, 0, 0, 1, 1])
    assert sep.status == "separation" and "complete separation" in sep.note
    value, reason = ed50(sep, 0, 3)
    assert value is None and reason.startswith("ED50 not identified: complete separation")
    quasi = logistic_fit(x, [0, 0, 1, 1, 0, 1, 1, 1])  # tie at dose 1
    assert quasi.status == "separation" and "quasi-complete" in quasi.note
    flat = logistic_fit(x, [0, 1, 0, 1, 1, 0, 1, 0])  # same rate at every dose
    value, reason = ed50(flat, 0, 3)
    assert value is None and reason.startswith("flat")
    with pytest.raises(ToolkitError, match="never extrapolated"):
        ed50(flat, 0, 5)
    with pytest.raises(ToolkitError, match="2 distinct doses"):
        logistic_fit([1, 1, 1], [0, 1, 0])


def test_therapeutic_index_known_ed50s():
    yh = logistic_units(150, 3.0, 1.5, seed=3)
    yb = logistic_units(150, 6.0, 1.5, seed=4)
    r = therapeutic_index(DOSES, yh, yb, 0, 8, n_resamples=100, seed=0)
    assert r["ed50_harmful"] == pytest.approx(3.0, abs=0.3)
    assert r["ed50_benign"] == pytest.approx(6.0, abs=0.3)
    assert r["ti"] == pytest.approx(r["ed50_benign"] / r["ed50_harmful"])
    assert r["window"] == pytest.approx(r["ed50_benign"] - r["ed50_harmful"])
    assert r["ti_ci_low"] < 2.0 < r["ti_ci_high"]
    assert r["window_ci_low"] < 3.0 < r["window_ci_high"]
    assert (r["n_resamples"], r["n_ti_defined"], r["n_window_defined"]) == (100, 100, 100)

    never = logistic_units(60, 12.0, 0.5, seed=5)  # benign over-refusal never reaches 50 % on the grid
    r = therapeutic_index(DOSES, yh, never, 0, 8, n_resamples=50, seed=0)
    assert r["ti"] is None and r["window"] is None
    assert r["ti_reason"].startswith("ED50 of benign refusal undefined: fitted rate stays below 50 %")
    assert r["ti_ci_high"] == math.inf and r["window_ci_high"] == math.inf


# ------------------------------------------------------------------------------------------------ seeds
def test_aggregate_seeds_exact():
    f1 = pd.DataFrame({"set": ["h", "h", "b"], "alpha": [0, 2, 0], "rate": [1.0, 2.0, 5.0], "x": [1.0, 1.0, 1.0]})
    f2 = pd.DataFrame({"set": ["h", "h"], "alpha": [0.0, 2.0], "rate": [2.0, 4.0], "x": [1.0, np.nan]})
    f3 = pd.DataFrame({"set": ["h", "h"], "alpha": ["0", "2"], "rate": [3.0, 6.0], "x": [1.0, 1.0]})
    out = aggregate_seeds([f1, f2, f3], ["set", "alpha"], ["rate", "x"])
    assert out.attrs["n_dropped"] == 1 and out.attrs["n_runs"] == 3  # (b, 0) is only in the first run
    assert list(out.columns) == ["set", "alpha", "metric", "n_seeds", "mean", "sd", "ci_low", "ci_high"]
    assert out[["set", "alpha", "metric"]].values.tolist() == [["h", 0, "rate"], ["h", 0, "x"], ["h", 2, "rate"],
                                                              ["h", 2, "x"]]
    r0 = out.iloc[0]
    assert (r0["n_seeds"], r0["mean"], r0["sd"]) == (3, 2.0, 1.0)
    half = T_975_DF2 / math.sqrt(3)
    assert (r0["ci_low"], r0["ci_high"]) == pytest.approx((2.0 - half, 2.0 + half))
    r2 = out.iloc[2]
    assert (r2["mean"], r2["sd"]) == (4.0, 2.0)
    x0, x2 = out.iloc[1], out.iloc[3]
    assert (x0["n_seeds"], x0["mean"], x0["sd"], x0["ci_low"], x0["ci_high"]) == (3, 1.0, 0.0, 1.0, 1.0)  # sd 0
    assert (x2["n_seeds"], x2["mean"]) == (2, 1.0)  # NaN skipped
    with pytest.raises(ToolkitError, match="several rows for set=h"):
        aggregate_seeds([f1, f1], ["set"], ["rate"])


# ------------------------------------------------------------------------------------------------ CLI helpers
MODEL = {"id": "fake-model", "hash": "a" * 64}


def make_run(root: Path, command: str, name: str, tables: dict[str, pd.DataFrame], seed=0, params=None,
             model=MODEL, prompt_sets=None) -> Path:
    """A finished run folder written by hand: run.json and CSV tables."""
    folder = root / command / name
    folder.mkdir(parents=True)
    meta = {"schema_version": 1, "command": command, "name": name, "model": model, "seed": seed,
            "prompt_sets": prompt_sets if prompt_sets is not None else [{"name": "h", "sha256": "1" * 64}],
            "params": params if params is not None else {"split": "test"}, "results": {}}
    (folder / "run.json").write_text(json.dumps(meta))
    for fname, df in tables.items():
        df.to_csv(folder / fname, index=False)
    return folder


def read_stats_run(runs: Path, name: str, fname: str) -> tuple[pd.DataFrame, dict]:
    folder = runs / "stats" / name
    return pd.read_csv(folder / fname, keep_default_na=False, na_values=[""]), json.loads(
        (folder / "run.json").read_text())


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """$REFUSAL_RUNS in a temporary folder."""
    root = tmp_path / "runs"
    monkeypatch.setenv("REFUSAL_RUNS", str(root))
    monkeypatch.chdir(tmp_path)
    return root


# Per-prompt ablate results: 5 harmful (h) and 5 harmless (b) prompts under two conditions.
H_BASE = [3.0, 2.5, 4.0, 3.5, 2.0]
H_ABL = [1.0, 1.5, 2.5, 0.5, 1.0]
B_BASE = [-1.0, -0.5, 0.0, -2.0, -1.5]
B_ABL = [-1.2, -0.4, -0.6, -2.1, -1.9]
H_REF_BASE = [True, True, True, True, False]
H_REF_ABL = [False, False, True, False, False]
B_REF_BASE = [False, False, True, False, False]
B_REF_ABL = [False, False, False, False, False]


def ablate_results() -> pd.DataFrame:
    rows = []
    for cond, h, b, hr, br in (("baseline", H_BASE, B_BASE, H_REF_BASE, B_REF_BASE),
                               ("ablated", H_ABL, B_ABL, H_REF_ABL, B_REF_ABL)):
        for s, vals, refs in (("h", h, hr), ("b", b, br)):
            for i, (v, r) in enumerate(zip(vals, refs)):
                rows.append({"set": s, "id": f"{s}-{i:02d}", "category": "c", "condition": cond, "score": v,
                             "refusal": r, "kl": 0.1 if cond == "ablated" else None, "completion": "NA"})
    return pd.DataFrame(rows)


def summary(rate_h: float, rate_b: float, score_h: float) -> pd.DataFrame:
    return pd.DataFrame({"set": ["h", "b"], "split": ["test", "test"], "condition": ["baseline", "baseline"],
                         "n": [5, 5], "refusals": [None, None], "refusal_rate": [rate_h, rate_b],
                         "ci_low": [0.1, 0.0], "ci_high": [0.9, 0.5], "mean_score": [score_h, -1.0],
                         "mean_kl": [None, None]})


# ------------------------------------------------------------------------------------------------ CLI: seeds
def test_stats_help_lists_commands():
    out = assert_ok(invoke(["stats", "--help"]))
    for cmd in ("seeds", "ttest", "control"):
        assert cmd in out


def test_seeds_aggregates_summaries(runs):
    r0 = make_run(runs, "score", "s0", {"summary.csv": summary(0.6, 0.0, 2.0)}, seed=0,
                  params={"split": "test", "seed_note": "a"})
    r1 = make_run(runs, "score", "s1", {"summary.csv": summary(0.8, 0.2, 3.0)}, seed=1,
                  params={"split": "test", "seed_note": "b"})
    r2 = make_run(runs, "score", "s2", {"summary.csv": summary(1.0, 0.1, 4.0)}, seed=2,
                  params={"split": "test", "seed_note": "c"})
    out = assert_ok(invoke(["stats", "seeds", r0, r1, r2 / "run.json", "--name", "agg"]))
    assert "wrote" in out
    table, meta = read_stats_run(runs, "agg", "seeds.csv")
    assert list(table.columns) == ["set", "split", "condition", "metric", "n_seeds", "mean", "sd", "ci_low",
                                   "ci_high"]
    # n, ci_low/ci_high excluded; refusals and mean_kl have no values
    assert table[["set", "metric"]].values.tolist() == [["h", "refusal_rate"], ["h", "mean_score"],
                                                       ["b", "refusal_rate"], ["b", "mean_score"]]
    h_rate = table.iloc[0]
    assert h_rate["n_seeds"] == 3
    assert h_rate["mean"] == pytest.approx(0.8) and h_rate["sd"] == pytest.approx(0.2)
    half = T_975_DF2 * 0.2 / math.sqrt(3)
    assert (h_rate["ci_low"], h_rate["ci_high"]) == pytest.approx((0.8 - half, 0.8 + half))
    h_score = table.iloc[1]
    assert (h_score["mean"], h_score["sd"]) == (3.0, 1.0)
    b_score = table.iloc[3]
    assert (b_score["mean"], b_score["sd"], b_score["ci_low"], b_score["ci_high"]) == (-1.0, 0.0, -1.0, -1.0)
    assert meta["command"] == "stats"
    assert meta["model"] == MODEL and meta["seed"] is None
    assert meta["prompt_sets"] == [{"name": "h", "sha256": "1" * 64}]
    assert meta["params"]["keys"] == ["set", "split", "condition"]
    assert meta["params"]["metrics"] == ["refusal_rate", "mean_score"]
    assert meta["results"]["seeds"] == [0, 1, 2] and meta["results"]["n_dropped"] == 0


def test_seeds_explicit_keys_and_dropped_rows(runs):
    r0 = make_run(runs, "score", "s0", {"summary.csv": summary(0.6, 0.0, 2.0)}, seed=0)
    r1 = make_run(runs, "score", "s1", {"summary.csv": summary(0.8, 0.2, 3.0).iloc[:1]}, seed=1)
    out = assert_ok(invoke(["stats", "seeds", r0, r1, "--keys", "set", "--name", "k"]))
    assert "dropped 1 row(s)" in out
    table, meta = read_stats_run(runs, "k", "seeds.csv")
    assert table[["set", "metric", "mean"]].values.tolist() == [["h", "refusal_rate", pytest.approx(0.7)],
                                                               ["h", "mean_score", 2.5]]
    assert meta["results"]["n_dropped"] == 1


def test_seeds_errors(runs):
    s0 = make_run(runs, "score", "s0", {"summary.csv": summary(0.6, 0.0, 2.0)}, seed=0)
    s1 = make_run(runs, "score", "s1", {"summary.csv": summary(0.8, 0.2, 3.0)}, seed=1, params={"split": "val"})
    s2 = make_run(runs, "score", "s2", {"summary.csv": summary(0.8, 0.2, 3.0)}, seed=0)
    ab = make_run(runs, "ablate", "a1", {"summary.csv": summary(0.8, 0.2, 3.0)}, seed=1)
    assert_usage_error(invoke(["stats", "seeds", s0, ab]), "different commands", "'score'", "'ablate'")
    assert_usage_error(invoke(["stats", "seeds", s0, s1]), "differ in param 'split'", "'test'", "'val'")
    assert_usage_error(invoke(["stats", "seeds", s0, s2]), "same seed 0")
    assert_usage_error(invoke(["stats", "seeds", s0]), "at least 2 runs")
    assert_usage_error(invoke(["stats", "seeds", s0, runs / "score" / "missing"]), "no run at",
                       str(runs / "score" / "missing"))
    assert not (runs / "stats").exists()


# ------------------------------------------------------------------------------------------------ CLI: ttest
def test_ttest_paired_numeric_conditions_of_one_run(runs):
    ab = make_run(runs, "ablate", "ab", {"results.csv": ablate_results()})
    out = assert_ok(invoke(["stats", "ttest", ab, "--where-a", "condition=baseline", "--where-b",
                            "condition=ablated", "--set", "h", "--name", "t1"]))
    assert "paired t-test" in out
    table, meta = read_stats_run(runs, "t1", "ttest.csv")
    assert len(table) == 1
    row = table.iloc[0]
    ref = st.ttest_rel(H_BASE, H_ABL)
    d = np.subtract(H_BASE, H_ABL)
    assert (row["test"], row["metric"], row["n_pairs"]) == ("paired t-test", "score", 5)
    assert (row["statistic"], row["p_value"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert row["p_adjusted"] == pytest.approx(ref.pvalue)  # one test: the correction changes nothing
    assert row["correction"] == "Holm"
    assert row["mean_diff"] == pytest.approx(d.mean())
    assert row["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert meta["results"]["test"] == "paired t-test"
    assert meta["params"]["where_a"] == ["condition=baseline"] and meta["params"]["set"] == "h"
    assert meta["model"] == MODEL


def test_ttest_mcnemar_on_boolean_metric(runs):
    ab = make_run(runs, "ablate", "ab", {"results.csv": ablate_results()})
    out = assert_ok(invoke(["stats", "ttest", ab, "--metric", "refusal", "--where-a", "condition=baseline",
                            "--where-b", "condition=ablated", "--name", "mc"]))
    assert "exact McNemar test" in out
    row = read_stats_run(runs, "mc", "ttest.csv")[0].iloc[0]
    # over both sets: a True/b False on h-00, h-01, h-03 and b-02; no a False/b True
    assert (row["test"], row["n_pairs"], row["b01"], row["b10"]) == ("exact McNemar test", 10, 0, 4)
    assert (row["rate_a"], row["rate_b"]) == (0.5, 0.1)
    assert row["p_value"] == pytest.approx(st.binomtest(0, 4, 0.5).pvalue)  # 0.125


def test_ttest_by_with_correction(runs):
    ab = make_run(runs, "ablate", "ab", {"results.csv": ablate_results()})
    out = assert_ok(invoke(["stats", "ttest", ab, "--where-a", "condition=baseline", "--where-b",
                            "condition=ablated", "--by", "set", "--correction", "bh", "--name", "by"]))
    assert "Benjamini-Hochberg" in out
    table, meta = read_stats_run(runs, "by", "ttest.csv")
    assert table["set"].tolist() == ["b", "h"]
    raw = [st.ttest_rel(B_BASE, B_ABL).pvalue, st.ttest_rel(H_BASE, H_ABL).pvalue]
    np.testing.assert_allclose(table["p_value"], raw)
    np.testing.assert_allclose(table["p_adjusted"], multipletests(raw, method="fdr_bh")[1])
    assert set(table["correction"]) == {"Benjamini-Hochberg"}
    assert meta["params"]["by"] == "set" and meta["params"]["correction"] == "bh"


def test_ttest_two_runs_paired_and_welch(runs):
    def scores(vals, offset):
        return pd.DataFrame({"set": "h", "id": [f"p{i}" for i in range(len(vals))], "category": "c",
                             "split": "test", "score": np.add(vals, offset), "refusal": [None] * len(vals),
                             "completion": [None] * len(vals)})

    a = make_run(runs, "score", "a", {"scores.csv": scores(H_BASE, 0.0)})
    b = make_run(runs, "score", "b", {"scores.csv": scores(H_ABL[:4] + [9.0], 0.5)}, model={"id": "other",
                                                                                            "hash": "b" * 64})
    assert_ok(invoke(["stats", "ttest", a, b, "--name", "pair"]))
    table, meta = read_stats_run(runs, "pair", "ttest.csv")
    ref = st.ttest_rel(H_BASE, np.add(H_ABL[:4] + [9.0], 0.5))
    assert table.iloc[0]["p_value"] == pytest.approx(ref.pvalue)
    assert meta["model"] is None  # two different models
    assert len(meta["results"]["sources"]) == 2

    out = assert_ok(invoke(["stats", "ttest", a, b, "--welch", "--name", "welch"]))
    assert "Welch t-test" in out
    row = read_stats_run(runs, "welch", "ttest.csv")[0].iloc[0]
    ref = st.ttest_ind(H_BASE, np.add(H_ABL[:4] + [9.0], 0.5), equal_var=False)
    assert (row["test"], row["n_a"], row["n_b"]) == ("Welch t-test", 5, 5)
    assert (row["statistic"], row["p_value"], row["df"]) == pytest.approx((ref.statistic, ref.pvalue, ref.df))


def test_ttest_where_matches_numbers_by_value(runs):
    df = pd.DataFrame({"alpha": [0.0, 0.0, 0.0, 2.0, 2.0, 2.0], "set": "h", "role": "harmful",
                       "id": ["p1", "p2", "p3"] * 2, "score": [1.0, 2.0, 4.0, 3.0, 3.5, 7.0],
                       "refusal": [None] * 6, "degenerate": [None] * 6, "coherence": [None] * 6,
                       "completion": [None] * 6})
    dr = make_run(runs, "dose-response", "d", {"results.csv": df})
    assert_ok(invoke(["stats", "ttest", dr, "--where-a", "alpha=2", "--where-b", "alpha=0", "--name", "w"]))
    row = read_stats_run(runs, "w", "ttest.csv")[0].iloc[0]
    assert (row["n_pairs"], row["mean_diff"]) == (3, pytest.approx(13 / 6))
    assert row["p_value"] == pytest.approx(st.ttest_rel([3.0, 3.5, 7.0], [1.0, 2.0, 4.0]).pvalue)


def test_ttest_errors(runs):
    ab = make_run(runs, "ablate", "ab", {"results.csv": ablate_results()})
    other = make_run(runs, "score", "other", {"scores.csv": pd.DataFrame(
        {"set": "x", "id": ["x1", "x2"], "category": "c", "split": "test", "score": [1.0, 2.0],
         "refusal": [True, False], "completion": ["a", "b"]})})
    assert_usage_error(invoke(["stats", "ttest", runs / "ablate" / "nope"]), "no run at",
                       str(runs / "ablate" / "nope"))
    assert_usage_error(invoke(["stats", "ttest", ab, other, "--where-a", "condition=baseline"]),
                       "no prompts match", "sets b, h", "sets x")
    assert_usage_error(invoke(["stats", "ttest", ab, "--where-b", "condition=ablated"]),
                       "not unique per prompt", "add --where-a for: condition")
    assert_usage_error(invoke(["stats", "ttest", ab, "--correction", "bonferroni"]), "--correction: unknown correction",
                       "'bonferroni'")
    assert_usage_error(invoke(["stats", "ttest", ab, "--where-a", "cond=baseline"]), "no column 'cond'")
    assert_usage_error(invoke(["stats", "ttest", ab, "--metric", "completion", "--where-a", "condition=baseline",
                               "--where-b", "condition=ablated"]), "neither numeric nor boolean")
    assert_usage_error(invoke(["stats", "ttest", ab, "--metric", "refusal", "--welch", "--where-a",
                               "condition=baseline", "--where-b", "condition=ablated"]), "--welch needs a numeric")
    no_gen = make_run(runs, "score", "nogen", {"scores.csv": pd.DataFrame(
        {"set": "h", "id": ["h-00", "h-01"], "category": "c", "split": "test", "score": [1.0, 2.0],
         "refusal": [None, None], "completion": [None, None]})})
    assert_usage_error(invoke(["stats", "ttest", ab, no_gen, "--metric", "refusal", "--where-a",
                               "condition=baseline"]), "score/nogen (B) has no values of 'refusal'")
    assert not (runs / "stats").exists()


# ------------------------------------------------------------------------------------------------ CLI: control
RANDOM_EFFECTS = [-1.0, -0.5, 0.0, 0.5, 1.0]


def steer_results(with_refusal: bool = False) -> pd.DataFrame:
    """Layer 1, set h, part holdout, prompts p0..p2; learned and 5 random directions at alpha -2, 0, 2, plus one
    orthogonal direction that must be ignored with --kind random. Learned effect +4 at alpha 2 and +0.25 at
    alpha -2; random direction i moves every prompt by RANDOM_EFFECTS[i] at either alpha."""
    base = [1.0, 2.0, 3.0]
    rows = []

    def add(kind, idx, alpha, shift):
        for i, b in enumerate(base):
            rows.append({"kind": kind, "direction_index": idx, "direction_seed": 100 + idx, "layer": 1,
                         "site": "resid", "positions": "all", "alpha": alpha, "scale": alpha * 2.0, "set": "h",
                         "part": "holdout", "id": f"p{i}", "score": b + shift,
                         "refusal": (b + shift > 2.5) if with_refusal else None, "degenerate": None,
                         "coherence": None})

    for alpha, shift in ((-2.0, 0.25), (0.0, 0.0), (2.0, 4.0)):
        add("learned", 0, alpha, shift)
    for idx, e in enumerate(RANDOM_EFFECTS):
        for alpha in (-2.0, 0.0, 2.0):
            add("random", idx, alpha, 0.0 if alpha == 0 else e)
    for alpha in (-2.0, 0.0, 2.0):
        add("orthogonal", 0, alpha, 50.0 if alpha else 0.0)
    return pd.DataFrame(rows)


def test_control_against_random_directions(runs):
    st_run = make_run(runs, "steer", "st", {"results.csv": steer_results(), "summary.csv": pd.DataFrame()})
    out = assert_ok(invoke(["stats", "control", st_run, "--name", "ctl"]))
    assert "Holm" in out
    table, meta = read_stats_run(runs, "ctl", "control.csv")
    assert list(table.columns) == ["layer", "set", "part", "alpha", "metric", "learned_effect", "random_mean",
                                   "band_low", "band_high", "percentile", "p_value", "p_adjusted", "correction",
                                   "t", "p_parametric", "exceeds_band", "n_random", "p_parametric_adjusted"]
    assert table["alpha"].tolist() == [-2.0, 2.0]
    lo, hi = table.iloc[0], table.iloc[1]
    assert (hi["layer"], hi["set"], hi["part"], hi["metric"]) == (1, "h", "holdout", "score")
    assert hi["learned_effect"] == pytest.approx(4.0)
    assert (hi["random_mean"], hi["band_low"], hi["band_high"]) == pytest.approx((0.0, -0.95, 0.95))
    assert (hi["percentile"], hi["p_value"], hi["n_random"]) == (100.0, pytest.approx(1 / 6), 5)
    assert bool(hi["exceeds_band"]) is True and bool(lo["exceeds_band"]) is False
    assert lo["learned_effect"] == pytest.approx(0.25)
    assert (lo["percentile"], lo["p_value"]) == (60.0, pytest.approx(5 / 6))  # |-1|, |-0.5|, |0.5|, |1| >= 0.25
    # Holm over the two rows: sorted 1/6 -> 2/6, 5/6 -> max(2/6, 5/6)
    np.testing.assert_allclose(table["p_adjusted"], [5 / 6, 1 / 3])
    assert set(table["correction"]) == {"Holm"}
    assert meta["params"]["kind"] == "random" and meta["results"]["n_exceeds_band"] == 1
    assert meta["model"] == MODEL


def test_control_orthogonal_and_bh(runs):
    st_run = make_run(runs, "steer", "st", {"results.csv": steer_results(with_refusal=True)})
    assert_ok(invoke(["stats", "control", st_run, "--kind", "orthogonal", "--correction", "bh", "--name", "o"]))
    table, _ = read_stats_run(runs, "o", "control.csv")
    assert table["n_random"].tolist() == [1, 1]
    assert table["random_mean"].tolist() == [50.0, 50.0]
    assert set(table["correction"]) == {"Benjamini-Hochberg"}
    assert_ok(invoke(["stats", "control", st_run, "--metric", "refusal", "--name", "r"]))
    table, _ = read_stats_run(runs, "r", "control.csv")
    # learned refusal (score > 2.5): alpha 0 -> 1/3, alpha 2 -> 3/3, alpha -2 -> 1/3 (scores 1.25, 2.25, 3.25)
    assert table["learned_effect"].tolist() == pytest.approx([0.0, 2 / 3])


def test_control_errors(runs):
    score_run = make_run(runs, "score", "s", {"scores.csv": pd.DataFrame({"set": ["h"], "id": ["p"], "score": [1.0]})})
    assert_usage_error(invoke(["stats", "control", score_run]), "'score' run", "expected a 'steer' run")
    no_random = steer_results()
    no_random = no_random[no_random.kind != "random"]
    nr = make_run(runs, "steer", "nr", {"results.csv": no_random})
    assert_usage_error(invoke(["stats", "control", nr]), "no random control directions", "learned, orthogonal")
    no_learned = steer_results()
    nl = make_run(runs, "steer", "nl", {"results.csv": no_learned[no_learned.kind != "learned"]})
    assert_usage_error(invoke(["stats", "control", nl]), "no learned-direction rows")
    full = make_run(runs, "steer", "full", {"results.csv": steer_results()})
    assert_usage_error(invoke(["stats", "control", full, "--metric", "refusal"]), "no refusal values")
    assert_usage_error(invoke(["stats", "control", full, "--correction", "sidak"]), "--correction: unknown correction",
                       "'sidak'")
    assert_usage_error(invoke(["stats", "control", "missing-steer"]), "no run at missing-steer")
    assert not (runs / "stats").exists()
