"""Input checks shared by the statistics modules: a 1-D vector of finite numbers or of booleans, or a
ToolkitError naming what was being checked."""

from __future__ import annotations

import numpy as np

from ..errors import ToolkitError


def _values(x, what: str) -> np.ndarray:
    """A 1-D float array of finite values, or ToolkitError naming ``what``."""
    try:
        v = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ToolkitError(f"{what}: values must be numbers") from None
    if v.ndim != 1:
        raise ToolkitError(f"{what}: expected a 1-D sequence of numbers, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ToolkitError(f"{what}: values must be finite (drop missing values first)")
    return v


def _flags(x, what: str) -> np.ndarray:
    """A 1-D bool array from booleans or 0/1 numbers, or ToolkitError naming ``what``."""
    try:
        v = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ToolkitError(f"{what}: values must be booleans") from None
    if v.ndim != 1 or not np.isin(v, (0.0, 1.0)).all():
        raise ToolkitError(f"{what}: expected a 1-D sequence of booleans (True/False or 0/1) without gaps")
    return v.astype(bool)
