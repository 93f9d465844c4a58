"""``refusal cones``, ``refusal geometry`` and ``refusal imprint`` end to end on a tiny Qwen2 checkpoint."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import WORDS
from test_cli import assert_ok, assert_usage_error, entries, invoke, save_tiny
from toolkit.geometry import imprint

FAST = ["--quiet", "--batch-size", "8"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("analysis")
    rng = random.Random(0)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))

    harm = [{"id": f"h{c}{i}", "prompt": sent(), "category": f"c{c}", "split": "train" if i < 6 else "test"}
            for c in range(3) for i in range(8)]
    harm.append({"id": "lonely", "prompt": sent(), "category": "solo", "split": "train"})
    less = [{"id": f"b{i}", "prompt": sent(), "category": "x", "split": "train" if i < 12 else "test"}
            for i in range(16)]
    return {"model": save_tiny(base / "tiny"), "h": write_jsonl(base / "h.jsonl", harm),
            "b": write_jsonl(base / "b.jsonl", less), "base": base}


def cones_args(env, *extra):
    return ["cones", "--model", env["model"], "--harmful", env["h"], "--harmless", env["b"], "--min-per-category", "3",
            "--boot", "20", "--null", "20", "--k-max", "4", *FAST, *extra]


def geometry_args(env, *extra):
    return ["geometry", "--model", env["model"], "--harmful", env["h"], "--harmless", env["b"], *FAST, *extra]


def test_cones_writes_intervals_null_labels_and_the_ablation_test(env, runs):
    out = assert_ok(invoke(cones_args(env, "--ablate-test", "--name", "c")))
    run = runs / "cones" / "c"
    assert {"cones.csv", "categories.csv", "pairs.csv", "kmeans.csv", "ablation.csv", "directions.safetensors",
            "cones.png", "run.json"} == entries(run)
    assert (run / "cones.png").stat().st_size > 1000
    meta = json.loads((run / "run.json").read_text())
    res = meta["results"]
    # 'solo' has one prompt: reported, not analysed; layer 0 at the last token has no contrast (same token)
    assert res["excluded_categories"] == {"solo": 1} and res["categories"] == {"c0": 6, "c1": 6, "c2": 6}
    assert res["layers_without_contrast"] == [0] and "too few prompts" in out
    cones = pd.read_csv(run / "cones.csv")
    assert list(cones.layer) == [1, 2, 3] and (cones.n_categories == 3).all()
    assert set(cones.label) <= {"linear", "polyhedral", "indistinguishable from random groups", "unlabelled"}
    assert ((cones.dim >= 1 - 1e-9) & (cones.dim <= 3 + 1e-9)).all()
    assert (cones.cos_ci_low <= cones.cos_ci_high).all() and (cones.dim_null_low <= cones.dim_null_high).all()
    cats = pd.read_csv(run / "categories.csv")
    assert len(cats) == 3 * 3 and set(cats.n) == {6}
    pairs = pd.read_csv(run / "pairs.csv")
    assert len(pairs) == 3 * 3  # 3 layers x 3 pairs
    # the saved directions reproduce the point figures exactly
    t = load_file(str(run / "directions.safetensors"))
    assert t["category_directions"].shape == (3, 3, 32) and t["directions"].shape == (3, 32)
    from toolkit.geometry import cone_figures

    for i, layer in enumerate([1, 2, 3]):
        f = cone_figures(t["category_directions"][:, i].double(), torch.zeros(32))
        row = cones[cones.layer == layer].iloc[0]
        assert f.mean_abs_cos == pytest.approx(row.mean_abs_cos, abs=1e-5) and f.dim == pytest.approx(row.dim, abs=1e-5)
        sub = cats[cats.layer == layer].sort_values("category")
        assert np.allclose(f.strength, sub.strength, rtol=1e-5)
    km = pd.read_csv(run / "kmeans.csv")
    assert set(km.k) == {2, 3, 4} and km.ari.between(-1, 1).all()
    abl = pd.read_csv(run / "ablation.csv")
    assert set(abl.condition) == {"none", "single", "categories", "single+2 random"}
    assert set(abl.dims) == {0, 1, 3}
    test_counts = abl[(abl.condition == "none") & abl.category.isin(["c0", "c1", "c2"])].n
    assert list(test_counts) == [2, 2, 2]
    none_kl = abl[(abl.condition == "none") & (abl.category == "all harmless")].mean_kl.iloc[0]
    assert none_kl == pytest.approx(0.0, abs=1e-9)


def test_cones_bad_input(env, runs, tmp_path):
    one_each = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "hack computer", "category": "a"},
                                                    {"prompt": "steal car", "category": "b"},
                                                    {"prompt": "make a bomb", "category": "b"}])
    assert_usage_error(invoke(cones_args(env, "--harmful", one_each)), "at least two categories")
    assert_usage_error(invoke(cones_args(env, "--min-per-category", "1")), "at least 2")
    assert_usage_error(invoke(cones_args(env, "--site", "resid_nowhere")), "unknown hook site")
    assert_usage_error(invoke(cones_args(env, "--layers", "99")), "out of range")
    assert_usage_error(invoke(cones_args(env, "--boot", "5")), "at least 20")
    assert_usage_error(invoke(cones_args(env, "--report-layer", "0")), "not among the analysed layers")
    assert not (runs / "cones").exists() or not [p for p in (runs / "cones").iterdir()]


def test_geometry_matches_a_direct_computation(env, runs):
    out = assert_ok(invoke(geometry_args(env, "--dtype", "float32", "--name", "g")))
    run = runs / "geometry" / "g"
    assert {"geometry.csv", "directions.safetensors", "run.json"} == entries(run)
    assert "S(g*,b*)" in out and "Silh" in out
    df = pd.read_csv(run / "geometry.csv")
    assert list(df.layer) == [0, 1, 2, 3] and set(df.n_harmful) == {19} and set(df.n_harmless) == {12}
    # residuals read directly with the Runner on the same checkpoint
    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat

    lm = load_model(str(env["model"]), dtype="float32", device="cpu")
    r = Runner(lm, ChatFormat(lm.tokenizer), batch_size=8, progress=False)
    acts = {}
    for key in ("h", "b"):
        ps = load_prompt_set(str(env[key])).select("train")
        acts[key] = r.collect(r.encode(ps.prompts), [0, 1, 2, 3], ["resid_pre"], [-1])["resid_pre"][:, :, 0].double()
    for layer in (1, 2, 3):
        g, b = acts["b"][:, layer].mean(0), acts["h"][:, layer].mean(0)
        row = df[df.layer == layer].iloc[0]
        cos = torch.nn.functional.cosine_similarity
        assert row.cos_g_b == pytest.approx(float(cos(g, b, dim=0)), abs=1e-5)
        assert row.cos_g_r == pytest.approx(float(cos(g, b - g, dim=0)), abs=1e-4)
        assert row.norm_r == pytest.approx(float((b - g).norm()), rel=1e-4)
        assert -1 <= row.silhouette <= 1
    # layer 0 at the last token: the same embedding for every prompt, so r = 0 and its cosines are undefined
    assert df.norm_r.iloc[0] == pytest.approx(0.0, abs=1e-6) and np.isnan(df.cos_g_r.iloc[0])


def test_geometry_bad_input(env, runs, tmp_path):
    single = write_jsonl(tmp_path / "single.jsonl", [{"prompt": "hack computer"}])
    assert_usage_error(invoke(geometry_args(env, "--harmful", single)), "at least two prompts")
    assert_usage_error(invoke(geometry_args(env, "--layers", "4")), "out of range")
    assert_usage_error(invoke(geometry_args(env, "--site", "hook_z")), "unknown hook site")
    assert_usage_error(invoke(geometry_args(env, "--position", "0")), "negative index")


def test_imprint_compares_runs_side_by_side(env, runs):
    assert_ok(invoke(cones_args(env, "--no-kmeans", "--boot", "0", "--null", "0", "--no-plot", "--name", "c")))
    assert_ok(invoke(geometry_args(env, "--name", "g")))
    out = assert_ok(invoke(["imprint", runs / "cones" / "c", runs / "geometry" / "g", "--name", "i"]))
    assert "UNVALIDATED" not in out and "mean cos with first run" in out
    run = runs / "imprint" / "i"
    assert {"imprint.csv", "layers.csv", "imprint.png", "run.json"} == entries(run)
    df = pd.read_csv(run / "imprint.csv")
    assert list(df.run) == ["cones/c", "geometry/g"] and not any(c.startswith("p_") for c in df.columns)
    t = load_file(str(runs / "geometry" / "g" / "directions.safetensors"))
    expected = imprint(t["directions"][1:].double(), [1, 2, 3], t["resid_norm"][1:].double())  # layer 0 left out
    row = df[df.run == "geometry/g"].iloc[0]
    for k in ("gini", "gini_rel", "effective_rank", "smoothness", "tail_share", "orthogonality", "angular_drift_deg"):
        assert row[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-6), k
    layers = pd.read_csv(run / "layers.csv")
    # cones used 18 of geometry's 19 harmful prompts ('solo' excluded): directions agree closely, not exactly
    cross = layers[layers.run == "geometry/g"].cos_first_run
    assert len(cross) == 3 and (cross > 0.9).all() and (cross < 1).all()
    out = assert_ok(invoke(["imprint", runs / "cones" / "c", runs / "geometry" / "g", "--classify", "--name", "k"]))
    assert "UNVALIDATED HEURISTIC" in out and "gini 0.25±0.1" in out
    k = pd.read_csv(runs / "imprint" / "k" / "imprint.csv")
    probs = k[[c for c in k.columns if c.startswith("p_")]]
    assert probs.shape[1] == 4 and np.allclose(probs.sum(1), 1.0)


def test_imprint_bad_input(env, runs, tmp_path):
    assert_ok(invoke(geometry_args(env, "--name", "g", "--no-silhouette")))
    assert_usage_error(invoke(["imprint", tmp_path / "nothing"]), "no run at")
    assert_usage_error(invoke(["imprint", runs / "geometry" / "g", runs / "geometry" / "g"]), "twice")
    assert_usage_error(invoke(["imprint", runs / "geometry" / "g", "--position", "-3"]), "position -1 only")
    bad = tmp_path / "tpl.json"
    bad.write_text("[1, 2]")
    assert_usage_error(invoke(["imprint", runs / "geometry" / "g", "--classify", "--templates", bad]), "--templates")
