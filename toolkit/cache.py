"""The toolkit's cache folder and content hashes of files (memoised), used to identify models by content."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from .errors import ToolkitError
from .fileio import atomic_write_text


def cache_root() -> Path:
    """Folder for the toolkit's caches (assembled GGUF, dequantized checkpoints, file hashes).

    ``$REFUSAL_TOOLKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/refusal-toolkit`` or ``~/.cache/refusal-toolkit``.
    """
    env = os.environ.get("REFUSAL_TOOLKIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "refusal-toolkit"


def file_sha256(path: Path, *, use_cache: bool = True) -> str:
    """SHA-256 hex digest of a file, memoised in the cache by (resolved path, size, mtime).

    Raises:
        ToolkitError: the file does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"no such file: {path}")
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_root() / "hashes.json"
    memo: dict[str, str] = {}
    if use_cache and memo_path.is_file():
        with contextlib.suppress(Exception):
            memo = json.loads(memo_path.read_text())
        if key in memo:
            return memo[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        memo = {k: v for k, v in memo.items() if Path(k.rsplit("|", 2)[0]).exists()}  # forget vanished files
        memo[key] = digest
        with contextlib.suppress(OSError):
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo_path, json.dumps(memo, indent=0))
    return digest
