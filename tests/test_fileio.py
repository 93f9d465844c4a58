"""``toolkit.fileio``: atomic writes that follow the umask and leave nothing behind when they fail."""

from __future__ import annotations

import os

import pytest

from toolkit.fileio import atomic_dir, atomic_file, atomic_write_bytes, atomic_write_text, umask


@pytest.fixture
def mask027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def test_umask_reads_without_changing(mask027):
    assert umask() == 0o027 and umask() == 0o027


def test_atomic_writes_follow_the_umask(tmp_path, mask027):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "a.txt").read_text() == "hello" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    for name in ("a.txt", "b.bin"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640  # mkstemp alone: 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_atomic_file_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(p, "w") as f:
        f.write("half")
        raise RuntimeError("interrupted")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["x.json"]
    atomic_write_text(p, "new")
    assert p.read_text() == "new"


def test_atomic_dir_replaces_and_follows_the_umask(tmp_path, mask027):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "stale").write_text("")
    with atomic_dir(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-")
        (tmp / "config.json").write_text("{}")
    assert [q.name for q in dest.iterdir()] == ["config.json"]
    assert dest.stat().st_mode & 0o777 == 0o750  # mkdtemp alone: 0o700
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "partial").write_text("")
        raise RuntimeError("interrupted")
    assert [q.name for q in dest.iterdir()] == ["config.json"] and [q.name for q in tmp_path.iterdir()] == ["ckpt"]
