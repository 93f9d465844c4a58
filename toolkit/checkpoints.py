"""Checkpoint export: edited Hugging Face checkpoints that keep the source's stored dtype, and LoRA adapters.

A model runs in its compute dtype (``--dtype``, e.g. bfloat16 on a CPU with native bfloat16), but a checkpoint the
toolkit writes is computed from the *source checkpoint's* weights, not from the compute-dtype copy in memory: a
float32 checkpoint stays float32 even when the session ran in bfloat16, and a bfloat16 checkpoint is not widened.
The weights are read again from the source folder in the wider of the stored and the requested dtype (which holds
the stored values exactly), edited in float64 (:func:`toolkit.interventions.orthogonalize_weights`), cast once to the
dtype written, and saved atomically (a temporary sibling folder renamed into place).

An abliteration edit (:class:`toolkit.abliteration.WeightEdit`) is exported like Heretic exports its trials: merged
into the weights (:func:`export_weight_edit`) or as a PEFT LoRA adapter on the unchanged source
(:func:`export_adapter`), which also holds the affine edit's bias on architectures whose checkpoints have none.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import torch

from .abliteration import WeightEdit, _check_fits, _module, apply_weight_edit
from .errors import ToolkitError
from .interventions import orthogonalize_weights
from .models import DTYPES, save_folder, strip_gguf_quantization, write_checkpoint

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


def check_save_path(dest: Path, *, overwrite: bool = False, what: str = "the checkpoint",
                    marker: str = "config.json") -> None:
    """Refuse a folder to write a checkpoint to, before any work: ``dest`` must be absent, an empty folder, or (with
    ``overwrite``) a Hugging Face checkpoint folder (holding ``marker``: ``config.json``; ``adapter_config.json`` for
    an adapter), and its nearest existing ancestor a writable folder. Any other existing folder or file is never
    replaced, whatever ``overwrite`` says.

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
        if not (dest / marker).is_file():
            kind = "an adapter folder" if marker == "adapter_config.json" else "a checkpoint folder"
            raise ToolkitError(f"{dest} is not {kind} (no {marker}); refusing to replace it")
    anc = dest.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ToolkitError(f"cannot write {what} to {dest}: {anc} is a file, not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ToolkitError(f"cannot write {what} to {dest}: folder {anc} is not writable")


def check_export_target(source: Path, dest: Path, *, overwrite: bool = False, marker: str = "config.json",
                        what: str = "the exported checkpoint") -> None:
    """Refuse an export before any work is done: ``source`` must be a checkpoint folder, ``dest`` neither the
    source, nor inside it, nor containing it, and writable by :func:`check_save_path` (an existing non-empty ``dest``
    only with ``overwrite``, and only if it is a checkpoint folder, or whatever folder ``marker`` names).

    Raises:
        ToolkitError: one of those.
    """
    source, dest = Path(source), Path(dest)
    if not (source / "config.json").is_file():
        raise ToolkitError(f"cannot export: the model's source {source} is not a checkpoint folder")
    src, dst = source.resolve(), dest.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise ToolkitError(f"refusing to write {what} over the source checkpoint {source}")
    check_save_path(dest, overwrite=overwrite, what=what, marker=marker)


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
    return _export_merged(source, dest, dtype, overwrite, lambda model: orthogonalize_weights(model, direction))


def export_head_orthogonalized(source: Path, direction: torch.Tensor, heads, dest: Path, *,
                               dtype: torch.dtype | None = None, overwrite: bool = False) -> dict:
    """Write a copy of the checkpoint at ``source`` with ``direction`` orthogonalized out of the chosen attention
    heads only (:func:`toolkit.heads.orthogonalize_heads`: ``W_O^h <- (I - r_hat r_hat^T) W_O^h`` on those heads'
    column slices of ``o_proj.weight``), to ``dest``; computed in float64 from the source's stored values and written
    in ``dtype`` (default: the stored dtype), as :func:`export_orthogonalized`.

    Args:
        source: a Hugging Face checkpoint folder.
        direction: ``[d_model]``, any norm.
        heads: a :class:`toolkit.heads.HeadSelection`.
        dest: the folder to create.
        dtype: the dtype written, or None for the stored dtype.
        overwrite: replace an existing checkpoint folder ``dest`` (never ``source``).

    Returns:
        ``{"stored_dtype", "saved_dtype", "edited", "heads", "untied_lm_head", "exact_equivalent"}``.

    Raises:
        ToolkitError: as :func:`export_orthogonalized`, or heads the model does not have.
    """
    from .heads import orthogonalize_heads

    return _export_merged(source, dest, dtype, overwrite, lambda model: orthogonalize_heads(model, direction, heads))


def _reload(source: Path, dtype: torch.dtype, *, tokenizer: bool = True):
    """The checkpoint at ``source`` loaded on the CPU in ``dtype``, in eval mode, and its tokenizer (or None).

    Raises:
        ToolkitError: transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(str(source), local_files_only=True) if tokenizer else None
    except Exception as e:
        raise ToolkitError(f"could not reload {source} for export: {type(e).__name__}: {str(e).splitlines()[0]}"
                           ) from None
    model.eval()
    return model, tok


def _export_merged(source: Path, dest: Path, dtype: torch.dtype | None, overwrite: bool, edit_fn,
                   extra: dict[str, str] | None = None) -> dict:
    """The shared body of the merged exports: check ``dest``, reload ``source`` in the wider of its stored dtype and
    ``dtype`` (which holds the stored values exactly), ``info = edit_fn(model)`` in place (float64 arithmetic), cast
    once to ``dtype`` (default: the stored dtype) and write atomically with ``extra`` files.

    ``edit_fn`` may raise :class:`ToolkitError` to refuse: nothing is written then.

    Returns:
        ``{"stored_dtype", "saved_dtype", **info}``.
    """
    source, dest = Path(source), Path(dest)
    check_export_target(source, dest, overwrite=overwrite)
    stored = stored_dtype(source) or torch.float32
    target = dtype or stored
    work = stored if target == stored else torch.float32  # holds the stored values exactly
    model, tok = _reload(source, work)
    info = edit_fn(model)
    model.to(target)
    strip_gguf_quantization(model.config)
    write_checkpoint(model, tok, dest, extra=extra)
    return {"stored_dtype": _dtype_name(stored), "saved_dtype": _dtype_name(target), **info}


def export_weight_edit(source: Path, edit: WeightEdit, dest: Path, *, dtype: torch.dtype | None = None,
                       overwrite: bool = False, extra: dict[str, str] | None = None) -> dict:
    """Write a copy of the checkpoint at ``source`` with an abliteration edit merged into its weights, to ``dest``.

    The edit's ``o_proj``/``down_proj`` weights (and biases, where the architecture has them) are rewritten by
    :func:`toolkit.abliteration.apply_weight_edit`, exactly the map :func:`~toolkit.abliteration.edit_hooks` applies
    (all three forms, ``norm_preserving`` included: no low-rank approximation), computed in float64 from the source's
    stored values and written in ``dtype`` (default: the stored dtype, as :func:`export_orthogonalized`). Nothing
    else changes (embeddings and a tied LM head are untouched). Heretic likewise saves a trial merged into the
    weights (p-e-w/heretic, "Save the model"), or as a LoRA adapter (:func:`export_adapter`).

    An affine edit with a non-zero reference level needs a bias on the edited modules; most architectures (Qwen2,
    Llama, Gemma 2) have no ``o_proj``/``down_proj`` bias and transformers drops such a key when it loads the
    checkpoint, silently losing the shift. Such an export is refused before anything is written (Llama's
    ``attention_bias``/``mlp_bias`` flags are not flipped: ``attention_bias`` adds q/k/v biases too);
    :func:`export_adapter` holds the affine edit exactly.

    Args:
        source: a Hugging Face checkpoint folder, e.g. ``LoadedModel.source``.
        edit: the edit; its ``[n_layers, d_model]`` directions must fit the model.
        dest: the folder to create.
        dtype: the dtype written, or None for the stored dtype.
        overwrite: replace an existing checkpoint folder ``dest`` (never ``source``, nor a non-checkpoint folder).
        extra: text files written into the folder, ``{name: content}`` (e.g. a provenance JSON).

    Returns:
        ``{"stored_dtype", "saved_dtype", "edited", "added_bias"}`` (dtype names; module names as
        :func:`~toolkit.abliteration.apply_weight_edit` gives them; ``added_bias`` is always empty).

    Raises:
        ToolkitError: ``dest`` refused by :func:`check_export_target`, the edit does not fit the model, an affine
            edit needs a bias the architecture cannot store, or transformers cannot load or save the checkpoint.
    """
    def edit_fn(model):
        info = apply_weight_edit(model, edit)
        if info["added_bias"]:
            mods = ", ".join(info["added_bias"])
            raise ToolkitError(f"cannot export the affine edit merged: it needs a bias on {mods}, which this "
                               f"architecture's checkpoint cannot store; an adapter export (export_adapter) holds "
                               f"the affine edit exactly")
        return info

    return _export_merged(source, dest, dtype, overwrite, edit_fn, extra)


def _module_names(model, edit: WeightEdit) -> dict[tuple[int, str], str]:
    """``(layer, component) -> full module name`` (``model.named_modules()``) of the edit's active modules."""
    names = {id(m): n for n, m in model.named_modules()}
    return {(l, c): names[id(_module(model, l, c))] for l, c in edit.active()}


def _factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A rank-``r`` factorisation ``B @ A`` of ``delta`` ``[d_out, d_in]`` (float64) by truncated SVD, singular values
    split as square roots; zero-padded where ``r`` exceeds the matrix's rank bound. Returns ``(B [d_out, r],
    A [r, d_in], |delta - B A| / |delta|)`` (Frobenius; 0 for a zero ``delta``)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(r, S.shape[0])
    rs = S[:k].sqrt()
    B = torch.zeros(delta.shape[0], r, dtype=delta.dtype)
    A = torch.zeros(r, delta.shape[1], dtype=delta.dtype)
    B[:, :k] = U[:, :k] * rs
    A[:k] = rs.unsqueeze(1) * Vh[:k]
    norm = float(delta.norm())
    return B, A, (float((delta - B @ A).norm()) / norm if norm > 0 else 0.0)


def export_adapter(source: Path, edit: WeightEdit, dest: Path, *, rank: int = 8, overwrite: bool = False,
                   extra: dict[str, str] | None = None) -> dict:
    """Write an abliteration edit as a PEFT LoRA adapter folder for the unchanged checkpoint at ``source``.

    Heretic offers the same choice when it saves a trial (merged, or a LoRA adapter); here the adapter is
    ``PeftModel.from_pretrained(base, dest)``-loadable (PEFT ``LoraConfig``, ``get_peft_model``, ``save_pretrained``;
    https://huggingface.co/docs/peft). It targets exactly the edited ``o_proj``/``down_proj`` modules (full module
    names), with ``lora_alpha = r`` (scale 1), no dropout, ``task_type="CAUSAL_LM"``; each module's output becomes
    ``W x + b + B (A x) + b_B`` with the delta ``B A = W' - W`` of :func:`~toolkit.abliteration.apply_weight_edit`:

    * ``projection``: rank 1, exact: ``B = -a`` (column), ``A = g^T W`` (row).
    * ``affine``: the same rank-1 factors plus the bias change ``b' - b`` (``b = 0`` where the module has none) in
      the LoRA B bias (``LoraConfig(lora_bias=True)``): exact, also on architectures whose checkpoints cannot store
      an ``o_proj``/``down_proj`` bias (:func:`export_weight_edit` refuses those). PEFT then warns that the adapter
      cannot be merged into a base layer without a bias (``merge_and_unload``); loading and running it is exact.
    * ``norm_preserving``: ``W' - W`` is not low-rank: a truncated SVD of rank ``rank`` per module (Heretic stores a
      rank-3 one), singular values split as square roots into ``A`` and ``B``, zero-padded where ``rank`` exceeds
      ``min(d_out, d_in)``. Approximate below full rank: the largest relative Frobenius error over modules is
      returned; the merged export (:func:`export_weight_edit`) is exact.

    A bias change of a module that has a bias (any form) also goes into the LoRA B bias. The deltas are computed in
    float64 from a float32 reload of the source (which holds bfloat16/float16 values exactly) and saved float32. One
    ``LoraConfig`` has one rank: ``r = 1`` for ``projection``/``affine``, ``r = rank`` for ``norm_preserving``. The
    global random state is left as it was (PEFT's initialisation is overwritten).

    Args:
        source: a Hugging Face checkpoint folder, e.g. ``LoadedModel.source``.
        edit: the edit; its ``[n_layers, d_model]`` directions must fit the model, and it must touch a module.
        dest: the adapter folder to create (written atomically: a hidden sibling renamed into place).
        rank: the SVD rank for ``norm_preserving`` (>= 1; ignored by the exact forms).
        overwrite: replace an existing adapter folder ``dest`` (``adapter_config.json``; never ``source``, nor
            another folder).
        extra: text files written into the folder, ``{name: content}``.

    Returns:
        ``{"stored_dtype", "saved_dtype": "float32", "form", "r", "lora_bias", "target_modules": [full names],
        "approx_rel_error"}`` (``approx_rel_error``: 0.0 for the exact forms).

    Raises:
        ToolkitError: ``rank < 1``, ``dest`` refused by :func:`check_export_target`, an edit that touches no module
            or does not fit the model, or transformers/PEFT cannot load or save.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ToolkitError(f"the adapter's rank must be an integer >= 1, got {rank!r}")
    source, dest = Path(source), Path(dest)
    check_export_target(source, dest, overwrite=overwrite, marker="adapter_config.json", what="the adapter")
    if not edit.active():
        raise ToolkitError("the edit touches no module (every strength is 0); there is no adapter to write")
    stored = stored_dtype(source) or torch.float32
    model, _ = _reload(source, torch.float32, tokenizer=False)
    _check_fits(model, edit)
    r = rank if edit.form == "norm_preserving" else 1
    names = _module_names(model, edit)
    factors, err, use_bias = {}, 0.0, False
    for (layer, comp), name in names.items():
        mod = _module(model, layer, comp)
        t = edit.terms(layer, comp, mod.weight, mod.bias)
        W = mod.weight.detach().to(torch.float64)
        if edit.form == "norm_preserving":
            Wn = (W - torch.outer(t["a"], t["g"] @ W)) * t["s"].unsqueeze(1)
            B, A, e = _factors(Wn - W, r)
            err = max(err, e)
        else:
            B, A = -t["a"].unsqueeze(1), (t["g"] @ W).unsqueeze(0)
        b0 = torch.zeros(W.shape[0], dtype=torch.float64) if mod.bias is None else mod.bias.detach().double()
        db = torch.zeros_like(b0) if t["b"] is None else t["b"] - b0
        use_bias = use_bias or bool((db != 0).any())
        factors[name] = (B, A, db)
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=list(names.values()), bias="none",
                     lora_bias=use_bias, task_type="CAUSAL_LM")
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*lora_bias=True.*has no bias.*")
            peft_model = get_peft_model(model, cfg)
    except Exception as e:
        raise ToolkitError(f"PEFT could not build the adapter: {type(e).__name__}: {str(e).splitlines()[0]}"
                           ) from None
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (B, A, db) in factors.items():
            lora = inner.get_submodule(name)
            lora.lora_A["default"].weight.copy_(A.float())
            lora.lora_B["default"].weight.copy_(B.float())
            if use_bias:
                lora.lora_B["default"].bias.copy_(db.float())
    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            # PEFT 0.21 takes the 1-D lora_B biases for unsharded ZeRO-3/FSDP tensors and warns; they are complete
            warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")
            peft_model.save_pretrained(str(tmp))

    save_folder(dest, save, "the adapter", extra)
    return {"stored_dtype": _dtype_name(stored), "saved_dtype": "float32", "form": edit.form, "r": r,
            "lora_bias": use_bias, "target_modules": list(names.values()), "approx_rel_error": err}
