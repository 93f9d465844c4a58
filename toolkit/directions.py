"""Directions in the residual stream: difference-in-means, normalisation, files.

Difference-in-means (Arditi et al. 2024): ``r[l, i] = mean_harmful(x[l, i]) - mean_harmless(x[l, i])`` for
layer ``l`` and post-instruction position ``i``, accumulated in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ToolkitError


def diff_in_means(sum_a: torch.Tensor, n_a: int, sum_b: torch.Tensor, n_b: int) -> torch.Tensor:
    """``sum_a / n_a - sum_b / n_b`` in float64.

    Args:
        sum_a, sum_b: activation sums ``[..., d_model]`` (e.g. ``[n_layers, n_pos, d_model]``).
        n_a, n_b: prompt counts.

    Raises:
        ToolkitError: a count is zero (e.g. the training filter removed every prompt).
    """
    if n_a == 0 or n_b == 0:
        raise ToolkitError(f"difference-in-means needs prompts on both sides (got {n_a} and {n_b})")
    return sum_a.double() / n_a - sum_b.double() / n_b


def unit(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``v / ||v||`` along the last axis.

    Raises:
        ToolkitError: a zero vector.
    """
    n = v.norm(dim=-1, keepdim=True)
    if bool((n < eps).any()):
        raise ToolkitError("cannot normalise a zero direction")
    return v / n


def save_direction(path: Path, direction: torch.Tensor, meta: dict) -> None:
    """Write a direction ``[d_model]`` (float32, raw norm kept) and its metadata to a safetensors file."""
    save_file({"direction": direction.float().contiguous()}, str(path),
              metadata={"meta": json.dumps(meta, sort_keys=True)})


def read_tensors(path: Path, keys: tuple[str, ...], what: str = "tensor file") -> tuple[dict, dict]:
    """Read a safetensors file and its ``meta`` metadata (a JSON object) -> (``{name: tensor}``, metadata dict).

    Args:
        path: the ``.safetensors`` file.
        keys: tensor names that must be present.
        what: what the file is, for messages (e.g. ``"direction file"``).

    Raises:
        ToolkitError: missing, truncated or otherwise unreadable file; metadata that is not a JSON object; a
            required tensor missing.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"no {what} at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("meta", "{}")
        tensors = load_file(str(path))
    except Exception as e:
        raise ToolkitError(f"cannot read {what} {path} (truncated or not a safetensors file: "
                           f"{type(e).__name__})") from None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ToolkitError(f"{what} {path}: its 'meta' metadata is not a JSON object")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ToolkitError(f"{what} {path} has no tensor {missing[0]!r} (it holds {', '.join(sorted(tensors))})")
    return tensors, meta


# metadata keys of a direction file that commands read, with their types (None allowed: "not recorded")
DIRECTION_META = {"model_hash": str, "model_id": str, "d_model": int, "layer": int, "pos": int, "site": str,
                  "norm": float}


def check_direction_meta(meta: dict, where) -> dict:
    """The metadata of a direction file, checked: each key of :data:`DIRECTION_META` that is present is None or of
    its type (an int is accepted for a float).

    Raises:
        ToolkitError: naming the file and the first key of the wrong type.
    """
    for key, typ in DIRECTION_META.items():
        v = meta.get(key)
        ok = v is None or (isinstance(v, typ) and not isinstance(v, bool)) or (typ is float and isinstance(v, int)
                                                                              and not isinstance(v, bool))
        if not ok:
            raise ToolkitError(f"direction file {where}: metadata {key!r} should be {typ.__name__}, got {v!r}")
    return meta


def load_direction(path: Path) -> tuple[torch.Tensor, dict]:
    """Read a direction file written by :func:`save_direction` -> (``[d_model]`` float32, metadata).

    Raises:
        ToolkitError: missing, truncated or unreadable file, metadata that is not a JSON object or has a known key
            of the wrong type (:func:`check_direction_meta`), no ``direction`` tensor, or one that is not a finite
            ``[d_model]`` float vector.
    """
    path = Path(path)
    tensors, meta = read_tensors(path, ("direction",), "direction file")
    t = tensors["direction"]
    if t.ndim != 1:
        raise ToolkitError(f"direction in {path} has shape {tuple(t.shape)}, expected [d_model]")
    if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
        raise ToolkitError(f"direction in {path} is not a finite floating-point vector")
    return t.float(), check_direction_meta(meta, path)
