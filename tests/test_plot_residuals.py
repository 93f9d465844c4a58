"""``refusal plot-residuals`` and its engine (``toolkit.projection``): orientation, projections, separation, the
pictures, and the command end to end on the tiny Qwen2 checkpoint (4 layers, width 32)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from test_cli import assert_ok, assert_usage_error, entries, invoke, tiny_files
from toolkit.errors import ToolkitError
from toolkit.plots import default_colors, draw_frames, write_gif
from toolkit.projection import Frame, orient, pacmap_neighbors, project_layers, project_pca, separation

FAST = ["--quiet", "--batch-size", "4"]
N_LAYERS = 4
N_TRAIN = 4  # train prompts per tiny set (test_cli.HARMFUL / HARMLESS)


# ------------------------------------------------------------------------------------------------ engine
def _clusters(rng, n=20, d=50, gap=6.0, axis=7):
    """Two Gaussian clusters separated along one axis: group 0 (the reference) at +gap/2, group 1 at -gap/2,
    so an unoriented projection tends to put the reference on the right."""
    x = rng.normal(size=(2 * n, d))
    x[:n, axis] += gap / 2
    x[n:, axis] -= gap / 2
    return x, np.repeat([0, 1], n)


def test_orient_flip_puts_the_reference_left_and_ignores_input_signs():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(30, 2)) + np.array([5.0, -3.0])
    groups = np.repeat([0, 1, 2], 10)
    pts[groups == 0] += [4.0, 2.0]  # reference to the right and above the second set
    out = orient(pts, groups)
    assert out[groups == 0, 0].mean() < out[groups != 0, 0].mean()
    assert out[groups == 1, 1].mean() >= out[groups == 0, 1].mean()
    assert np.allclose(out.mean(0), 0, atol=1e-12)  # centred
    # the input was mirrored in both axes; the output is the centred input with both axes negated
    assert np.array_equal(out, -(pts - pts.mean(0)))
    for sx in (1, -1):
        for sy in (1, -1):
            assert np.array_equal(orient(pts * [sx, sy], groups), out)


def test_orient_rotate_aligns_the_mean_difference_with_x_and_ignores_rotations():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(40, 2)) * [1.0, 3.0]
    groups = np.repeat([0, 1], 20)
    pts[groups == 0] += [-2.0, 5.0]
    out = orient(pts, groups, rotate=True)
    ref, rest = out[groups == 0].mean(0), out[groups == 1].mean(0)
    assert ref[0] < rest[0]
    assert ref[1] == pytest.approx(rest[1], abs=1e-12)  # the mean difference lies on the x axis
    assert np.sum(out[:, 1] ** 3) >= 0
    for angle in (0.3, 1.7, np.pi, -2.2):
        c, s = np.cos(angle), np.sin(angle)
        for mirror in (1, -1):
            moved = (pts @ np.array([[c, -s], [s, c]])) * [1, mirror] + [10.0, -7.0]
            assert np.allclose(orient(moved, groups, rotate=True), out, atol=1e-10)
    # with a previous frame, y follows it (no mirror jump between frames)
    mirrored = out * [1, -1]
    assert np.allclose(orient(pts, groups, rotate=True, previous=mirrored), mirrored, atol=1e-10)
    assert np.allclose(orient(pts, groups, rotate=True, previous=out), out, atol=1e-10)


def test_orient_refuses_malformed_input():
    pts = np.zeros((4, 2))
    with pytest.raises(ToolkitError, match="reference set"):
        orient(pts, [1, 1, 2, 2])
    with pytest.raises(ToolkitError, match="one entry per point"):
        orient(pts, [0, 1, 1])
    with pytest.raises(ToolkitError, match=r"\[n_points, 2\]"):
        orient(np.zeros((4, 3)), [0, 0, 1, 1])
    with pytest.raises(ToolkitError, match="NaN"):
        orient(np.full((4, 2), np.nan), [0, 0, 1, 1])


def test_pca_projection_recovers_a_known_split_with_the_reference_left():
    rng = np.random.default_rng(2)
    x, groups = _clusters(rng)
    y, info = project_pca(x)
    ev = info["explained_variance_ratio"]
    assert ev[0] > 0.2 > ev[1]  # the gap dominates the first component; the rest is isotropic noise
    # the first component is the separating axis (up to sign)
    assert abs(np.corrcoef(y[:, 0], x[:, 7])[0, 1]) > 0.95
    frames = project_layers(x[:, None, :], groups, [5], "pca")
    pts = frames[0].points
    assert frames[0].layer == 5 and not frames[0].degenerate
    assert pts[groups == 0, 0].max() < pts[groups == 1, 0].min()  # every reference point left of every other
    assert np.allclose(np.abs(pts), np.abs(y - y.mean(0)), atol=1e-9)  # orientation only flips signs
    # making the other set the reference mirrors the picture
    swapped = project_layers(x[:, None, :], 1 - groups, [5], "pca")[0].points
    assert np.allclose(swapped[:, 0], -pts[:, 0], atol=1e-9)
    assert frames[0].silhouette_full == pytest.approx(separation(x, groups))
    assert frames[0].silhouette_2d > 0.5 > frames[0].silhouette_full > 0.1  # the 49 noise dimensions blur it


def test_separation_is_sklearns_silhouette_and_nan_where_undefined():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 5))
    g = np.array([0, 1, 2] * 4)
    assert separation(x, g) == silhouette_score(x, g)
    assert np.isnan(separation(np.ones((6, 5)), [0, 0, 0, 1, 1, 1]))  # all points identical
    assert np.isnan(separation(x[:2], [0, 1]))  # one point per set
    far = np.vstack([np.zeros((5, 3)), np.full((5, 3), 100.0)]) + rng.normal(scale=0.01, size=(10, 3))
    assert separation(far, [0] * 5 + [1] * 5) > 0.99


def test_pacmap_neighbours_shrink_to_fit_few_points_and_refuse_too_few():
    # near + mid-near (round(k/2)) + further (2k) pairs must fit among the other points
    assert [pacmap_neighbors(n) for n in (7, 8, 11, 12, 35, 36, 320)] == [1, 2, 2, 3, 9, 10, 10]
    assert pacmap_neighbors(320, 30) == 30
    with pytest.raises(ToolkitError, match="at least 7 points"):
        pacmap_neighbors(6)
    with pytest.raises(ToolkitError, match="at least 1 neighbour"):
        pacmap_neighbors(100, 0)


def test_pacmap_layers_separate_known_clusters_and_are_reproducible():
    rng = np.random.default_rng(4)
    x, groups = _clusters(rng, n=15, d=120, gap=12.0)  # d > 100: PaCMAP reduces to 100 dims first
    acts = np.stack([x, x * 2 + 1, np.ones_like(x)], axis=1)  # the last layer: every point identical
    frames = project_layers(acts, groups, [0, 1, 2], "pacmap", seed=3)
    again = project_layers(acts, groups, [0, 1, 2], "pacmap", seed=3)
    for f, g in zip(frames, again):
        assert np.array_equal(f.points, g.points)
    for f in frames[:2]:
        assert f.info == {"n_neighbors": 8, "n_mid_near": 4, "n_further": 16, "svd_to_100": True}
        assert f.points[groups == 0, 0].max() < f.points[groups == 1, 0].min()
        assert f.silhouette_2d > 0.5
    assert frames[2].degenerate and np.array_equal(frames[2].points, np.zeros((30, 2)))
    assert np.isnan(frames[2].silhouette_2d) and np.isnan(frames[2].silhouette_full)


def test_pacmap_keeps_torch_threads():
    import torch

    before = torch.get_num_threads()
    rng = np.random.default_rng(5)
    x, groups = _clusters(rng, n=5, d=8)
    project_layers(x[:, None], groups, [0], "pacmap")
    assert torch.get_num_threads() == before


def test_draw_frames_and_gif(tmp_path):
    rng = np.random.default_rng(6)
    groups = np.repeat([0, 1], 10)
    frames = [Frame(l, rng.normal(size=(20, 2)), 0.5, 0.25, False, {"explained_variance_ratio": [0.4, 0.1]})
              for l in range(3)]
    paths = [tmp_path / f"l{l}.png" for l in range(3)]
    draw_frames(frames, groups, ["harmless", "harmful"], default_colors(2), paths, site="resid_pre", position=-1,
                method="pca")
    sizes = set()
    for p in paths:
        assert p.stat().st_size > 1000
        with Image.open(p) as im:
            sizes.add(im.size)
    assert sizes == {(640, 520)}  # 6.4 x 5.2 inches at 100 dpi, identical for every layer
    gif = write_gif(paths, tmp_path / "a.gif", fps=4)
    with Image.open(gif) as im:
        assert im.n_frames == 3 and im.size == (640, 520) and im.info["duration"] == 250
    with pytest.raises(ToolkitError, match="labels and colours"):
        draw_frames(frames, groups, ["a"], ["red"], paths, site="resid_pre", position=-1, method="pca")
    with pytest.raises(ToolkitError, match="not a matplotlib colour"):
        draw_frames(frames, groups, ["a", "b"], ["red", "nocolour"], paths, site="resid_pre", position=-1,
                    method="pca")
    with pytest.raises(ToolkitError, match="fps|frames per second"):
        write_gif(paths, tmp_path / "b.gif", fps=0)


def test_default_colors_are_blue_then_red():
    import seaborn as sns

    deep = sns.color_palette("deep", 10).as_hex()
    assert default_colors(3) == [deep[0], deep[3], deep[2]]


# ------------------------------------------------------------------------------------------------ command
@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("plot-residuals")
    return (base, *tiny_files(base))


def args(tiny_env, *extra):
    base, model, h, b = tiny_env
    return ["plot-residuals", "--model", model, "--sets", f"{b},{h}", *FAST, *extra]


def _check_run(run, layers, n_points, gif=True):
    df = pd.read_csv(run / "projection.csv")
    assert list(df.columns) == ["layer", "set", "label", "id", "x", "y"]
    assert len(df) == len(layers) * n_points
    assert sorted(df.layer.unique()) == sorted(layers)
    for l in layers:
        png = run / f"layer_{l:02d}.png"
        assert png.stat().st_size > 1000
    if gif:
        with Image.open(run / "residuals.gif") as im:
            assert im.n_frames == len(layers)
            with Image.open(run / f"layer_{layers[0]:02d}.png") as first:
                assert im.size == first.size
    else:
        assert "residuals.gif" not in entries(run)
    return df


def test_pca_run_writes_csv_pngs_and_gif(tiny_env, runs):
    out = assert_ok(invoke(args(tiny_env, "--method", "pca", "--name", "p")))
    run = runs / "plot-residuals" / "p"
    assert {"projection.csv", "separation.csv", "residuals.gif", "run.json",
            *(f"layer_{l:02d}.png" for l in range(N_LAYERS))} == entries(run)
    df = _check_run(run, list(range(N_LAYERS)), 2 * N_TRAIN)
    # default labels are the set names; rows follow the sets' train-split records
    assert list(df[df.layer == 1].label) == ["b"] * N_TRAIN + ["h"] * N_TRAIN
    assert list(df[df.layer == 1].id) == [f"b-{i:02d}" for i in range(1, 5)] + [f"h-{i:02d}" for i in range(1, 5)]
    # resid_pre of block 0 at the last token is the same token's embedding for every prompt: all at the origin
    assert (df[df.layer == 0][["x", "y"]] == 0).all().all()
    for l in range(1, N_LAYERS):
        d = df[df.layer == l]
        assert d[d.label == "b"].x.mean() < d[d.label == "h"].x.mean()  # the reference set on the left
        assert d[d.label == "h"].y.mean() >= d[d.label == "b"].y.mean()
    sep = pd.read_csv(run / "separation.csv")
    assert list(sep.layer) == list(range(N_LAYERS))
    assert np.isnan(sep.silhouette_2d[0]) and sep.degenerate[0] and not sep.degenerate[1:].any()
    assert sep.silhouette_full[1:].between(-1, 1).all()
    assert (sep.explained_variance_pc1[1:] >= sep.explained_variance_pc2[1:]).all()
    meta = json.loads((run / "run.json").read_text())
    assert meta["params"]["method"] == "pca" and meta["params"]["labels"] == ["b", "h"]
    assert meta["params"]["colors"] == default_colors(2) and meta["params"]["layers"] == list(range(N_LAYERS))
    assert meta["results"]["counts"] == {"b": N_TRAIN, "h": N_TRAIN}
    assert [p["split"] for p in meta["prompt_sets"]] == ["train", "train"]
    assert {"collect", "project", "draw"} <= set(meta["timings"])
    assert "silhouette" in out


def test_pacmap_run_on_the_tiny_model_is_reproducible(tiny_env, runs):
    for name in ("m1", "m2"):
        assert_ok(invoke(args(tiny_env, "--layers", "1,3", "--no-gif", "--name", name)))
    run = runs / "plot-residuals" / "m1"
    df = _check_run(run, [1, 3], 2 * N_TRAIN, gif=False)
    pd.testing.assert_frame_equal(df, pd.read_csv(runs / "plot-residuals" / "m2" / "projection.csv"))
    sep = pd.read_csv(run / "separation.csv")
    assert list(sep.n_neighbors) == [2, 2]  # 8 points: 2 near, 1 mid-near, 4 further pairs
    meta = json.loads((run / "run.json").read_text())
    assert meta["params"]["method"] == "pacmap" and meta["results"]["layers"] == [1, 3]


def test_custom_sets_labels_colours_split_and_position(tiny_env, runs, tmp_path):
    base, model, h, b = tiny_env
    third = tmp_path / "c.txt"  # a plain text file: no ids, no splits
    third.write_text("hello world\ngood cat\nbake bread\n")
    assert_ok(invoke(["plot-residuals", "--model", model, "--sets", f"{h},{b},{third}", "--labels",
                      "unsafe,safe,other", "--colors", "tab:red,#1f77b4,0.4", "--split", "test", "--limit", "3",
                      "--layers", "2", "--position", "-2", "--method", "pca", "--fps", "1", "--name", "c", *FAST]))
    run = runs / "plot-residuals" / "c"
    df = _check_run(run, [2], 3 + 3 + 3)
    assert list(df.label) == ["unsafe"] * 3 + ["safe"] * 3 + ["other"] * 3
    assert list(df.set) == ["h"] * 3 + ["b"] * 3 + ["c"] * 3
    assert list(df.id[:3]) == ["h-09", "h-10", "h-11"]  # the test split, first 3
    assert df[df.label == "unsafe"].x.mean() < df[df.label != "unsafe"].x.mean()
    meta = json.loads((run / "run.json").read_text())
    assert meta["params"]["colors"] == ["tab:red", "#1f77b4", "0.4"] and meta["params"]["position"] == -2
    assert [p["split"] for p in meta["prompt_sets"]] == ["test", "test", None]  # the text file has no splits


@pytest.mark.parametrize("extra, needle", [
    (["--site", "resid_side"], "unknown hook site"),
    (["--layers", "4"], "out of range"),
    (["--layers", "-5"], "out of range"),
    (["--layers", "x"], "--layers"),
    (["--labels", "a,b,c"], "--labels has 3 entries for 2 sets"),
    (["--colors", "red"], "--colors has 1 entries for 2 sets"),
    (["--colors", "red,notacolour"], "not a matplotlib colour"),
    (["--labels", "same,same"], "labels must differ"),
    (["--method", "tsne"], "unknown projection method"),
    (["--position", "0"], "negative"),
    (["--position", "-99"], "beyond"),
    (["--limit", "3"], "at least 7"),  # PaCMAP on 6 points
    (["--limit", "0"], "--limit"),
    (["--fps", "0"], "--fps"),
    (["--neighbors", "0"], "--neighbors"),
    (["--split", "dev"], "unknown split"),
])
def test_bad_input_is_one_error_line_and_no_run(tiny_env, runs, extra, needle):
    assert_usage_error(invoke(args(tiny_env, "--name", "bad", *extra)), needle)
    assert entries(runs / "plot-residuals") == set()


def test_a_single_set_or_a_missing_file_is_refused(tiny_env, runs, tmp_path):
    base, model, h, b = tiny_env
    assert_usage_error(invoke(["plot-residuals", "--model", model, "--sets", str(h), *FAST]), "2 or more")
    assert_usage_error(invoke(["plot-residuals", "--model", model, "--sets", f"{h},{tmp_path / 'nope.jsonl'}",
                               *FAST]), "nope.jsonl")
    assert entries(runs / "plot-residuals") == set()
