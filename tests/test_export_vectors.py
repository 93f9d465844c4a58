"""``refusal export`` and :mod:`toolkit.control_vectors`: llama.cpp control vectors, repeng files, safetensors.

The layer mapping is checked twice: against the formats (tensor names read back with ``gguf.GGUFReader``) and by
behaviour on a tiny Qwen2, where adding ``direction.N`` to the OUTPUT of block ``N`` (what llama.cpp's
``build_cvec`` and repeng's ``ControlModule`` do) must give the very logits of this toolkit's activation addition
at the exported site. The repeng round trip runs only where repeng is importable (it is not a dependency).
"""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch

from conftest import make_lm
from test_cli import assert_ok, assert_usage_error, invoke
from toolkit.control_vectors import (block_output_index, control_vectors, resolve_source,
                                     write_control_vectors)
from toolkit.directions import Direction, DirectionSet
from toolkit.errors import ToolkitError
from toolkit.hooks import decoder_layers
from toolkit.index_spec import LayerSpec
from toolkit.interventions import activation_addition

D = 32  # the tiny models' d_model


def vec(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def fields(path) -> tuple[dict, dict]:
    """A GGUF file read back -> ({key: value}, {tensor name: (shape, type, values)})."""
    r = gguf.GGUFReader(str(path))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    types = {k: f.types[0] for k, f in r.fields.items()}
    ts = {t.name: (tuple(int(s) for s in t.shape), t.tensor_type, np.array(t.data)) for t in r.tensors}
    return kv | {"_types": types}, ts


# ------------------------------------------------------------------------------------------------ mapping
def test_block_output_index_maps_our_sites_to_block_outputs():
    assert block_output_index(5, "resid_post") == 5
    assert block_output_index(5, "resid_pre") == 4
    assert block_output_index(0, "resid_pre") == -1
    for site in ("resid_mid", "attn_out", "mlp_out"):
        with pytest.raises(ToolkitError) as e:
            block_output_index(3, site)
        assert e.value.param is None and f"site is {site}" in e.value.message


# ------------------------------------------------------------------------------------------------ gguf
def test_gguf_names_shapes_dtype_and_values(tmp_path):
    v = torch.stack([vec(1), vec(2)])
    s = DirectionSet(v, (2, 3), site="resid_pre", model_id="org/tiny")
    cv = control_vectors(s, scale=-1.5, n_layers=4, model_type="qwen2")
    out = tmp_path / "cv.gguf"
    info = write_control_vectors(cv, "gguf-control-vector", out)
    kv, ts = fields(out)
    assert kv["general.architecture"] == "controlvector" and kv["controlvector.model_hint"] == "qwen2"
    assert kv["controlvector.layer_count"] == 4
    assert kv["_types"]["controlvector.layer_count"] == gguf.GGUFValueType.UINT32
    assert list(ts) == ["direction.1", "direction.2"]
    for name, row in (("direction.1", v[0]), ("direction.2", v[1])):
        shape, ttype, data = ts[name]
        assert shape == (D,) and ttype == gguf.GGMLQuantizationType.F32 and data.dtype == np.float32
        assert np.array_equal(data, (row.double() * -1.5).float().numpy())
    assert info["index"] == {2: 1, 3: 2} and info["layer_count"] == 4
    assert '"site": "resid_pre"' in kv["refusal_toolkit.provenance"]


def test_gguf_resid_post_keeps_the_index_and_layer_count_defaults_to_max_plus_one(tmp_path):
    d = Direction(vec(4), layer=5, site="resid_post", model_id="org/m")
    out = tmp_path / "cv.gguf"
    write_control_vectors(control_vectors(d), "gguf-control-vector", out)
    kv, ts = fields(out)
    assert list(ts) == ["direction.5"] and kv["controlvector.layer_count"] == 6  # n_layers unknown: 5 + 1
    assert kv["controlvector.model_hint"] == "org/m"  # no model_type recorded: the model id
    assert np.array_equal(ts["direction.5"][2], vec(4).numpy())


def test_unit_then_scale(tmp_path):
    d = Direction(vec(5) * 7, layer=2, site="resid_pre", model_id="m")
    cv = control_vectors(d, LayerSpec.parse("2,3"), scale=3.0, unit=True)
    assert cv.layers == (2, 3)
    for row in cv.vectors:
        assert float(row.double().norm()) == pytest.approx(3.0, rel=1e-6)
        assert torch.allclose(row, vec(5) / vec(5).norm() * 3, atol=1e-6)
    out = tmp_path / "u.gguf"
    write_control_vectors(cv, "gguf-control-vector", out)
    _, ts = fields(out)
    assert list(ts) == ["direction.1", "direction.2"]
    assert np.array_equal(ts["direction.1"][2], cv.vectors[0].numpy())


@pytest.mark.parametrize("layer, site, fmt", [(1, "resid_pre", "gguf-control-vector"),
                                              (0, "resid_post", "gguf-control-vector"),
                                              (0, "resid_pre", "gguf-control-vector"),
                                              (0, "resid_pre", "repeng")])
def test_layers_below_the_first_slot_are_refused(tmp_path, layer, site, fmt):
    d = Direction(vec(), layer=layer, site=site, model_id="m")
    out = tmp_path / "x.gguf"
    with pytest.raises(ToolkitError) as e:
        write_control_vectors(control_vectors(d), fmt, out)
    assert e.value.param == "layers" and f"{site} of layer {layer}" in e.value.message
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no temporary left behind either


def test_other_sites_are_refused_by_gguf_formats_but_not_by_safetensors(tmp_path):
    d = Direction(vec(), layer=2, site="attn_out", model_id="m")
    for fmt in ("gguf-control-vector", "repeng"):
        with pytest.raises(ToolkitError) as e:
            write_control_vectors(control_vectors(d), fmt, tmp_path / "x.gguf")
        assert e.value.param is None and "attn_out" in e.value.message
    write_control_vectors(control_vectors(d), "safetensors", tmp_path / "x.safetensors")
    assert DirectionSet.load(tmp_path / "x.safetensors").site == "attn_out"


def test_layer_checks():
    d = Direction(vec(), layer=2, site="resid_pre")
    with pytest.raises(ToolkitError, match="out of range") as e:
        control_vectors(d, LayerSpec.parse("4"), n_layers=4)
    assert e.value.param == "layers"
    with pytest.raises(ToolkitError, match="depth is not known"):
        control_vectors(d, LayerSpec.parse("-1"))
    assert control_vectors(d, LayerSpec.parse("-1"), n_layers=4).layers == (3,)
    with pytest.raises(ToolkitError, match="records no layer"):
        control_vectors(Direction(vec()))
    s = DirectionSet(torch.stack([vec(1), vec(2)]), (1, 2), site="resid_pre")
    with pytest.raises(ToolkitError, match="no direction at layer 3"):
        control_vectors(s, LayerSpec.parse("3"))
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ToolkitError) as e:
            control_vectors(d, scale=bad)
        assert e.value.param == "scale"
    with pytest.raises(ToolkitError) as e:
        control_vectors(Direction(torch.zeros(D), layer=2), unit=True)
    assert e.value.param == "unit"


def test_out_is_never_overwritten_silently(tmp_path):
    cv = control_vectors(Direction(vec(), layer=2, site="resid_pre", model_id="m"))
    out = tmp_path / "cv.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(ToolkitError, match="already exists") as e:
        write_control_vectors(cv, "gguf-control-vector", out)
    assert e.value.param == "out" and out.read_bytes() == b"keep me"
    write_control_vectors(cv, "gguf-control-vector", out, force=True)
    assert list(fields(out)[1]) == ["direction.1"]
    with pytest.raises(ToolkitError, match="does not exist"):
        write_control_vectors(cv, "gguf-control-vector", tmp_path / "nope" / "cv.gguf")
    with pytest.raises(ToolkitError, match="is a folder"):
        write_control_vectors(cv, "gguf-control-vector", tmp_path)
    with pytest.raises(ToolkitError) as e:
        write_control_vectors(cv, "onnx", tmp_path / "x")
    assert e.value.param == "format"


def test_a_gguf_format_needs_a_model_hint(tmp_path):
    cv = control_vectors(Direction(vec(), layer=2, site="resid_pre"))
    with pytest.raises(ToolkitError) as e:
        write_control_vectors(cv, "gguf-control-vector", tmp_path / "x.gguf")
    assert e.value.param == "model_hint" and not (tmp_path / "x.gguf").exists()
    write_control_vectors(cv, "gguf-control-vector", tmp_path / "x.gguf", model_hint="llama")
    assert fields(tmp_path / "x.gguf")[0]["controlvector.model_hint"] == "llama"


# ------------------------------------------------------------------------------------------------ repeng
def test_repeng_layout_allows_block_zero_and_counts_its_tensors(tmp_path):
    s = DirectionSet(torch.stack([vec(1), vec(2)]), (1, 3), site="resid_pre", model_id="m")
    out = tmp_path / "r.gguf"
    info = write_control_vectors(control_vectors(s, n_layers=4, model_type="qwen2"), "repeng", out)
    kv, ts = fields(out)
    assert list(ts) == ["direction.0", "direction.2"] and info["index"] == {1: 0, 3: 2}
    assert kv["controlvector.layer_count"] == 2  # len(directions), as repeng's export_gguf writes
    assert kv["controlvector.model_hint"] == "qwen2"


def test_repeng_imports_the_file_and_steers_like_our_activation_addition(tmp_path):
    try:
        import repeng
    except Exception as e:  # absent (not a dependency), or a release that does not import here (np.float_ on NumPy 2)
        pytest.skip(f"repeng not importable: {type(e).__name__}: {e}")
    lm = make_lm("qwen2")
    d = Direction(vec(7) * 4, layer=2, site="resid_pre", model_id="tiny")
    out = tmp_path / "r.gguf"
    write_control_vectors(control_vectors(d, LayerSpec.parse("1,2"), n_layers=lm.n_layers, model_type="qwen2"),
                          "repeng", out)
    cv = repeng.ControlVector.import_gguf(str(out))
    assert cv.model_type == "qwen2" and sorted(cv.directions) == [0, 1]
    assert np.array_equal(np.asarray(cv.directions[1]), (vec(7) * 4).numpy())
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad(), activation_addition(lm.model, d.vector, [1, 2], site="resid_pre"):
        ours = lm.model(ids).logits
    with torch.no_grad():
        base = lm.model(ids).logits
        cm = repeng.ControlModel(lm.model, [0, 1])
        cm.set_control(cv, 1.0)
        theirs = cm(ids).logits
        cm.unwrap()
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize("site, layer", [("resid_pre", 2), ("resid_post", 1)])
def test_llama_cpp_semantics_reproduce_our_steering(tmp_path, site, layer):
    """llama.cpp adds ``direction.N`` to the output of block N (``cur = build_cvec(cur, il)`` after the FFN
    residual); doing exactly that with the file's tensors equals our activation addition at the exported site."""
    lm = make_lm("qwen2")
    d = Direction(vec(9) * 5, layer=layer, site=site, model_id="tiny")
    out = tmp_path / "cv.gguf"
    write_control_vectors(control_vectors(d, scale=2.0, n_layers=lm.n_layers), "gguf-control-vector", out)
    _, ts = fields(out)
    (name, (_, _, data)), = ts.items()
    n = int(name.split(".")[1])
    assert n == 1

    def add_output(module, args, output):
        t = torch.from_numpy(data.copy())
        return (output[0] + t,) + tuple(output[1:]) if isinstance(output, tuple) else output + t

    ids = torch.tensor([[2, 4, 6, 8, 10, 12]])
    with torch.no_grad():
        with activation_addition(lm.model, d.vector, [layer], alpha=2.0, site=site):
            ours = lm.model(ids).logits
        h = decoder_layers(lm.model)[n].register_forward_hook(add_output)
        try:
            theirs = lm.model(ids).logits
        finally:
            h.remove()
        base = lm.model(ids).logits
    assert not torch.allclose(ours, base, atol=1e-3)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ safetensors
def test_safetensors_round_trip(tmp_path):
    s = DirectionSet(torch.stack([vec(1), vec(2)]), (0, 3), site="resid_pre", position=-1, model_id="org/m",
                     model_hash="h" * 64, method="difference-in-means (Arditi et al. 2024)", source="geometry/g")
    out = tmp_path / "v.safetensors"
    info = write_control_vectors(control_vectors(s, scale=0.5), "safetensors", out)
    back = DirectionSet.load(out)
    assert back.layers == (0, 3) and back.site == "resid_pre" and back.position == -1
    assert torch.equal(back.vectors, (s.vectors.double() * 0.5).float())
    assert back.model_id == "org/m" and back.model_hash == "h" * 64 and back.method.startswith("difference")
    assert back.extra["scale"] == 0.5 and back.extra["unit"] is False and back.extra["exported_from"] == "geometry/g"
    assert "resid_pre of L" in back.extra["layer_convention"] and "model_hint" not in back.extra
    assert info["index"] == {0: 0, 3: 3}


# ------------------------------------------------------------------------------------------------ sources
def test_resolve_source_reads_direction_and_per_layer_files(tmp_path):
    Direction(vec(), layer=2, site="resid_pre").save(tmp_path / "d.safetensors")
    DirectionSet(torch.stack([vec(1), vec(2)]), (1, 2), site="resid_post").save(tmp_path / "s.safetensors")
    d, model = resolve_source(str(tmp_path / "d.safetensors"))
    assert isinstance(d, Direction) and d.layer == 2 and model == {}
    s, _ = resolve_source(str(tmp_path / "s.safetensors"))
    assert isinstance(s, DirectionSet) and s.layers == (1, 2) and s.site == "resid_post"
    with pytest.raises(ToolkitError) as e:
        resolve_source(str(tmp_path / "d.safetensors"), per_layer=True)
    assert e.value.param == "per_layer"
    with pytest.raises(ToolkitError, match="no run"):
        resolve_source(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "runs"))
    Direction(vec(3), layer=2, site="resid_pre", model_id="org/tiny").save(tmp_path / "d.safetensors")
    Direction(vec(3), layer=2, site="mlp_out", model_id="org/tiny").save(tmp_path / "mlp.safetensors")
    DirectionSet(torch.stack([vec(1), vec(2), vec(3)]), (1, 2, 3), site="resid_pre",
                 model_id="org/tiny").save(tmp_path / "set.safetensors")
    return tmp_path


def test_cli_writes_each_format(files):
    out = assert_ok(invoke(["export", "d.safetensors", "--out", "a.gguf", "--scale", "-2"]))
    assert "resid_pre L2 -> direction.1" in out and "--control-vector-layer-range 1 1" in out
    _, ts = fields(files / "a.gguf")
    assert list(ts) == ["direction.1"] and np.array_equal(ts["direction.1"][2], (vec(3).double() * -2).float().numpy())
    assert_ok(invoke(["export", "set.safetensors", "-f", "repeng", "-o", "r.gguf", "--layers", "1:3"]))
    assert list(fields(files / "r.gguf")[1]) == ["direction.0", "direction.1"]
    assert_ok(invoke(["export", "set.safetensors", "-f", "safetensors", "-o", "s.safetensors", "--unit"]))
    back = DirectionSet.load(files / "s.safetensors")
    assert back.layers == (1, 2, 3) and torch.allclose(back.vectors.norm(dim=-1), torch.ones(3))
    assert_ok(invoke(["export", "d.safetensors", "-o", "m.gguf", "--model-hint", "qwen2", "--layers", "-1",
                      "--n-layers", "4"]))
    kv, ts = fields(files / "m.gguf")
    assert kv["controlvector.model_hint"] == "qwen2" and kv["controlvector.layer_count"] == 4
    assert list(ts) == ["direction.2"]  # resid_pre of layer -1 = 3 -> output of block 2


def test_cli_bad_input(files):
    (files / "taken.gguf").write_bytes(b"keep")
    mtime = os.stat(files / "taken.gguf").st_mtime_ns
    before = sorted(p.name for p in files.iterdir())
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "taken.gguf"]), "--out", "already exists", "--force")
    assert (files / "taken.gguf").read_bytes() == b"keep" and os.stat(files / "taken.gguf").st_mtime_ns == mtime
    assert_usage_error(invoke(["export", "missing.safetensors", "-o", "x.gguf"]), "missing.safetensors")
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "x.gguf", "-f", "onnx"]), "--format", "onnx")
    assert_usage_error(invoke(["export", "mlp.safetensors", "-o", "x.gguf"]), "mlp_out")
    assert_usage_error(invoke(["export", "set.safetensors", "-o", "x.gguf"]), "--layers", "resid_pre of layer 1")
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "x.gguf", "--scale", "0"]), "--scale")
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "x.gguf", "--layers", "-1"]), "--n-layers")
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "x.gguf", "--per-layer"]), "--per-layer")
    assert_usage_error(invoke(["export", "d.safetensors", "-o", "nodir/x.gguf"]), "--out", "nodir")
    assert_usage_error(invoke(["export", "d.safetensors"]))
    assert sorted(p.name for p in files.iterdir()) == before
    assert_ok(invoke(["export", "d.safetensors", "-o", "taken.gguf", "--force"]))
    assert list(fields(files / "taken.gguf")[1]) == ["direction.1"]



@pytest.fixture
def extract_run(files):
    """A finished extract run made with the run store: candidates grid (layers 0-3 x positions -2, -1), the chosen
    direction (layer 2, position -1) and the model record (4 layers, qwen2)."""
    from toolkit.runs import Run

    grid = torch.stack([torch.stack([vec(10 * layer + p) for p in (2, 1)]) for layer in range(4)])  # [4, 2, D]
    s = DirectionSet(grid, (0, 1, 2, 3), (-2, -1), site="resid_pre", position=-1, model_id="org/tiny",
                     model_hash="hash-tiny", method="difference-in-means (Arditi et al. 2024)")
    with Run("extract", "ex") as run:
        s.save(run.path("candidates.safetensors"))
        s.direction(2, -1).save(run.path("direction.safetensors"))
        folder = run.finish(model={"id": "org/tiny", "hash": "hash-tiny", "model_type": "qwen2", "n_layers": 4,
                                   "d_model": D}, prompt_sets=[], seed=0, params={},
                            results={"chosen": {"layer": 2, "pos": -1}})
    return folder


def test_cli_extract_run_uses_the_run_model_record(extract_run, files):
    out = assert_ok(invoke(["export", str(extract_run), "-o", "c.gguf"]))
    assert "resid_pre L2 -> direction.1" in out
    kv, ts = fields(files / "c.gguf")
    assert kv["controlvector.model_hint"] == "qwen2" and kv["controlvector.layer_count"] == 4
    assert list(ts) == ["direction.1"] and np.array_equal(ts["direction.1"][2], vec(21).numpy())
    # by name, per layer: the candidates at the chosen position -1; resid_pre 0 and 1 cannot go to llama.cpp
    assert_usage_error(invoke(["export", "ex", "--per-layer", "-o", "p.gguf"]), "resid_pre of layer 0")
    assert_ok(invoke(["export", "ex", "--per-layer", "-o", "p.gguf", "--layers", "2:4"]))
    _, ts = fields(files / "p.gguf")
    assert list(ts) == ["direction.1", "direction.2"]
    assert np.array_equal(ts["direction.2"][2], vec(31).numpy())
    assert_ok(invoke(["export", "ex", "--per-layer", "-f", "repeng", "-o", "r.gguf", "--layers", "1:4"]))
    assert list(fields(files / "r.gguf")[1]) == ["direction.0", "direction.1", "direction.2"]
    assert_usage_error(invoke(["export", "ex", "-o", "q.gguf", "--layers", "4"]), "--layers", "out of range")
