"""Atomic file and folder writes that follow the user's umask.

A file or folder is written under a hidden temporary name beside its final place (same file system) and renamed
into place (``os.replace``) only when complete, so a reader never sees a partial one and an interrupted write
leaves at most a hidden temporary that is removed on the way out. ``tempfile.mkstemp``/``mkdtemp`` create
their temporaries 0600/0700 for privacy; the temporaries here are given the modes a plain ``open``/``mkdir``
would give them (0666/0777 less the umask), so cache files and checkpoints stay readable by whoever the user's
umask allows. The run store (:mod:`toolkit.runs`) has its own, exclusive, publication of run folders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def umask() -> int:
    """The process's file-mode creation mask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "w", *, prefix: str | None = None, suffix: str = "") -> Iterator[IO]:
    """Open a hidden temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    Args:
        path: the final file (its folder must exist).
        mode: "w" (text) or "wb" (binary).
        prefix, suffix: of the temporary's name (default prefix ``.NAME.``).

    Yields:
        The open file. An exception inside the block removes the temporary, leaves ``path`` untouched and
        propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix if prefix is not None else f".{path.name}.",
                               suffix=suffix)
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide the file from colleagues; follow the umask
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (:func:`atomic_file`), mode 0666 less the umask."""
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`), mode 0666 less the umask."""
    with atomic_file(path, "wb") as f:
        f.write(data)


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """A hidden temporary sibling folder of ``dest`` (``.NAME.tmp-XXXX``, mode 0777 less the umask) to fill; on a
    clean exit it replaces ``dest`` (an existing ``dest`` is removed first: callers decide whether that is
    allowed).

    Yields:
        The temporary folder. An exception inside the block removes it, leaves ``dest`` untouched and propagates.
    """
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the folder from colleagues; follow the umask
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
