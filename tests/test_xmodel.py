"""Cross-model imprints with a prompt-sampling spread (``refusal imprint --spread``, ``refusal geometry --half``) and
depth-relative locations (``refusal depth``): :mod:`toolkit.xmodel`."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import WORDS
from test_cli import assert_ok, assert_usage_error, entries, invoke, save_tiny
from toolkit.directions import DirectionSet
from toolkit.errors import ToolkitError
from toolkit.geometry import gini, imprint
from toolkit.prompts import PromptSet, load_prompt_set
from toolkit.steering import hash_split
from toolkit.xmodel import (ABSOLUTE_FIGURES, depth_fraction, figure_spread, model_differences, patch_peak,
                            within_spread)

torch.set_default_dtype(torch.float32)


# ------------------------------------------------------------------------------------------------ helpers
def direction_set(n_layers: int, d_model: int, seed: int, model: str, half: str | None = None,
                  half_seed: int = 0) -> DirectionSet:
    """Random per-layer directions with a residual norm per layer, as a geometry run saves them."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n_layers, d_model, generator=g, dtype=torch.float64)
    v = v * torch.linspace(0.5, 3.0, n_layers, dtype=torch.float64)[:, None]
    rn = 10 + torch.rand(n_layers, generator=g, dtype=torch.float64) * 5
    extra = {"kind": "geometry"} | ({} if half is None else {"half": half, "half_seed": half_seed})
    return DirectionSet(v.float(), tuple(range(n_layers)), site="resid_pre", position=-1, model_hash=model * 8,
                        model_id=model, method="test", extra=extra, tensors={"resid_norm": rn.float()})


def write_run(runs, command: str, name: str, model: str, n_layers: int, d_model: int | None = None,
              results: dict | None = None, files: dict | None = None):
    """A hand-written finished run folder runs/<command>/<name> with run.json (model record with n_layers)."""
    folder = runs / command / name
    folder.mkdir(parents=True)
    doc = {"schema_version": 1, "command": command, "name": name, "prompt_sets": [], "params": {},
           "results": results or {}, "model": {"id": model, "hash": model * 8, "n_layers": n_layers,
                                                "d_model": d_model}}
    (folder / "run.json").write_text(json.dumps(doc))
    for fname, content in (files or {}).items():
        if isinstance(content, DirectionSet):
            content.save(folder / fname)
        else:
            (folder / fname).write_text(content)
    return folder


def geometry_run(runs, name, ds: DirectionSet, n_layers: int):
    return write_run(runs, "geometry", name, ds.model_id, n_layers, ds.d_model,
                     files={"directions.safetensors": ds})


def figures_of(ds: DirectionSet) -> dict:
    """The imprint figures computed directly from a set (every layer has a non-zero direction)."""
    return imprint(ds.vectors.double(), list(ds.layers), ds.resid_norm.double())


# ------------------------------------------------------------------------------------------------ figures
def test_imprint_figures_of_a_synthetic_set_match_direct_computation():
    # one unit direction at every layer with strengths 1..4: rank one, perfectly smooth, no orthogonality
    u = torch.zeros(16, dtype=torch.float64)
    u[3] = 1.0
    s = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    f = imprint(s[:, None] * u, [0, 1, 2, 3], torch.full((4,), 2.0, dtype=torch.float64))
    # Gini of 1,2,3,4: sum_ij |x_i - x_j| / (2 n^2 mean) = 20 / (2 * 16 * 2.5) = 0.25
    assert f["gini"] == pytest.approx(0.25, abs=1e-12) and f["gini_rel"] == pytest.approx(0.25, abs=1e-12)
    assert f["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    assert f["smoothness"] == pytest.approx(1.0, abs=1e-12) and f["orthogonality"] == pytest.approx(0.0, abs=1e-12)
    assert f["angular_drift_deg"] == pytest.approx(0.0, abs=1e-6)
    assert f["tail_share"] == pytest.approx(4 / 10, abs=1e-12)  # last quarter of 4 layers: layer 3
    assert f["peak_layer"] == 3
    # orthonormal directions: effective rank = number of layers, orthogonality 1, smoothness 0
    f = imprint(torch.eye(5, dtype=torch.float64)[:, :], [0, 1, 2, 3, 4])
    assert f["effective_rank"] == pytest.approx(5.0, abs=1e-9) and f["orthogonality"] == pytest.approx(1.0)
    assert f["smoothness"] == pytest.approx(0.0, abs=1e-12) and f["gini"] == pytest.approx(0.0, abs=1e-12)
    assert f["angular_drift_deg"] == pytest.approx(4 * 90.0)
    assert gini(torch.tensor([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)


def test_spread_is_the_absolute_difference_of_hand_made_halves():
    a = {"gini": 0.25, "effective_rank": 3.0, "gini_rel": float("nan"), "peak_layer": 7, "only_a": 1.0}
    b = {"gini": 0.75, "effective_rank": 2.5, "gini_rel": 0.5, "peak_layer": 10}
    t = figure_spread(a, b).set_index("figure")
    assert list(t.index) == ["gini", "effective_rank", "gini_rel", "peak_layer"]  # figures of both, a's order
    assert t.loc["gini", "value"] == 0.5 and t.loc["gini", "spread"] == 0.5
    assert t.loc["effective_rank", "value"] == 2.75 and t.loc["effective_rank", "spread"] == 0.5
    assert t.loc["peak_layer", "value"] == 8.5 and t.loc["peak_layer", "spread"] == 3.0
    assert math.isnan(t.loc["gini_rel", "value"]) and math.isnan(t.loc["gini_rel", "spread"])
    assert t.loc["gini_rel", "half_b"] == 0.5 and math.isnan(t.loc["gini_rel", "half_a"])
    assert (figure_spread(b, a).set_index("figure").spread.dropna() == t.spread.dropna()).all()  # symmetric
    with pytest.raises(ToolkitError, match="no figure in common"):
        figure_spread({"x": 1.0}, {"y": 1.0})


def test_spread_of_synthetic_direction_halves_matches_direct_computation():
    a, b = direction_set(6, 16, 1, "m", "a"), direction_set(6, 16, 2, "m", "b")
    fa, fb = figures_of(a), figures_of(b)
    t = figure_spread(fa, fb).set_index("figure")
    for f in fa:
        assert t.loc[f, "spread"] == abs(fa[f] - fb[f]) and t.loc[f, "value"] == (fa[f] + fb[f]) / 2


def test_within_spread_flag():
    assert within_spread(0.375, 0.125, 0.25) is True  # boundary: |diff| == spread_a + spread_b counts as within
    assert within_spread(-0.375, 0.125, 0.25) is True  # the sign of the difference does not matter
    assert within_spread(0.5, 0.125, 0.25) is False
    assert within_spread(0.0, 0.0, 0.0) is True
    assert within_spread(0.25, 0.0, 0.0) is False
    assert within_spread(0.1, float("nan"), 0.25) is None  # no spread: unknown, not "within"
    assert within_spread(float("nan"), 0.1, 0.1) is None
    with pytest.raises(ToolkitError, match="spreads must be >= 0"):
        within_spread(0.1, -0.1, 0.2)


def test_model_differences_pairs_models_and_leaves_out_layer_counts():
    m = pd.DataFrame([
        {"model": "A", "figure": "gini", "value": 0.25, "spread": 0.125},
        {"model": "A", "figure": "peak_layer", "value": 10.0, "spread": 1.0},
        {"model": "A", "figure": "peak_depth", "value": 0.5, "spread": 0.0},
        {"model": "B", "figure": "gini", "value": 0.75, "spread": 0.25},
        {"model": "B", "figure": "peak_layer", "value": 20.0, "spread": 0.0},
        {"model": "B", "figure": "peak_depth", "value": 0.625, "spread": 0.0},
        {"model": "C", "figure": "gini", "value": 0.5, "spread": float("nan")},
    ])
    d = model_differences(m)
    assert "peak_layer" in ABSOLUTE_FIGURES and "peak_layer" not in set(d.figure)
    got = {(r.model_a, r.model_b, r.figure): (r["diff"], r.within_spread) for _, r in d.iterrows()}
    assert got == {("A", "B", "gini"): (0.5, False), ("A", "B", "peak_depth"): (0.125, False),
                   ("A", "C", "gini"): (0.25, None), ("B", "C", "gini"): (-0.25, None)}
    with pytest.raises(ToolkitError, match="two rows"):
        model_differences(pd.concat([m, m.head(1)]))


# ------------------------------------------------------------------------------------------------ halves
def test_half_split_is_disjoint_covers_the_set_and_follows_the_seed():
    recs = [{"id": f"p{i}", "prompt": f"prompt {i}", "category": None, "split": None} for i in range(200)]
    ps = PromptSet("s", "mem", "0" * 64, recs)
    a, b = ps.half("a", 3), ps.half("b", 3)
    assert set(a.ids).isdisjoint(b.ids) and sorted(a.ids + b.ids) == sorted(ps.ids)
    mask = hash_split(ps.ids, 3, 0.5)
    assert a.ids == [i for i, m in zip(ps.ids, mask) if m] and b.ids == [i for i, m in zip(ps.ids, mask) if not m]
    assert 60 < len(a) < 140  # about half
    assert ps.half("a", 3).ids == a.ids  # deterministic
    assert ps.half("a", 4).ids != a.ids  # another seed, another split
    # membership depends on the id only: a shuffled file gives the same halves
    rev = PromptSet("s", "mem", "0" * 64, recs[::-1])
    assert sorted(rev.half("a", 3).ids) == sorted(a.ids)
    assert ps.half(None, 3) is ps
    with pytest.raises(ToolkitError, match="'a' or 'b'"):
        ps.half("c", 3)
    with pytest.raises(ToolkitError, match="unique"):
        PromptSet("s", "mem", "0" * 64, recs[:2] + recs[:1]).half("a", 0)
    one = PromptSet("s", "mem", "0" * 64, recs[:1])
    empty = "b" if hash_split(one.ids, 0, 0.5)[0] else "a"
    with pytest.raises(ToolkitError, match="empty"):
        one.half(empty, 0)


# ------------------------------------------------------------------------------------------------ depth
def test_depth_fraction_by_site():
    assert depth_fraction(12, 24) == 0.5  # resid_pre: 12 of 24 blocks have run
    assert depth_fraction(0, 28, "resid_pre") == 0.0
    assert depth_fraction(11, 24, "attn_out") == 11.5 / 24 and depth_fraction(14, 28, "mlp_out") == 14.5 / 28
    assert depth_fraction(29, 30, "resid_post") == 1.0
    for bad, needle in (((24, 24), "outside"), ((-1, 24), "outside"), ((1, 0), "positive"),
                        ((1, 24, "nowhere"), "unknown hook site")):
        with pytest.raises(ToolkitError, match=needle):
            depth_fraction(*bad)


def summary_csv(rows) -> str:
    """A patch run's summary.csv (the columns patch_peak reads) from (direction, site, layer, position, positions,
    head, effect) tuples."""
    cols = ["direction", "site", "layer", "position", "positions", "head", "effect"]
    return pd.DataFrame(rows, columns=cols).astype({"position": "Int64", "head": "Int64"}).to_csv(index=False)


def test_patch_peak_takes_the_best_block_component():
    from io import StringIO

    s = pd.read_csv(StringIO(summary_csv([
        ("denoise", "resid_pre", 23, -1, "-1", None, 0.99),  # resid: left out by default
        ("denoise", "attn_out", 5, -1, "-1", None, 0.25),
        ("denoise", "mlp_out", 9, -2, "-2", None, 0.75),
        ("denoise", "attn_out", 7, -1, "-1", None, 0.75),  # ties with layer 9: the shallower wins
        ("denoise", "z", 3, None, "-1,-2", 4, 0.9),  # a head: left out
        ("noise", "attn_out", 2, -1, "-1", None, 0.95),
    ])))
    assert patch_peak(s) == {"layer": 7, "site": "attn_out", "positions": "-1", "effect": 0.75}
    assert patch_peak(s, "noise")["layer"] == 2
    assert patch_peak(s, sites=["resid_pre"])["layer"] == 23
    with pytest.raises(ToolkitError, match="no noise component at mlp_out"):
        patch_peak(s, "noise", ["mlp_out"])
    with pytest.raises(ToolkitError, match="lacks column"):
        patch_peak(s.drop(columns=["effect"]))


# ------------------------------------------------------------------------------------------------ CLI
def test_imprint_spread_across_models(runs):
    sets = {"A": (direction_set(6, 16, 1, "A", "a"), direction_set(6, 16, 2, "A", "b")),
            "B": (direction_set(8, 24, 3, "B", "a", 5), direction_set(8, 24, 4, "B", "b", 5))}
    depth = {"A": 24, "B": 30}  # the models' depths (the runs hold directions at some of their layers)
    for m, (a, b) in sets.items():
        geometry_run(runs, f"{m}a", a, depth[m])
        geometry_run(runs, f"{m}b", b, depth[m])
    out = assert_ok(invoke(["imprint", "--spread", f"{runs}/geometry/Aa:{runs}/geometry/Ab", "--spread",
                            f"{runs}/geometry/Ba:{runs}/geometry/Bb", "--no-plot", "--name", "x"]))
    run = runs / "imprint" / "x"
    assert entries(run) == {"imprint.csv", "layers.csv", "spread.csv", "differences.csv", "run.json"}
    assert "not recorded as disjoint" not in out and "across models" in out
    imp = pd.read_csv(run / "imprint.csv")
    assert list(imp.run) == ["geometry/Aa", "geometry/Ab", "geometry/Ba", "geometry/Bb"]  # per run, as before
    sp = pd.read_csv(run / "spread.csv")
    assert list(dict.fromkeys(sp.model)) == ["A", "B"]
    for m, (a, b) in sets.items():
        fa, fb = figures_of(a), figures_of(b)
        fa["peak_depth"] = fa["peak_layer"] / depth[m]
        fb["peak_depth"] = fb["peak_layer"] / depth[m]
        t = sp[sp.model == m].set_index("figure")
        assert set(t.n_layers) == {depth[m]}
        for f in fa:
            assert t.loc[f, "half_a"] == pytest.approx(fa[f], rel=1e-6, abs=1e-9)
            assert t.loc[f, "half_b"] == pytest.approx(fb[f], rel=1e-6, abs=1e-9)
            assert t.loc[f, "spread"] == pytest.approx(abs(fa[f] - fb[f]), rel=1e-6, abs=1e-9)
            assert t.loc[f, "value"] == pytest.approx((fa[f] + fb[f]) / 2, rel=1e-6, abs=1e-9)
    d = pd.read_csv(run / "differences.csv")
    assert set(d.model_a) == {"A"} and set(d.model_b) == {"B"} and "peak_layer" not in set(d.figure)
    for _, r in d.iterrows():
        A = sp[(sp.model == "A") & (sp.figure == r.figure)].iloc[0]
        B = sp[(sp.model == "B") & (sp.figure == r.figure)].iloc[0]
        assert r["diff"] == pytest.approx(B.value - A.value, abs=1e-12)
        if np.isfinite(r.spread_a) and np.isfinite(r.spread_b):
            assert r.within_spread == (abs(r["diff"]) <= r.spread_a + r.spread_b)
    assert {"within", "BEYOND"} & set(out.split())
    meta = json.loads((run / "run.json").read_text())
    assert meta["results"]["spread"]["within_spread"] == "|value_b - value_a| <= spread_a + spread_b"


def test_imprint_spread_with_a_run_without_halves_and_unrecorded_halves(runs):
    geometry_run(runs, "ua", direction_set(5, 16, 1, "U"), 20)
    geometry_run(runs, "ub", direction_set(5, 16, 2, "U"), 20)
    geometry_run(runs, "s", direction_set(5, 8, 3, "S"), 10)
    out = assert_ok(invoke(["imprint", runs / "geometry" / "s", "--spread",
                            f"{runs}/geometry/ua:{runs}/geometry/ub", "--no-plot", "--name", "y"]))
    assert "not recorded as disjoint prompt halves" in out
    sp = pd.read_csv(runs / "imprint" / "y" / "spread.csv")
    assert list(dict.fromkeys(sp.model)) == ["S", "U"]
    assert sp[sp.model == "S"].spread.isna().all() and sp[sp.model == "U"].spread.notna().any()
    d = pd.read_csv(runs / "imprint" / "y" / "differences.csv")
    assert d.within_spread.isna().all()  # S has no spread: no flag


def test_imprint_without_spread_keeps_its_outputs(runs):
    geometry_run(runs, "g", direction_set(5, 16, 1, "U"), 20)
    assert_ok(invoke(["imprint", runs / "geometry" / "g", "--no-plot", "--name", "z"]))
    assert entries(runs / "imprint" / "z") == {"imprint.csv", "layers.csv", "run.json"}


def test_imprint_spread_bad_input(runs):
    geometry_run(runs, "Aa", direction_set(6, 16, 1, "A", "a"), 24)
    geometry_run(runs, "Ab", direction_set(6, 16, 2, "A", "b"), 24)
    geometry_run(runs, "Aa2", direction_set(6, 16, 5, "A", "a"), 24)
    geometry_run(runs, "Ab7", direction_set(6, 16, 6, "A", "b", 7), 24)
    geometry_run(runs, "Bb", direction_set(6, 24, 3, "B", "b"), 28)
    geometry_run(runs, "Cb", direction_set(6, 16, 4, "C", "b"), 24)  # same width, another model
    geometry_run(runs, "Ab30", direction_set(6, 16, 8, "A", "b"), 30)  # same hash, another recorded depth
    g = runs / "geometry"
    for args, needles in (
            ([f"{g}/Aa:{g}/Bb"], ("--spread", "different models")),
            ([f"{g}/Aa:{g}/Cb"], ("--spread", "different models")),
            ([f"{g}/Aa:{g}/Aa2"], ("both runs are half 'a'",)),
            ([f"{g}/Aa:{g}/Ab7"], ("different seeds",)),
            ([f"{g}/Aa:{g}/Ab30"], ("24 and 30 layers",)),
            ([f"{g}/Aa"], ("RUN_A:RUN_B",)),
            ([f"{g}/Aa:"], ("RUN_A:RUN_B",)),
            ([f"{g}/Aa:{g}/Aa"], ("twice",)),
            ([f"{g}/Aa:{g}/missing"], ("missing",))):
        spread = [x for a in args for x in ("--spread", a)]
        assert_usage_error(invoke(["imprint", *spread, "--no-plot"]), *needles)
    assert_usage_error(invoke(["imprint", "--no-plot"]), "at least one run")
    assert not (runs / "imprint").exists()  # no partial run folder


def patch_run(runs, name, model, n_layers, rows):
    return write_run(runs, "patch", name, model, n_layers, files={"summary.csv": summary_csv(rows)})


def extract_run(runs, name, model, n_layers, layer):
    return write_run(runs, "extract", name, model, n_layers, results={"chosen": {"layer": layer, "pos": -1}})


def test_depth_puts_patch_peaks_and_direction_layers_on_one_scale(runs):
    patch_run(runs, "pA", "A", 24, [("denoise", "attn_out", 11, -1, "-1", None, 0.8),
                                     ("denoise", "mlp_out", 3, -1, "-1", None, 0.2)])
    patch_run(runs, "pB", "B", 30, [("denoise", "mlp_out", 20, -2, "-2", None, 0.6),
                                     ("noise", "mlp_out", 2, -2, "-2", None, 0.9)])
    extract_run(runs, "eA", "A", 24, 12)
    extract_run(runs, "eC", "C", 28, 7)
    out = assert_ok(invoke(["depth", runs / "extract" / "eA", runs / "patch" / "pA", runs / "patch" / "pB",
                            runs / "extract" / "eC", "--name", "d"]))
    assert entries(runs / "depth" / "d") == {"depth.csv", "run.json"}
    df = pd.read_csv(runs / "depth" / "d" / "depth.csv").set_index("model")
    assert list(df.index) == ["A", "B", "C"]  # by model, in order of first appearance
    assert df.loc["A", "n_layers"] == 24 and df.loc["A", "patch_layer"] == 11
    assert df.loc["A", "patch_site"] == "attn_out"
    assert df.loc["A", "patch_depth"] == 11.5 / 24 and df.loc["A", "extract_depth"] == 12 / 24
    assert df.loc["A", "extract_site"] == "resid_pre"
    assert df.loc["B", "patch_depth"] == 20.5 / 30 and pd.isna(df.loc["B", "extract_layer"])
    assert df.loc["C", "extract_depth"] == 7 / 28 and pd.isna(df.loc["C", "patch_layer"])
    assert "0.479" in out and "0.500" in out
    assert_ok(invoke(["depth", runs / "patch" / "pB", "--direction", "noise", "--name", "n"]))
    assert pd.read_csv(runs / "depth" / "n" / "depth.csv").patch_layer.iloc[0] == 2


def test_depth_bad_input(runs):
    patch_run(runs, "p1", "A", 24, [("denoise", "attn_out", 11, -1, "-1", None, 0.8)])
    patch_run(runs, "p2", "A", 24, [("denoise", "attn_out", 10, -1, "-1", None, 0.8)])
    patch_run(runs, "pres", "A", 24, [("denoise", "resid_pre", 10, -1, "-1", None, 0.8)])
    extract_run(runs, "e1", "A", 24, 30)
    extract_run(runs, "e2", "A", 28, 3)
    p = runs / "patch"
    for args, needles in (
            ([p / "p1", p / "p2"], ("two patch runs",)),
            ([p / "pres"], ("--sites", "resid_pre")),
            ([runs / "extract" / "e1"], ("outside",)),
            ([p / "p1", runs / "extract" / "e2"], ("24 and 28 layers",)),
            ([p / "p1", "--sites", " , "], ("--sites",))):
        assert_usage_error(invoke(["depth", *args]), *needles)
    assert not (runs / "depth").exists()


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def halves_env(tmp_path_factory, one_thread):
    base = tmp_path_factory.mktemp("xmodel")
    rng = random.Random(0)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6)))

    def write(path, prefix):
        path.write_text("".join(json.dumps({"id": f"{prefix}{i}", "prompt": sent()}) + "\n" for i in range(16)))
        return path

    return {"model": save_tiny(base / "tiny"), "h": write(base / "h.jsonl", "h"), "b": write(base / "b.jsonl", "b")}


def test_geometry_halves_feed_imprint_spread(halves_env, runs):
    e = halves_env
    common = ["geometry", "--model", e["model"], "--harmful", e["h"], "--harmless", e["b"], "--quiet",
              "--batch-size", "8", "--no-silhouette", "--seed", "3"]
    for h in "ab":
        assert_ok(invoke([*common, "--half", h, "--name", h]))
    ids = load_prompt_set(str(e["h"])).ids
    mask = hash_split(ids, 3, 0.5)
    for h, n in (("a", int(mask.sum())), ("b", int((~mask).sum()))):
        geo = pd.read_csv(runs / "geometry" / h / "geometry.csv")
        assert set(geo.n_harmful) == {n}
        meta = json.loads((runs / "geometry" / h / "run.json").read_text())
        assert meta["params"]["half"] == h and meta["prompt_sets"][1]["n"] == n
        ds = DirectionSet.resolve(str(runs / "geometry" / h))
        assert ds.extra["half"] == h and ds.extra["half_seed"] == 3
    out = assert_ok(invoke(["imprint", "--spread", f"{runs}/geometry/a:{runs}/geometry/b", "--no-plot",
                            "--name", "s"]))
    assert "not recorded" not in out
    sp = pd.read_csv(runs / "imprint" / "s" / "spread.csv")
    assert sp.spread.notna().any() and set(sp.n_layers) == {4}
    assert_usage_error(invoke([*common, "--half", "c"]), "--half")
