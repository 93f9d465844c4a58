"""The engine's value types and its boundary with the CLI: :class:`toolkit.directions.Direction` and
:class:`~toolkit.directions.DirectionSet` (one artifact schema, old files still load, model checks),
:class:`toolkit.index_spec.LayerSpec` / :class:`~toolkit.index_spec.PositionSpec` (parsed once, resolved once), and
``ToolkitError.param`` printed as a flag by the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from test_cli import D_MODEL, HARMFUL, assert_ok, assert_usage_error, invoke, write_set
from toolkit.directions import SCHEMA, Direction, DirectionSet, save_direction
from toolkit.errors import ToolkitError
from toolkit.index_spec import LayerSpec, PositionSpec, check_position, check_site

D = 8


def _vec(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def _lm(d_model: int = D, model_hash: str = "a" * 64, model_id: str = "tiny"):
    return SimpleNamespace(d_model=d_model, model_hash=model_hash, model_id=model_id)


# ------------------------------------------------------------------------------------------------ Direction
def test_direction_round_trip_keeps_every_field_and_the_raw_norm(tmp_path):
    v = _vec() * 7
    d = Direction(v, layer=3, site="resid_mid", position=-2, model_hash="a" * 64, model_id="tiny",
                  method="difference-in-means (Arditi et al. 2024)", extra={"learned_on": {"n": 12}})
    assert d.d_model == D and d.vector.dtype == torch.float32 and d.source is None
    f = tmp_path / "d.safetensors"
    d.save(f)
    e = Direction.load(f)
    assert torch.equal(e.vector, v.float())
    assert (e.layer, e.site, e.position, e.model_hash, e.model_id, e.d_model, e.method) == \
        (3, "resid_mid", -2, "a" * 64, "tiny", D, "difference-in-means (Arditi et al. 2024)")
    assert e.extra == {"learned_on": {"n": 12}}
    assert e.source == str(f)
    assert e.norm == pytest.approx(float(v.double().norm()))
    from safetensors import safe_open

    with safe_open(str(f), "pt") as fh:
        meta = json.loads(fh.metadata()["meta"])
    assert meta["schema"] == SCHEMA == 2
    assert meta["position"] == -2 and "pos" not in meta and "source" not in meta
    assert meta["learned_on"] == {"n": 12}  # extra keys sit at the top level
    assert meta["norm"] == pytest.approx(e.norm)
    assert e.describe() == {"source": str(f), **{k: v for k, v in meta.items() if k != "schema"}}


def test_old_schema_file_loads_with_pos_as_position(tmp_path):
    f = tmp_path / "old.safetensors"
    save_direction(f, _vec(), {"model_id": "m", "model_hash": "b" * 64, "d_model": D, "layer": 15, "pos": -1,
                               "site": "resid_pre", "norm": 5.69, "method": "difference-in-means (Arditi et al. 2024)"})
    d = Direction.load(f)
    assert (d.layer, d.position, d.site, d.model_id, d.model_hash) == (15, -1, "resid_pre", "m", "b" * 64)
    assert d.extra == {}
    bare = tmp_path / "bare.safetensors"  # hand-made: no metadata at all
    save_file({"direction": _vec()}, str(bare))
    b = Direction.load(bare)
    assert (b.layer, b.site, b.position, b.model_hash, b.d_model) == (None, None, None, None, D)


@pytest.mark.parametrize("meta, needle", [
    ({"schema": 3}, "schema version 3 is newer"),
    ({"d_model": D + 1}, f"metadata d_model {D + 1} but the vector has {D} values"),
    ({"layer": "abc"}, "metadata 'layer' should be int"),
    ({"pos": "x"}, "metadata 'pos' should be int"),
    ({"position": 1.5}, "metadata 'position' should be int"),
])
def test_direction_file_with_bad_metadata_is_refused(tmp_path, meta, needle):
    f = tmp_path / "bad.safetensors"
    save_direction(f, _vec(), meta)
    with pytest.raises(ToolkitError, match=needle):
        Direction.load(f)


@pytest.mark.parametrize("vector, needle", [
    (torch.ones(2, D), r"shape \(2, 8\), expected \[d_model\]"),
    (torch.full((D,), float("nan")), "not a finite floating-point vector"),
    (torch.arange(D), "not a finite floating-point vector"),
])
def test_direction_refuses_a_bad_vector(vector, needle):
    with pytest.raises(ToolkitError, match=needle):
        Direction(vector)


def test_direction_extra_must_not_reuse_a_field_name():
    with pytest.raises(ToolkitError, match="field name 'layer'"):
        Direction(_vec(), extra={"layer": 2})


def test_check_refuses_another_width_or_model_and_accepts_an_unrecorded_hash():
    d = Direction(_vec(), model_hash="a" * 64, model_id="tiny")
    assert d.check(_lm()) is d
    with pytest.raises(ToolkitError, match=f"direction has d_model {D} but model big has d_model 16"):
        d.check(_lm(d_model=16, model_id="big"))
    with pytest.raises(ToolkitError, match=r"extracted from model tiny \(hash aaaaaaaaaaaa\), not other "
                                           r"\(hash ffffffffffff\)"):
        d.check(_lm(model_hash="f" * 64, model_id="other"))
    assert Direction(_vec()).check(_lm(model_hash="f" * 64)).model_hash is None


def test_resolve_reads_a_file_or_refuses_a_missing_run(tmp_path, runs):
    f = tmp_path / "d.safetensors"
    Direction(_vec(), layer=1).save(f)
    assert Direction.resolve(str(f)).layer == 1
    with pytest.raises(ToolkitError, match="no run at nothing-here"):
        Direction.resolve("nothing-here")


# ------------------------------------------------------------------------------------------------ DirectionSet
def test_direction_set_round_trip_with_auxiliary_tensors(tmp_path):
    v = torch.randn(3, D)
    s = DirectionSet(v, [2, 4, 6], site="resid_pre", position=-1, model_hash="a" * 64, model_id="tiny",
                     method="m", extra={"kind": "geometry"}, tensors={"resid_norm": torch.ones(3, dtype=torch.float64),
                                                                       "mean_harmful": torch.zeros(3, D)})
    f = tmp_path / "directions.safetensors"
    s.save(f)
    t = DirectionSet.load(f, require=("resid_norm",))
    assert torch.equal(t.vectors, v) and t.layers == (2, 4, 6) and t.positions is None
    assert (t.site, t.position, t.model_hash, t.model_id, t.d_model, t.method) == ("resid_pre", -1, "a" * 64,
                                                                                   "tiny", D, "m")
    assert t.extra == {"kind": "geometry"}
    assert t.resid_norm.dtype == torch.float32 and torch.equal(t.resid_norm, torch.ones(3))
    assert set(t.tensors) == {"resid_norm", "mean_harmful"}
    one = t.direction(4)
    assert isinstance(one, Direction) and one.layer == 4 and torch.equal(one.vector, v[1])
    assert (one.site, one.position, one.model_hash) == ("resid_pre", -1, "a" * 64)
    with pytest.raises(ToolkitError, match="no direction at layer 5"):
        t.direction(5)
    with pytest.raises(ToolkitError, match="at position -1 only, not -2"):
        t.at(-2)


def test_direction_set_grid_picks_a_position(tmp_path):
    v = torch.randn(2, 3, D)
    g = DirectionSet(v, [0, 1], positions=[-3, -2, -1], position=-2)
    f = tmp_path / "candidates.safetensors"
    g.save(f)
    h = DirectionSet.load(f)
    assert h.positions == (-3, -2, -1) and h.position == -2
    s = h.at(-3)
    assert s.positions is None and s.position == -3 and torch.equal(s.vectors, v[:, 0])
    assert torch.equal(h.direction(1, -1).vector, v[1, 2]) and h.direction(1, -1).position == -1
    with pytest.raises(ToolkitError, match=r"candidates at positions \[-3, -2, -1\], not -7"):
        h.at(-7)


def test_old_cones_file_loads(tmp_path):
    f = tmp_path / "directions.safetensors"  # as cones wrote it before the schema: no "schema" key
    meta = {"model_id": "m", "model_hash": "c" * 64, "d_model": D, "site": "resid_pre", "position": -1,
            "categories": ["a", "b"], "kind": "cones", "split": "train", "method": "dim"}
    save_file({"directions": torch.randn(2, D), "category_directions": torch.randn(2, 2, D),
               "resid_norm": torch.ones(2), "layers": torch.tensor([3, 5])}, str(f),
              metadata={"meta": json.dumps(meta)})
    s = DirectionSet.load(f, require=("resid_norm",))
    assert s.layers == (3, 5) and s.position == -1 and s.model_hash == "c" * 64
    assert s.extra == {"categories": ["a", "b"], "kind": "cones", "split": "train"}
    assert tuple(s.tensors["category_directions"].shape) == (2, 2, D)


def _old_extract_run(runs, name: str, chosen_pos: int) -> torch.Tensor:
    """An extract run as the toolkit wrote it before the direction schema: candidates without metadata and a
    direction file with ``pos``; returns the candidate grid ``[n_layers, n_positions, d_model]``."""
    from toolkit.runs import Run

    grid = torch.randn(3, 2, D)
    with Run("extract", name, root=runs) as run:
        save_file({"directions": grid, "mean_harmful": grid.clone(), "mean_harmless": grid.clone(),
                   "layers": torch.tensor([0, 1, 2]),
                   "positions": torch.tensor([-2, -1])}, str(run.path("candidates.safetensors")))
        save_direction(run.path("direction.safetensors"), grid[1, 0], {"layer": 1, "pos": chosen_pos,
                                                                      "site": "resid_pre", "model_hash": "d" * 64})
        run.finish(model={"id": "m", "hash": "d" * 64}, prompt_sets=[], seed=0, params={},
                   results={"chosen": {"layer": 1, "pos": chosen_pos}})
    return grid


def test_old_extract_run_resolves_as_direction_and_direction_set(runs):
    grid = _old_extract_run(runs, "old", -2)
    d = Direction.resolve(str(runs / "extract" / "old"))
    assert d.source == str(runs / "extract" / "old") and (d.layer, d.position, d.site) == (1, -2, "resid_pre")
    assert torch.equal(d.vector, grid[1, 0]) and Direction.resolve("old").layer == 1  # a bare name: runs/extract/
    s = DirectionSet.resolve(str(runs / "extract" / "old"))
    assert (s.source, s.extra, s.site, s.position, s.model_id, s.model_hash) == \
        ("extract/old", {"command": "extract"}, "resid_pre", -2, "m", "d" * 64)
    assert torch.equal(s.vectors, grid[:, 0]) and s.layers == (0, 1, 2) and s.resid_norm is None
    assert torch.equal(DirectionSet.resolve(str(runs / "extract" / "old"), -1).vectors, grid[:, 1])
    with pytest.raises(ToolkitError, match=r"positions \[-2, -1\], not -5"):
        DirectionSet.resolve(str(runs / "extract" / "old"), -5)


@pytest.mark.parametrize("tensors, needle", [
    ({"directions": torch.ones(4, D), "layers": torch.arange(2)}, r"holds directions \(4, 8\) for 2 layers"),
    ({"directions": torch.ones(4, D), "layers": torch.arange(4), "resid_norm": torch.ones(3)}, "for 4 layers"),
    ({"directions": torch.full((2, D), float("inf")), "layers": torch.arange(2)}, "not finite"),
    ({"directions": torch.ones(2, D)}, "has no tensor 'layers'"),
])
def test_direction_set_with_inconsistent_tensors_is_refused(tmp_path, tensors, needle):
    f = tmp_path / "directions.safetensors"
    save_file(tensors, str(f))
    with pytest.raises(ToolkitError, match=needle) as e:
        DirectionSet.load(f)
    assert "directions.safetensors" in str(e.value)


# ------------------------------------------------------------------------------------------------ LayerSpec
@pytest.mark.parametrize("text, n, expected", [
    ("12", 24, (12,)), ("8,12,16", 24, (8, 12, 16)), ("4:8", 24, (4, 5, 6, 7)), ("-1", 24, (23,)),
    ("-4:-1", 24, (20, 21, 22)), ("3,-1,3,23", 24, (3, 23)), ("16,8", 24, (16, 8)), ("0", 1, (0,)),
])
def test_layer_spec_parses_and_resolves(text, n, expected):
    assert LayerSpec.parse(text).resolve(n) == expected


def test_layer_spec_of_ints():
    s = LayerSpec.of([-1], "layer")
    assert (s.text, s.indices, s.param, s.given) == ("-1", (-1,), "layer", True)
    assert s.resolve(4) == (3,)
    with pytest.raises(ToolkitError) as e:
        LayerSpec.of([99], "direction").resolve(4)
    assert str(e.value) == "direction: layer 99 is out of range: this model has 4 layers (0..3)"
    with pytest.raises(ToolkitError, match="layers: names no layer"):
        LayerSpec.of([])


def test_layer_spec_not_given_uses_its_default_checked_the_same_way():
    s = LayerSpec.parse(None)
    assert not s.given and s.indices is None
    assert s.resolve(4) == (0, 1, 2, 3)
    assert s.resolve(4, default=[-1]) == (3,)
    with pytest.raises(ToolkitError, match="layer 9 is out of range"):
        s.resolve(4, default=[9])


@pytest.mark.parametrize("text, message", [
    ("5:5", "layers: '5:5' names no layer (a range a:b is half-open: it needs a < b)"),
    ("3:1", "layers: '3:1' names no layer (a range a:b is half-open: it needs a < b)"),
    ("", "layers: '' names no layer (a range a:b is half-open: it needs a < b)"),
    (",", "layers: ',' names no layer (a range a:b is half-open: it needs a < b)"),
    ("a", "layers: must be integers like '1,2,5' or '4:8', got 'a'"),
    ("1:2:3", "layers: must be integers like '1,2,5' or '4:8', got '1:2:3'"),
])
def test_layer_spec_refuses_bad_or_empty_selections(text, message):
    with pytest.raises(ToolkitError) as e:
        LayerSpec.parse(text)
    assert str(e.value) == message and e.value.param == "layers"


@pytest.mark.parametrize("text, bad", [("4", 4), ("-5", -5), ("2:6", 4), ("0,99", 99)])
def test_layer_spec_refuses_layers_out_of_range(text, bad):
    with pytest.raises(ToolkitError) as e:
        LayerSpec.parse(text, "layer").resolve(4)
    assert str(e.value) == f"layer: layer {bad} is out of range: this model has 4 layers (0..3)"
    assert e.value.param == "layer"


# ------------------------------------------------------------------------------------------------ PositionSpec
POST = [-5, -4, -3, -2, -1]


@pytest.mark.parametrize("text, expected", [
    ("post", tuple(POST)), ("POST", tuple(POST)), ("last", (-1,)), ("all", None), ("-1", (-1,)),
    ("-1,-3,-1", (-3, -1)), ("-3:0", (-3, -2, -1)), (" -2 ", (-2,)),
])
def test_position_spec_parses_and_resolves(text, expected):
    assert PositionSpec.parse(text).resolve(POST) == expected


def test_position_spec_defaults():
    assert PositionSpec.parse(None).resolve(POST) == tuple(POST)
    assert PositionSpec.parse(None).resolve(POST, default=[-8, -1, -2]) == (-8, -2, -1)
    assert PositionSpec.parse("last").resolve(POST, default=[-8]) == (-1,)


@pytest.mark.parametrize("text, kwargs, message", [
    ("0", {}, "positions: position 0 is not a negative index (from the end of the prompt) in '0'"),
    ("1,-1", {}, "positions: position 1 is not a negative index (from the end of the prompt) in '1,-1'"),
    ("first", {}, "positions: must be all, last, post or negative indices like '-1,-2', got 'first'"),
    ("", {}, "positions: must be all, last, post or negative indices like '-1,-2', got ''"),
    ("-1:-1", {}, "positions: must be all, last, post or negative indices like '-1,-2', got '-1:-1'"),
    ("all", {"allow_all": False}, "positions: 'all' is not supported here: name positions (negative indices, post, "
                                  "last)"),
    ("x", {"param": "head_positions", "allow_all": False},
     "head_positions: must be last, post or negative indices like '-1,-2', got 'x'"),
])
def test_position_spec_refuses(text, kwargs, message):
    with pytest.raises(ToolkitError) as e:
        PositionSpec.parse(text, **kwargs)
    assert str(e.value) == message


def test_single_position_and_site_checks():
    assert check_position(-3) == -3
    with pytest.raises(ToolkitError) as e:
        check_position(0)
    assert str(e.value) == "position: must be a negative index from the end of the prompt, got 0"
    assert check_site("attn_out") == "attn_out"
    with pytest.raises(ToolkitError, match="unknown hook site 'bogus'") as e:
        check_site("bogus")
    assert e.value.param == "site"


# ------------------------------------------------------------------------------------------------ errors -> flags
def test_engine_errors_name_parameters_and_the_cli_prints_flags():
    from experiments.shared import cli_message, param_flag

    e = ToolkitError("must be >= 1", param="gen_tokens")
    assert (str(e), e.message, e.param) == ("gen_tokens: must be >= 1", "must be >= 1", "gen_tokens")
    assert str(ToolkitError("plain")) == "plain" and ToolkitError("plain").param is None
    assert param_flag("gen_tokens") == "--gen-tokens" and param_flag("layers") == "--layers"
    assert param_flag("filter_by") == "--filter" and param_flag("max_pairs") == "--pairs"
    assert cli_message(e) == "--gen-tokens: must be >= 1"
    assert cli_message(ToolkitError("run x exists; choose another `name` or pass `force`", param="name")) == \
        "--name: run x exists; choose another --name or pass --force"


@pytest.mark.parametrize("command", [
    ["extract"], ["steer", "--learn", "harmful"], ["cones"], ["geometry"], ["patch"],
    ["plot-residuals"],
])
@pytest.mark.parametrize("layers", ["5:5", "3:1"])
def test_cli_empty_layer_selection_is_one_error_line_before_the_model_loads(env, command, layers):
    r = invoke([*command, "--layers", layers, "--model", "/no/such/model"])
    line = assert_usage_error(r, f"--layers: '{layers}' names no layer")
    assert line == f"error: --layers: '{layers}' names no layer (a range a:b is half-open: it needs a < b)"


def test_cli_site_defaults_to_the_directions_site(env, tiny_folder, tmp_path):
    h = write_set(tmp_path / "h.jsonl", HARMFUL, "h")
    f = tmp_path / "d.safetensors"
    Direction(_vec(d=D_MODEL), layer=1, site="resid_post").save(f)
    assert_ok(invoke(["steer", "--direction", f, "--sets", h, "--split", "test", "--alpha", "0,1", "--no-plot",
                      "--model", tiny_folder, "--quiet", "--batch-size", "4", "--name", "s"]))
    run = json.loads((env / "steer" / "s" / "run.json").read_text())
    assert run["params"]["site"] == "resid_post" and run["params"]["layers"] == [1]
    assert run["results"]["direction"]["site"] == "resid_post"
    assert_ok(invoke(["steer", "--direction", f, "--sets", h, "--split", "test", "--alpha", "0,1", "--no-plot",
                      "--site", "mlp_out", "--model", tiny_folder, "--quiet", "--batch-size", "4", "--name", "t"]))
    assert json.loads((env / "steer" / "t" / "run.json").read_text())["params"]["site"] == "mlp_out"


def test_interventions_take_their_defaults_from_a_direction(tiny):
    """A Direction given to an intervention is its vector, and activation addition's layers and site default to
    the direction's recorded layer and site (exactly as if given by hand); without a recorded layer, layers must
    be given."""
    from toolkit.interventions import activation_addition, directional_ablation, orthogonalize_weights
    from toolkit.runner import Runner
    from toolkit.templates import ChatFormat
    from conftest import PROMPTS

    r = Runner(tiny, ChatFormat(tiny.tokenizer), batch_size=4, progress=False)
    enc = r.encode(PROMPTS)
    v = torch.randn(tiny.d_model, generator=torch.Generator().manual_seed(5)) * 3
    d = Direction(v, layer=2, site="attn_out", position=-1)
    with activation_addition(tiny.model, d, alpha=1.5):
        got = r.logits(enc)
    with activation_addition(tiny.model, v, [2], alpha=1.5, site="attn_out"):
        want = r.logits(enc)
    assert torch.equal(got, want) and not torch.equal(got, r.logits(enc))
    with directional_ablation(tiny.model, d):
        got = r.logits(enc)
    with directional_ablation(tiny.model, v):
        assert torch.equal(got, r.logits(enc))
    with pytest.raises(ToolkitError, match="layers: activation addition needs layers"):
        with activation_addition(tiny.model, Direction(v)):
            pass
    with pytest.raises(ToolkitError, match="layers: activation addition needs layers"):
        with activation_addition(tiny.model, v):
            pass
    assert orthogonalize_weights(tiny.model, d)["edited"]
