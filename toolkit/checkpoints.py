"""Checkpoint export: weight-orthogonalized Hugging Face checkpoints that keep the source's stored dtype.

A model runs in its compute dtype (``--dtype``, e.g. bfloat16 on a CPU with native bfloat16), but a checkpoint the
toolkit writes is computed from the *source checkpoint's* weights, not from the compute-dtype copy in memory: a
float32 checkpoint stays float32 even when the session ran in bfloat16, and a bfloat16 checkpoint is not widened.
The weights are read again from the source folder in the wider of the stored and the requested dtype (which holds
the stored values exactly), edited in float64 (:func:`toolkit.interventions.orthogonalize_weights`), cast once to the
dtype written, and saved atomically (a temporary sibling folder renamed into place).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

from .errors import ToolkitError
from .interventions import orthogonalize_weights
from .models import DTYPES, strip_gguf_quantization, write_checkpoint

_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating dtype a checkpoint folder stores its weights in.

    Read from the safetensors headers (the floating dtype holding most elements; integer buffers are ignored), else
    from ``config.json`` (``dtype`` or ``torch_dtype``) for ``.bin`` checkpoints.

    Returns:
        ``torch.float32``, ``torch.bfloat16``, ``torch.float16`` or ``torch.float64``; None if neither says.
    """
    from safetensors import safe_open

    folder = Path(folder)
    counts: Counter = Counter()
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                dt = _FLOAT_DTYPES.get(sl.get_dtype())
                if dt is not None:
                    counts[dt] += math.prod(sl.get_shape())
    if counts:
        return counts.most_common(1)[0][0]
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return {**DTYPES, "float64": torch.float64}.get(str(name))


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def check_save_path(dest: Path, *, overwrite: bool = False, what: str = "the checkpoint") -> None:
    """Refuse a folder to write a checkpoint to, before any work: ``dest`` must be absent, an empty folder, or (with
    ``overwrite``) a Hugging Face checkpoint folder (``config.json``), and its nearest existing ancestor a writable
    folder. Any other existing folder or file is never replaced, whatever ``overwrite`` says.

    Raises:
        ToolkitError: ``dest`` is a file, a non-empty folder (without ``overwrite``, or one that is not a checkpoint),
            or lies below a file or in a folder that cannot be written.
    """
    dest = Path(dest)
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        raise ToolkitError(f"cannot write {what} to {dest}: it exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ToolkitError(f"{dest} already exists and is not empty; choose another folder")
        if not (dest / "config.json").is_file():
            raise ToolkitError(f"{dest} is not a checkpoint folder (no config.json); refusing to replace it")
    anc = dest.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ToolkitError(f"cannot write {what} to {dest}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ToolkitError(f"cannot write {what} to {dest}: folder {anc} is not writable")


def check_export_target(source: Path, dest: Path, *, overwrite: bool = False) -> None:
    """Refuse an export before any work is done: ``source`` must be a checkpoint folder, ``dest`` neither the
    source, nor inside it, nor containing it, and writable by :func:`check_save_path` (an existing non-empty ``dest``
    only with ``overwrite``, and only if it is a checkpoint folder).

    Raises:
        ToolkitError: one of those.
    """
    source, dest = Path(source), Path(dest)
    if not (source / "config.json").is_file():
        raise ToolkitError(f"cannot export: the model's source {source} is not a checkpoint folder")
    src, dst = source.resolve(), dest.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ToolkitError(f"refusing to write the exported checkpoint over the source checkpoint {source}")
    check_save_path(dest, overwrite=overwrite, what="the exported checkpoint")


def export_orthogonalized(source: Path, direction: torch.Tensor, dest: Path, *, dtype: torch.dtype | None = None,
                          overwrite: bool = False) -> dict:
    """Write a weight-orthogonalized copy of the checkpoint at ``source`` to ``dest`` (Arditi et al. 2024).

    ``W <- W - r_hat r_hat^T W`` on the embedding and every ``o_proj``/``down_proj`` (a tied LM head is untied,
    see :func:`~toolkit.interventions.orthogonalize_weights`), computed in float64 from the source's stored values,
    written in ``dtype`` (default: the stored dtype, :func:`stored_dtype`; float32 if the folder does not say). The
    model is loaded on the CPU, whatever device the session uses. A GGUF ``quantization_config`` left in the
    source's config (its weights are dequantized) is not copied.

    Args:
        source: a Hugging Face checkpoint folder (``config.json`` and weights), e.g. ``LoadedModel.source``.
        direction: ``[d_model]``, any norm.
        dest: the folder to create.
        dtype: the dtype written, or None for the stored dtype.
        overwrite: replace an existing checkpoint folder ``dest`` (never ``source`` itself, nor a folder that is
            not a checkpoint).

    Returns:
        ``{"stored_dtype", "saved_dtype", "edited", "untied_lm_head", "exact_equivalent"}`` (dtype names).

    Raises:
        ToolkitError: ``source`` is not a checkpoint folder, ``dest`` is ``source`` or refused by
            :func:`check_export_target`, the direction does not fit the model, or transformers cannot load or save it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, dest = Path(source), Path(dest)
    check_export_target(source, dest, overwrite=overwrite)
    stored = stored_dtype(source) or torch.float32
    target = dtype or stored
    work = stored if target == stored else torch.float32  # holds the stored values exactly
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=work, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except Exception as e:
        raise ToolkitError(f"could not reload {source} for export: {type(e).__name__}: {str(e).splitlines()[0]}"
                           ) from None
    model.eval()
    info = orthogonalize_weights(model, direction)
    model.to(target)
    strip_gguf_quantization(model.config)
    write_checkpoint(model, tok, dest)
    return {"stored_dtype": _dtype_name(stored), "saved_dtype": _dtype_name(target), **info}
