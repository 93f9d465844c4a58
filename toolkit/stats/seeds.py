"""One experiment across seeds: comparable row keys, numeric/boolean columns as floats, and the mean, SD and t
interval of each metric over runs."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ToolkitError

if TYPE_CHECKING:
    import pandas as pd


def normalize_key(value) -> str:
    """A value as a comparable string: numbers as ``repr(float)`` (so 2, 2.0 and "2" all give "2.0"), booleans
    and "true"/"false" as "True"/"False", missing values (None, NaN, pandas NA, "") as ""; other strings
    unchanged."""
    import pandas as pd

    if value is None or (np.ndim(value) == 0 and not isinstance(value, str) and pd.isna(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        return "" if np.isnan(float(value)) else repr(float(value))
    s = str(value)
    if s.strip().lower() in ("true", "false"):
        return s.strip().capitalize()
    if s.strip() == "":
        return ""
    try:
        f = float(s)
    except ValueError:
        return s
    return "" if math.isnan(f) else repr(f)


def as_float(col, name: str) -> np.ndarray:
    """A numeric or boolean column (True/False, possibly with gaps) as floats with NaN for gaps.

    Raises:
        ToolkitError: the column holds text.
    """
    import pandas as pd

    s = pd.Series(col)
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("Float64").to_numpy(dtype=float, na_value=np.nan)
    if pd.api.types.is_numeric_dtype(s.dtype):
        return s.to_numpy(dtype=float, na_value=np.nan)
    words = {"true": 1.0, "false": 0.0}
    mapped = s.map(lambda v: words.get(str(v).strip().lower(), v) if isinstance(v, (str, bool, np.bool_)) else v)
    try:
        return pd.to_numeric(mapped, errors="raise").to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        raise ToolkitError(f"column {name!r} is not numeric or boolean") from None


def aggregate_seeds(frames: list[pd.DataFrame], keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, SD and t interval of each metric across runs of one experiment with different seeds.

    Rows are matched across runs on ``keys`` (values compared after :func:`normalize_key`, so 2 and 2.0 match);
    rows not present in every run are dropped. Boolean metrics count as 0/1; missing values are skipped.

    Args:
        frames: one pandas DataFrame per run (e.g. its summary.csv), each with ``keys`` and ``metrics`` columns
            and at most one row per key.
        keys: columns identifying a row (e.g. set, condition, alpha).
        metrics: numeric or boolean columns to aggregate.

    Returns:
        A long DataFrame, one row per (key, metric) in the first run's row order: the key columns (values from
        the first run), ``metric``, ``n_seeds`` (runs with a value), ``mean``, ``sd`` (ddof 1; NaN for one
        value), ``ci_low``/``ci_high`` (95 % t interval of the mean, ``scipy.stats.t.interval``; equal to the
        mean when n_seeds < 2 or sd is 0). ``result.attrs["n_dropped"]`` is the number of distinct keys missing
        from at least one run and ``result.attrs["n_runs"]`` the number of runs.

    Raises:
        ToolkitError: no frames or metrics, a missing column, duplicate keys within a run, or a text metric.
    """
    import pandas as pd
    from scipy import stats as st

    keys, metrics = list(keys), list(metrics)
    if not frames:
        raise ToolkitError("no runs to aggregate")
    if not metrics:
        raise ToolkitError("no metrics to aggregate")
    parts = []
    for i, f in enumerate(frames):
        missing = [c for c in keys + metrics if c not in f.columns]
        if missing:
            raise ToolkitError(f"run {i + 1} has no column(s) {', '.join(missing)}")
        kk = (f[keys].apply(lambda col: col.map(normalize_key)).agg("\x1f".join, axis=1) if keys
              else pd.Series([""] * len(f), index=f.index))
        dup = kk.duplicated(keep=False)
        if dup.any():
            row = f.loc[dup.idxmax(), keys]
            where = ", ".join(f"{k}={row[k]}" for k in keys) or "(no keys)"
            raise ToolkitError(f"run {i + 1} has several rows for {where}; add the column that tells them apart "
                               "to the keys")
        part = pd.DataFrame({m: as_float(f[m], m) for m in metrics})
        part.insert(0, "_key", kk.to_numpy())
        part.insert(1, "_run", i)
        parts.append(part)
    data = pd.concat(parts, ignore_index=True)
    n_runs = len(frames)
    runs_per_key = data.groupby("_key", sort=False)["_run"].nunique()
    common = runs_per_key.index[runs_per_key == n_runs]
    n_dropped = int((runs_per_key < n_runs).sum())
    first = frames[0].assign(_key=parts[0]["_key"].to_numpy())
    first = first[first["_key"].isin(common)]
    order = first["_key"].tolist()
    grouped = data[data["_key"].isin(common)].groupby("_key", sort=False)
    blocks = []
    for m in metrics:
        n = grouped[m].count().reindex(order).to_numpy()
        mean = grouped[m].mean().reindex(order).to_numpy(dtype=float)
        sd = grouped[m].std(ddof=1).reindex(order).to_numpy(dtype=float)
        lo, hi = mean.copy(), mean.copy()
        ok = (n >= 2) & (sd > 0)
        if ok.any():
            lo[ok], hi[ok] = st.t.interval(0.95, n[ok] - 1, loc=mean[ok], scale=sd[ok] / np.sqrt(n[ok]))
        block = first[keys].reset_index(drop=True).copy()
        block["metric"] = m
        block["n_seeds"] = n.astype(int)
        block["mean"], block["sd"], block["ci_low"], block["ci_high"] = mean, sd, lo, hi
        block["_row"] = np.arange(len(order))
        blocks.append(block)
    out = (pd.concat(blocks, ignore_index=True) if blocks else pd.DataFrame())
    out["_m"] = out["metric"].map({m: j for j, m in enumerate(metrics)})
    out = out.sort_values(["_row", "_m"], kind="stable").drop(columns=["_row", "_m"]).reset_index(drop=True)
    out.attrs["n_dropped"] = n_dropped
    out.attrs["n_runs"] = n_runs
    return out
