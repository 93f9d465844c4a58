"""Input handling without the CLI: prompt sets, default-model assembly and model loading errors, the run store."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import uuid
from pathlib import Path

import pytest
import torch

from toolkit import cache as cache_mod
from toolkit import default_model, models
from toolkit.errors import ToolkitError
from toolkit.prompts import SPLITS, load_prompt_set
from toolkit.runs import Run, load_run


# ------------------------------------------------------------------------------------------------ prompts
@pytest.fixture(scope="module")
def builtin():
    return {name: load_prompt_set(name) for name in ("harmful", "harmless", "borderline")}


@pytest.mark.parametrize("name,minimum", [("harmful", 300), ("harmless", 300), ("borderline", 150)])
def test_builtin_set_shape(builtin, name, minimum):
    ps = builtin[name]
    assert ps.name == name
    assert len(ps) >= minimum
    assert len(set(ps.ids)) == len(ps)
    assert all(r["split"] in SPLITS for r in ps.records)
    for split in SPLITS:
        assert len(ps.select(split)) > 0
    assert all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in ps.records)
    assert ps.sha256 == hashlib.sha256(Path(ps.source).read_bytes()).hexdigest()


def test_builtin_harmful_categories(builtin):
    assert len({r["category"] for r in builtin["harmful"].records}) >= 8


def test_builtin_sets_disjoint(builtin):
    texts = {name: {p.strip().lower() for p in ps.prompts} for name, ps in builtin.items()}
    names = list(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not texts[a] & texts[b], (a, b, sorted(texts[a] & texts[b])[:3])


def test_load_jsonl(tmp_path):
    p = tmp_path / "mine.jsonl"
    p.write_text('{"id": "x1", "prompt": " hello world ", "category": "greet", "split": "train"}\n'
                 "\n"
                 '{"prompt": "bake bread", "split": "val"}\n'
                 '"tell me a story"\n')
    ps = load_prompt_set(str(p))
    assert ps.name == "mine"
    assert ps.prompts == ["hello world", "bake bread", "tell me a story"]
    assert ps.ids == ["x1", "mine-0002", "mine-0003"]
    assert [r["split"] for r in ps.records] == ["train", "val", None]
    assert [r["category"] for r in ps.records] == ["greet", "none", "none"]
    assert ps.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert ps.describe()["n"] == 3 and ps.describe()["source"] == str(p)


def test_load_json_list_of_strings(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps(["hello world", "bake bread", "good cat"]))
    ps = load_prompt_set(str(p))
    assert ps.prompts == ["hello world", "bake bread", "good cat"]
    assert len(set(ps.ids)) == 3
    assert all(r["split"] is None for r in ps.records)


def test_load_csv_with_column(tmp_path):
    p = tmp_path / "table.csv"
    p.write_text("id,text,category\n1,hello world,a\n2,\"bake bread, please\",b\n")
    ps = load_prompt_set(str(p), column="text")
    assert ps.prompts == ["hello world", "bake bread, please"]
    assert ps.ids == ["1", "2"]
    assert [r["category"] for r in ps.records] == ["a", "b"]


def test_load_txt(tmp_path):
    p = tmp_path / "lines.txt"
    p.write_text("hello world\n\n  bake bread  \ngood cat\n")
    ps = load_prompt_set(str(p))
    assert ps.prompts == ["hello world", "bake bread", "good cat"]
    assert len(set(ps.ids)) == 3


@pytest.mark.parametrize("fname,content,column,needles", [
    ("missing.jsonl", None, None, ["no such prompt file"]),
    ("empty.jsonl", "", None, ["no prompts"]),
    ("blank.txt", "\n  \n", None, ["no prompts"]),
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', None, ["line 3", "malformed"]),
    ("bad.json", '[\n"a",\n"b"\n', None, ["line", "malformed"]),
    ("cols.csv", "id,text\n1,hello\n", "prompt_text", ["prompt_text"]),
    ("dup.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', None, ["duplicate", "'a'"]),
    ("split.jsonl", '{"prompt": "x", "split": "dev"}\n', None, ["line 1", "dev"]),
    ("prompts.xml", "<p>hello</p>", None, ["unsupported", ".xml"]),
])
def test_load_errors(tmp_path, fname, content, column, needles):
    p = tmp_path / fname
    if content is not None:
        p.write_text(content)
    with pytest.raises(ToolkitError) as ei:
        load_prompt_set(str(p), column)
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_select(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(json.dumps({"id": str(i), "prompt": f"p {i}", "split": s})
                           for i, s in enumerate(["train", "val", "val", "test"])) + "\n")
    ps = load_prompt_set(str(p))
    val = ps.select("val")
    assert val.ids == ["1", "2"] and val.split == "val"
    assert all(r["split"] == "val" for r in val.records)
    assert val.sha256 == ps.sha256
    assert ps.select("all") is ps and ps.select(None) is ps
    with pytest.raises(ToolkitError, match="bogus"):
        ps.select("bogus")
    with pytest.raises(ToolkitError, match="no prompts in split 'test'"):
        ps.subset([0, 1]).select("test")  # the file has splits, just not this one


@pytest.mark.parametrize("split", SPLITS)
def test_select_of_a_file_without_splits_keeps_every_prompt_and_says_so(tmp_path, split):
    p = tmp_path / "mine.txt"
    p.write_text("first prompt\nsecond prompt\nthird prompt\n")
    ps = load_prompt_set(str(p))
    assert not ps.has_splits
    got = ps.select(split)
    assert got.prompts == ["first prompt", "second prompt", "third prompt"]
    assert got.split is None and got.split_ignored == split
    d = got.head(2).describe()  # the record survives head/subset
    assert d["split"] is None and d["split_ignored"] == split and d["n"] == 2
    assert d["split_note"] == f"the file has no splits: all 2 prompts were used for split {split!r}"
    assert "split_ignored" not in ps.describe() and "split_ignored" not in ps.select("all").describe()
    with pytest.raises(ToolkitError, match="bogus"):
        ps.select("bogus")


# ------------------------------------------------------------------------------------------------ models
def test_default_parts_missing_package(monkeypatch, cache):
    monkeypatch.setattr(default_model, "DEFAULT_PARTS", [("no-such-dist-rt1", "no_such_module_rt1", "part01.bin"),
                                                  ("no-such-dist-rt2", "no_such_module_rt2", "part02.bin")])
    with pytest.raises(ToolkitError, match="no-such-dist-rt1"):
        default_model.default_model_parts()
    with pytest.raises(ToolkitError, match="no-such-dist-rt1"):
        default_model.assemble_default_gguf(cache / "x.gguf")
    assert not (cache / "x.gguf").exists()


@pytest.fixture
def fake_parts(tmp_path, monkeypatch, cache):
    """Two installed fake part packages; DEFAULT_* patched to them. Returns the expected concatenation."""
    site = tmp_path / "site"
    tag = uuid.uuid4().hex[:8]
    chunks = [os.urandom(3000) + b"part-one", os.urandom(5000) + b"part-two"]
    parts = []
    for i, data in enumerate(chunks, 1):
        mod = f"rt_fake_part{i}_{tag}"
        (site / mod / "data").mkdir(parents=True)
        (site / mod / "__init__.py").write_text("")
        (site / mod / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append((f"rt-fake-part{i}", mod, f"part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    whole = b"".join(chunks)
    monkeypatch.setattr(default_model, "DEFAULT_PARTS", parts)
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SIZE", len(whole))
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


def test_default_parts_found(fake_parts):
    paths = default_model.default_model_parts()
    assert [p.name for p in paths] == ["part01.bin", "part02.bin"]
    assert b"".join(p.read_bytes() for p in paths) == fake_parts


def test_default_parts_data_file_missing(fake_parts, monkeypatch):
    (dist, mod, _), second = default_model.DEFAULT_PARTS
    monkeypatch.setattr(default_model, "DEFAULT_PARTS", [(dist, mod, "part09.bin"), second])
    with pytest.raises(ToolkitError, match=dist):
        default_model.default_model_parts()


def test_assemble_default_gguf(fake_parts, tmp_path):
    dest = tmp_path / "out" / "model.gguf"
    got = default_model.assemble_default_gguf(dest)
    assert got == dest
    assert dest.read_bytes() == fake_parts
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]
    # a second call finds the verified file and keeps it
    assert default_model.assemble_default_gguf(dest) == dest
    assert dest.read_bytes() == fake_parts


def test_assemble_default_gguf_default_dest(fake_parts, cache):
    got = default_model.assemble_default_gguf()
    assert got == cache / "gguf" / f"{default_model.DEFAULT_MODEL_NAME}.gguf"
    assert got.read_bytes() == fake_parts


def test_assemble_hash_mismatch(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SHA256", "0" * 64)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ToolkitError, match="SHA-256") as ei:
        default_model.assemble_default_gguf(dest)
    assert hashlib.sha256(fake_parts).hexdigest() in str(ei.value)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temp files left


def test_assemble_size_mismatch(fake_parts, tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_SIZE", len(fake_parts) + 1)
    dest = tmp_path / "out" / "model.gguf"
    with pytest.raises(ToolkitError, match=str(len(fake_parts))):
        default_model.assemble_default_gguf(dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_file_sha256(tmp_path, cache):
    p = tmp_path / "blob.bin"
    data = os.urandom(10000)
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert cache_mod.file_sha256(p, use_cache=False) == want
    assert cache_mod.file_sha256(p) == want
    assert cache_mod.file_sha256(p) == want  # memoised
    assert (cache / "hashes.json").is_file()
    with pytest.raises(ToolkitError):
        cache_mod.file_sha256(tmp_path / "nope.bin")


@pytest.mark.parametrize("spec", ["/nonexistent/model.gguf", "./no/such/folder"])
def test_load_model_missing(spec, cache):
    with pytest.raises(ToolkitError, match="no such"):
        models.load_model(spec, dtype="float32", device="cpu")


def test_load_model_folder_without_config(tmp_path, cache):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not really")
    with pytest.raises(ToolkitError, match="config.json"):
        models.load_model(str(folder), dtype="float32", device="cpu")


def test_resolve_dtype(monkeypatch):
    monkeypatch.delenv(models.AUTO_DTYPE_ENV, raising=False)
    assert models.resolve_dtype("float32") is torch.float32
    assert models.resolve_dtype("bf16") is torch.bfloat16
    assert models.resolve_dtype("fp16") is torch.float16
    assert models.resolve_dtype("auto", torch.device("cpu")) is (
        torch.bfloat16 if models.cpu_supports_bf16() else torch.float32)
    with pytest.raises(ToolkitError, match="bogus"):
        models.resolve_dtype("bogus")


CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma {extra}\n\nprocessor\t: 1\n"


@pytest.mark.parametrize("extra,native", [("", False), ("avx512f avx512bw", False), ("avx512f avx512_bf16", True),
                                          ("amx_tile amx_bf16", True), ("avx512_bf16_not", False)])
def test_cpu_bf16_flags(extra, native):
    assert models.cpu_supports_bf16(CPUINFO.format(extra=extra)) is native


def test_cpu_bf16_flags_arm():
    assert models.cpu_supports_bf16("Features\t: fp asimd evtstrm aes sve bf16 i8mm\n") is True
    assert models.cpu_supports_bf16("Features\t: fp asimd evtstrm aes\n") is False
    assert models.cpu_supports_bf16("") is False


def test_auto_dtype_on_both_kinds_of_cpu(monkeypatch):
    monkeypatch.delenv(models.AUTO_DTYPE_ENV, raising=False)
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu, cpu_bf16=True) is torch.bfloat16
    assert models.resolve_dtype("auto", cpu, cpu_bf16=False) is torch.float32
    assert models.resolve_dtype("auto", torch.device("meta")) is torch.float32  # neither CPU nor CUDA: float32
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda cpuinfo=None: True)
    assert models.resolve_dtype("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda cpuinfo=None: False)
    assert models.resolve_dtype("auto", cpu) is torch.float32


def test_auto_dtype_forced_by_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(models.AUTO_DTYPE_ENV, "bfloat16")
    assert models.resolve_dtype("auto", cpu, cpu_bf16=False) is torch.bfloat16
    assert models.resolve_dtype("float32", cpu) is torch.float32  # an explicit dtype is never overridden
    monkeypatch.setenv(models.AUTO_DTYPE_ENV, "float32")
    assert models.resolve_dtype("auto", cpu, cpu_bf16=True) is torch.float32
    monkeypatch.setenv(models.AUTO_DTYPE_ENV, "int8")
    with pytest.raises(ToolkitError, match="REFUSAL_TOOLKIT_AUTO_DTYPE value 'int8'"):
        models.resolve_dtype("auto", cpu)
    assert models.resolve_dtype("bf16", cpu) is torch.bfloat16


def test_repair_cache_config_removes_only_a_gguf_quantization_config(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 32, "dtype": "float32",
           "quantization_config": {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert models.repair_cache_config(tmp_path) is True
    fixed = json.loads((tmp_path / "config.json").read_text())
    assert fixed == {k: v for k, v in cfg.items() if k != "quantization_config"}
    assert models.repair_cache_config(tmp_path) is False  # already clean
    other = dict(cfg, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    (tmp_path / "config.json").write_text(json.dumps(other))
    assert models.repair_cache_config(tmp_path) is False
    assert json.loads((tmp_path / "config.json").read_text()) == other
    assert models.repair_cache_config(tmp_path / "missing") is False


# ------------------------------------------------------------------------------------------------ runs
RUN_KEYS = ("schema_version", "command", "name", "argv", "created", "model", "prompt_sets", "seed", "versions",
            "git_commit", "timings", "params", "results")


def finish(run: Run, **over):
    kw = dict(model={"id": "m", "hash": "h"}, prompt_sets=[{"name": "p", "sha256": "s"}], seed=3,
              params={"a": 1}, results={"r": 2})
    kw.update(over)
    return run.finish(**kw)


def test_run_publishes_atomically(tmp_path):
    root = tmp_path / "runs"
    with Run("score", "r1", root=root) as run:
        final = root / "score" / "r1"
        assert run.final == final
        assert run.dir.parent == final.parent and run.dir.name.startswith(".")
        run.write_csv("table.csv", __import__("pandas").DataFrame({"x": [1, 2]}))
        run.write_json("extra.json", {"k": 1})
        run.time("step", 1.23456)
        assert not final.exists()
        assert sorted(os.listdir(root / "score")) == [run.dir.name]
        got = finish(run)
        assert got == final
    assert sorted(os.listdir(root / "score")) == ["r1"]
    assert sorted(os.listdir(final)) == ["extra.json", "run.json", "table.csv"]
    meta = json.loads((final / "run.json").read_text())
    for k in RUN_KEYS:
        assert k in meta, k
    assert meta["command"] == "score" and meta["name"] == "r1" and meta["seed"] == 3
    assert meta["timings"]["step"] == 1.235 and "total" in meta["timings"]
    assert meta["results"] == {"r": 2}
    folder, loaded = load_run(final, "score")
    assert folder == final and loaded == meta
    assert load_run(final / "run.json")[0] == final


def test_run_exception_leaves_nothing(tmp_path):
    root = tmp_path / "runs"
    with pytest.raises(RuntimeError, match="boom"):
        with Run("extract", "r2", root=root) as run:
            run.write_json("partial.json", {})
            raise RuntimeError("boom")
    assert not root.exists()  # the runs folders it created are removed too


def test_run_unfinished_leaves_nothing(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    with Run("extract", "r3", root=root) as run:
        run.write_json("partial.json", {})
    assert os.listdir(root) == []  # a runs folder that existed stays; the command folder it made goes


def test_run_exists_needs_force(tmp_path):
    root = tmp_path / "runs"
    with Run("score", "same", root=root) as run:
        finish(run, results={"v": 1})
    with pytest.raises(ToolkitError, match="already exists"):
        Run("score", "same", root=root)
    assert sorted(os.listdir(root / "score")) == ["same"]
    with Run("score", "same", force=True, root=root) as run:
        finish(run, results={"v": 2})
    assert sorted(os.listdir(root / "score")) == ["same"]
    assert json.loads((root / "score" / "same" / "run.json").read_text())["results"] == {"v": 2}


@pytest.mark.parametrize("name", ["a/b", ".hidden", ".."])
def test_run_bad_name(tmp_path, name):
    with pytest.raises(ToolkitError, match="bad run name"):
        Run("score", name, root=tmp_path / "runs")


def test_run_uses_env_root(tmp_path, monkeypatch):
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "envruns"))
    with Run("score", "e1") as run:
        final = finish(run)
    assert final == tmp_path / "envruns" / "score" / "e1"
    assert load_run("e1", "score")[0] == final  # a bare name is looked up under $REFUSAL_RUNS/<command>/


def test_load_run_of_other_command(tmp_path):
    root = tmp_path / "runs"
    with Run("score", "s", root=root) as run:
        final = finish(run)
    with pytest.raises(ToolkitError, match="'score' run"):
        load_run(final, "extract")
    with pytest.raises(ToolkitError, match="no run"):
        load_run(tmp_path / "nowhere", "extract")
