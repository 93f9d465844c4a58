"""``refusal stats``: statistics on finished runs.

``seeds`` aggregates one experiment over several seeds (mean, SD, t interval per row and metric); ``ttest``
compares a metric between two runs or two conditions of one run, prompt by prompt (paired t-test, exact McNemar
for booleans, or Welch's t-test), optionally per value of a column with a multiple-comparison correction;
``control`` places a learned steering direction's effect within the distribution of random (or orthogonal)
control directions of a ``steer`` run. Every command writes ``runs/stats/NAME/`` with a CSV and ``run.json``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import pandas as pd
import typer
from pydantic import Field
from rich.markup import escape
from rich.table import Table

from toolkit.errors import ToolkitError
from toolkit.runs import TEXT_COLUMNS, Run, check_same_judge, load_run, read_run_table
from toolkit.stats import (CORRECTIONS, adjust_pvalues, aggregate_seeds, as_float, mcnemar_exact, normalize_key,
                           paired_ttest, random_control, welch_ttest)

from .shared import Cli, Invalid, NOT_COMPARED, RunOptions, command, console, out

stats_app = typer.Typer(
    help="Statistics on finished runs: aggregate seeds, test two conditions prompt by prompt, compare a learned "
         "steering direction with random control directions.",
    no_args_is_help=True,
)

# Per-prompt columns that are measurements, not design factors (never suggested as --where filters).
MEASURES = ("score", "refusal", "kl", "completion", "degenerate", "coherence")
# Columns read as text whatever they hold (ids such as "007" or "NA" stay as written).
# refused in the words the commands used before the configs
Correction = Annotated[Literal[tuple(CORRECTIONS)], Invalid("unknown correction {value!r}: use one of {choices}")]
CORRECTION_HELP = ("multiple-comparison correction: holm (family-wise), bh (Benjamini-Hochberg false discovery rate) "
                   "or none")


# ------------------------------------------------------------------------------------------------ reading
def prompt_table(folder: Path) -> tuple[pd.DataFrame, str]:
    """A run's per-prompt table: ``results.csv`` if present, else ``scores.csv`` -> (table, file name).

    Raises:
        ToolkitError: the run has neither.
    """
    for fname in ("results.csv", "scores.csv"):
        if (folder / fname).is_file():
            return read_run_table(folder / fname), fname
    raise ToolkitError(f"run {folder} has no per-prompt table (results.csv or scores.csv)")


def _label(meta: dict) -> str:
    return f"{meta.get('command')}/{meta.get('name')}"


def _source(folder: Path, meta: dict) -> dict:
    return {"run": str(folder), "command": meta.get("command"), "name": meta.get("name"), "seed": meta.get("seed"),
            "model": meta.get("model"), "git_commit": meta.get("git_commit")}


def _prompt_sets(metas: list[dict]) -> list[dict]:
    """The source runs' prompt sets, each distinct one (by name, sha256, split) once."""
    seen, outl = set(), []
    for m in metas:
        for p in m.get("prompt_sets") or []:
            key = (p.get("name"), p.get("sha256"), p.get("split")) if isinstance(p, dict) else repr(p)
            if key not in seen:
                seen.add(key)
                outl.append(p)
    return outl


def _common_model(metas: list[dict]) -> dict | None:
    """The source runs' model when they share one (same hash, or the same record), else None."""
    models = [m.get("model") for m in metas]
    if any(not isinstance(m, dict) for m in models):
        return None
    first = models[0]
    if all((m.get("hash") and m.get("hash") == first.get("hash")) or m == first for m in models):
        return first
    return None


def _fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or (not isinstance(v, str) and pd.isna(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{digits}g}"
    return str(v)


def _print(df: pd.DataFrame, title: str, cols: list[str]) -> None:
    t = Table(title=escape(title), title_justify="left")
    for c in cols:
        numeric = pd.api.types.is_numeric_dtype(df[c].dtype) and not pd.api.types.is_bool_dtype(df[c].dtype)
        t.add_column(escape(c), justify="right" if numeric and c not in TEXT_COLUMNS else "left")
    for _, r in df.iterrows():
        t.add_row(*[escape(_fmt(r[c])) for c in cols])
    out.print(t)


# ------------------------------------------------------------------------------------------------ seeds
EXCLUDED_METRICS = ("n", "ci_low", "ci_high", "direction_seed")
NUMERIC_KEYS = ("alpha", "layer", "direction_index", "part")


def seed_columns(df: pd.DataFrame, keys: list[str] | None) -> tuple[list[str], list[str]]:
    """Default keys and metrics of a table aggregated over seeds -> (keys, metrics).

    Keys: the non-numeric columns (free text ``completion`` and columns naming a seed excepted) plus any of
    alpha, layer, direction_index, part present, unless ``keys`` is given. Metrics: the other numeric or boolean
    columns except n, ci_low, ci_high, direction_seed, columns ending in _ci_low/_ci_high or naming a seed, and
    columns without any value.
    """
    numeric = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c].dtype)
               or pd.api.types.is_bool_dtype(df[c].dtype)]
    if keys is None:
        keys = [c for c in df.columns if (c not in numeric or c in NUMERIC_KEYS)
                and c != "completion" and "seed" not in c]
    metrics = [c for c in numeric if c not in keys and c not in EXCLUDED_METRICS and "seed" not in c
               and not c.endswith(("_ci_low", "_ci_high")) and df[c].notna().any()]
    return keys, metrics


class SeedsConfig(RunOptions):
    """The options of ``refusal stats seeds``."""

    # not from $REFUSAL_RUNS: that variable names the runs folder
    runs: Annotated[list[str], Cli(argument=True, env=False)] = Field(
        ..., description="two or more runs of the same command that differ only in seed")
    file: str = Field("summary.csv", description="table aggregated in each run (e.g. summary.csv or results.csv)")
    keys: Optional[str] = Field(None, description="comma-separated columns identifying a row across runs [default: "
                                "the text columns plus alpha, layer, direction_index, part]")
    allow_mixed_judges: bool = Field(False, description="aggregate runs judged by different refusal judges")
    vary: Optional[str] = Field(None, description="comma-separated params that may differ too, e.g. direction when "
                                "each seed's ablate run removes the direction extracted with that seed")


@stats_app.command("seeds")
@command(SeedsConfig)
def seeds(cfg: SeedsConfig):
    """Aggregate one experiment over seeds: mean, SD and 95 % t interval per row and metric.

    Rows are matched across runs on the key columns; per row and metric the output gives the number of seeds, the
    mean, the SD and the t interval of the mean. The runs must be of one command with distinct seeds and identical
    params apart from seed params and the options that only say how, where or under which name a run was made
    (:data:`experiments.shared.config.NOT_COMPARED`: model, dtype, device, device_map, name, force, quiet) and the
    params named by --vary (e.g. each seed's own extracted direction). Rows missing from any run
    are dropped (and counted). Writes runs/stats/NAME/seeds.csv and run.json.
    """
    if len(cfg.runs) < 2:
        raise ToolkitError(f"need at least 2 runs to aggregate over seeds, got {len(cfg.runs)}")
    loaded = [load_run(r) for r in cfg.runs]
    metas = [m for _, m in loaded]
    first = metas[0]
    for (folder, m) in loaded[1:]:
        if m.get("command") != first.get("command"):
            raise ToolkitError(f"runs are of different commands: {_label(first)} is '{first.get('command')}', "
                               f"{_label(m)} is '{m.get('command')}'")
    check_same_judge([(str(f), m) for f, m in loaded], cfg.allow_mixed_judges)
    seen: dict = {}
    for (folder, m) in loaded:
        s = m.get("seed")
        if s is None:
            raise ToolkitError(f"run {folder} records no seed")
        if s in seen:
            raise ToolkitError(f"runs {seen[s]} and {folder} have the same seed {s}; seeds must be distinct")
        seen[s] = folder
    p0 = first.get("params") or {}
    vary = {v.strip() for v in (cfg.vary or "").split(",") if v.strip()}
    unknown = sorted(vary - set(p0))
    if unknown:
        raise ToolkitError(f"no param {unknown[0]!r} in {loaded[0][0]} (params: {', '.join(p0)})", param="vary")
    for (folder, m) in loaded[1:]:
        p = m.get("params") or {}
        for k in list(p0) + [k for k in p if k not in p0]:
            if "seed" in k.lower() or k in NOT_COMPARED or k in vary:
                continue
            if p0.get(k, "<absent>") != p.get(k, "<absent>"):
                raise ToolkitError(f"runs differ in param {k!r}: {p0.get(k, '<absent>')!r} in {loaded[0][0]} vs "
                                   f"{p.get(k, '<absent>')!r} in {folder}; only seed params (and those named by "
                                   "`vary`) may differ")
        h0, h = (first.get("model") or {}).get("hash"), (m.get("model") or {}).get("hash")
        if h0 and h and h0 != h:
            raise ToolkitError(f"runs {loaded[0][0]} and {folder} use different models (hash {h0[:12]} vs "
                               f"{h[:12]})")
    file = cfg.file
    if Path(file).name != file:
        raise ToolkitError(f"--file must be a file name inside the runs, got {file!r}")
    frames = []
    for folder, _ in loaded:
        if not (folder / file).is_file():
            raise ToolkitError(f"run {folder} has no {file}")
        frames.append(read_run_table(folder / file))
    key_list = [k.strip() for k in cfg.keys.split(",") if k.strip()] if cfg.keys else None
    if key_list is not None:
        missing = [k for k in key_list if k not in frames[0].columns]
        if missing:
            raise ToolkitError(f"--keys: no column(s) {', '.join(missing)} in {file} (columns: "
                               f"{', '.join(frames[0].columns)})")
    key_list, metrics = seed_columns(frames[0], key_list)
    if not metrics:
        raise ToolkitError(f"{file} has no numeric metric columns to aggregate")
    table = aggregate_seeds(frames, key_list, metrics)
    dropped = table.attrs.get("n_dropped", 0)
    with Run("stats", cfg.name, cfg.force) as run:
        run.write_csv("seeds.csv", table)
        final = run.finish(model=_common_model(metas), prompt_sets=_prompt_sets(metas), seed=None,
                           params=cfg.params(command="seeds", runs=[str(f) for f, _ in loaded], keys=key_list,
                                             metrics=metrics),
                           results={"source_command": first.get("command"), "n_runs": len(loaded),
                                    "seeds": [m.get("seed") for m in metas], "rows": len(table),
                                    "n_dropped": dropped, "sources": [_source(f, m) for f, m in loaded]})
    _print(table, f"{first.get('command')} over seeds {', '.join(str(m.get('seed')) for m in metas)}: {final}",
           key_list + ["metric", "n_seeds", "mean", "sd", "ci_low", "ci_high"])
    if dropped:
        console.print(f"dropped {dropped} row(s) not present in every run", highlight=False)
    console.print(f"wrote {final}/seeds.csv")


# ------------------------------------------------------------------------------------------------ ttest
def parse_where(specs: list[str] | None, df: pd.DataFrame, option: str) -> list[tuple[str, str]]:
    """``col=value`` filters -> [(column, normalised value)].

    Raises:
        ToolkitError: no '=', or a column the table lacks.
    """
    conds = []
    for spec in specs or []:
        col, sep, value = spec.partition("=")
        col = col.strip()
        if not sep or not col:
            raise ToolkitError(f"{option} {spec!r}: expected column=value")
        if col not in df.columns:
            raise ToolkitError(f"{option} {spec!r}: no column {col!r} (columns: {', '.join(df.columns)})")
        conds.append((col, normalize_key(value.strip())))
    return conds


def apply_where(df: pd.DataFrame, conds: list[tuple[str, str]]) -> pd.DataFrame:
    """Rows matching every (column, normalised value) condition."""
    mask = pd.Series(True, index=df.index)
    for col, value in conds:
        mask &= df[col].map(normalize_key) == value
    return df[mask]


def _check_unique(df: pd.DataFrame, keys: list[str], metric: str, side: str, label: str) -> None:
    """Raise when a prompt (keys) has several rows, naming the columns that still vary within a prompt."""
    dup = df.duplicated(keys, keep=False)
    if not dup.any():
        return
    d = df[dup]
    n_prompts = len(d.drop_duplicates(keys))
    others = [c for c in df.columns if c not in keys and c not in MEASURES and c != metric]
    varying = [c for c in others if (d.groupby(keys, dropna=False)[c]
                                     .agg(lambda s: s.map(normalize_key).nunique()) > 1).any()]
    hint = (f"add --where-{side} for: {', '.join(varying)}" if varying
            else "the table has duplicate rows")
    raise ToolkitError(f"rows of {label} are not unique per prompt ({', '.join(keys)}; {n_prompts} prompts have "
                       f"several rows); {hint}")


def _metric_kind(df: pd.DataFrame, metric: str, label: str) -> str:
    if metric not in df.columns:
        raise ToolkitError(f"no column {metric!r} in {label} (columns: {', '.join(df.columns)})")
    if df[metric].isna().all():
        raise ToolkitError(f"{label} has no values of {metric!r} in the selected rows")
    dt = df[metric].dtype
    if pd.api.types.is_bool_dtype(dt):
        return "boolean"
    if pd.api.types.is_numeric_dtype(dt):
        return "numeric"
    raise ToolkitError(f"column {metric!r} of {label} is neither numeric nor boolean")


def _order(value) -> tuple:
    """Sort key putting numbers (in numeric order) before text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _describe(side: dict) -> str:
    conds = " and ".join(f"{c}={v}" for c, v in side["conds"])
    return side["label"].rsplit(" (", 1)[0] + (f" where {conds}" if conds else "")


class TtestConfig(RunOptions):
    """The options of ``refusal stats ttest``."""

    run_a: Annotated[str, Cli(argument=True, metavar="RUN_A")] = Field(
        ..., description="run folder (or its run.json) of side A")
    run_b: Annotated[Optional[str], Cli(argument=True, metavar="[RUN_B]")] = Field(
        None, description="run of side B [default: RUN_A, to compare two conditions of one run with "
        "--where-a/--where-b]")
    metric: str = Field("score", description="per-prompt column compared: numeric (t-test) or boolean such as "
                        "refusal (exact McNemar)")
    where_a: list[str] = Field([], description="keep rows of A with column=value (repeatable; numbers compare by "
                               "value, alpha=2 matches 2.0)")
    where_b: list[str] = Field([], description="keep rows of B with column=value (repeatable)")
    set: Optional[str] = Field(None, description="only prompts of this set")
    welch: bool = Field(False, description="unpaired Welch t-test instead of pairing prompts")
    by: Optional[str] = Field(None, description="one test per value of this column, p-values adjusted")
    allow_mixed_judges: bool = Field(False, description="compare runs judged by different refusal judges")
    correction: Correction = Field("holm", description=CORRECTION_HELP)


@stats_app.command("ttest")
@command(TtestConfig)
def ttest(cfg: TtestConfig):
    """Compare a per-prompt metric between two runs, or two conditions of one run.

    Prompts are matched on (set, id) (and the --by column): a paired t-test (effect size d_z) for a numeric
    metric, an exact McNemar test for a boolean one; --welch runs an unpaired Welch t-test (Cohen's d) instead.
    With --by, one test per value and p-values adjusted with --correction. Writes runs/stats/NAME/ttest.csv and
    run.json.
    """
    run_a, run_b, metric, by, set_name, welch = cfg.run_a, cfg.run_b, cfg.metric, cfg.by, cfg.set, cfg.welch
    folder_a, meta_a = load_run(run_a)
    folder_b, meta_b = load_run(run_b) if run_b else (folder_a, meta_a)
    check_same_judge([(str(folder_a), meta_a), (str(folder_b), meta_b)], cfg.allow_mixed_judges)
    table_a, file_a = prompt_table(folder_a)
    table_b, file_b = (table_a, file_a) if run_b is None else prompt_table(folder_b)
    sides = []
    for side, folder, meta, table, fname, where in (("a", folder_a, meta_a, table_a, file_a, cfg.where_a),
                                                    ("b", folder_b, meta_b, table_b, file_b, cfg.where_b)):
        label = f"{_label(meta)} ({side.upper()})"
        for col in ("set", "id"):
            if col not in table.columns:
                raise ToolkitError(f"{fname} of {label} has no {col!r} column to match prompts on")
        if by and by not in table.columns:
            raise ToolkitError(f"--by {by!r}: no such column in {label} (columns: {', '.join(table.columns)})")
        if set_name is not None:
            present = sorted(table["set"].dropna().unique())
            if set_name not in present:
                raise ToolkitError(f"--set {set_name!r}: not in {label} (sets: {', '.join(present)})")
            table = table[table["set"] == set_name]
        conds = parse_where(where, table, f"--where-{side}")
        table = apply_where(table, conds)
        if table.empty:
            raise ToolkitError(f"no rows of {label} match " + " and ".join(f"{c}={v}" for c, v in conds))
        kind = _metric_kind(table, metric, label)
        sides.append({"label": label, "table": table, "kind": kind, "conds": conds})
    a, b = sides
    if a["kind"] != b["kind"]:
        raise ToolkitError(f"metric {metric!r} is {a['kind']} in {a['label']} but {b['kind']} in {b['label']}")
    boolean = a["kind"] == "boolean"
    if boolean and welch:
        raise ToolkitError(f"--welch needs a numeric metric; {metric!r} is boolean (drop --welch for an exact "
                           "McNemar test on paired prompts)")
    keys = ["set", "id"] + ([by] if by and by not in ("set", "id") else [])
    for s, side in zip(sides, "ab"):
        _check_unique(s["table"], keys, metric, side, s["label"])
        t = s["table"].copy()
        t["_v"] = as_float(t[metric], metric)
        t["_by"] = t[by].map(normalize_key) if by else ""
        s["n_missing"] = int(t["_v"].isna().sum())
        s["table"] = t[t["_v"].notna()]
        if s["table"].empty:
            raise ToolkitError(f"{s['label']} has no values of {metric!r} in the selected rows")

    groups = []  # (by display value, a values, b values)
    if welch:
        ga, gb = a["table"].groupby("_by", sort=True), b["table"].groupby("_by", sort=True)
        common = [g for g in ga.groups if g in gb.groups]
        if not common:
            raise ToolkitError(f"no value of --by {by!r} is present in both {a['label']} and {b['label']}")
        for g in common:
            ta, tb = ga.get_group(g), gb.get_group(g)
            groups.append((ta[by].iloc[0] if by else None, ta["_v"].to_numpy(), tb["_v"].to_numpy()))
    else:
        ma = a["table"].assign(_set=a["table"]["set"].astype(str), _id=a["table"]["id"].astype(str))
        mb = b["table"].assign(_set=b["table"]["set"].astype(str), _id=b["table"]["id"].astype(str))
        merged = ma.merge(mb, on=["_set", "_id", "_by"], suffixes=("_a", "_b"))
        if merged.empty:
            sets_a = ", ".join(sorted(ma["_set"].unique()))
            sets_b = ", ".join(sorted(mb["_set"].unique()))
            raise ToolkitError(f"no prompts match on (set, id{', ' + by if by and by not in ('set', 'id') else ''}) "
                               f"between {a['label']} (sets {sets_a}, {len(ma)} rows) and {b['label']} (sets "
                               f"{sets_b}, {len(mb)} rows)")
        for _, m in merged.groupby("_by", sort=True):  # the --by column is suffixed _a/_b by the merge
            groups.append((m[f"{by}_a"].iloc[0] if by else None, m["_v_a"].to_numpy(), m["_v_b"].to_numpy()))
    groups.sort(key=lambda g: _order(g[0]))
    test_fn = welch_ttest if welch else (mcnemar_exact if boolean else paired_ttest)
    test_name = "Welch t-test" if welch else ("exact McNemar test" if boolean else "paired t-test")
    rows = []
    for value, va, vb in groups:
        row = {by: value} if by else {}
        row["metric"] = metric
        try:
            row.update(test_fn(va.astype(bool), vb.astype(bool)) if boolean else test_fn(va, vb))
            row["note"] = ""
        except ToolkitError as e:
            if not by:
                raise
            row.update({"test": test_name, "p_value": float("nan"), "note": str(e)})
        rows.append(row)
    res = pd.DataFrame(rows)
    adjusted, corr_name = adjust_pvalues(res["p_value"].to_numpy(dtype=float), cfg.correction)
    res["p_adjusted"], res["correction"] = adjusted, corr_name
    first_cols = ([by] if by else []) + ["metric", "test"]
    res = res[first_cols + [c for c in res.columns if c not in first_cols]]
    with Run("stats", cfg.name, cfg.force) as run:
        run.write_csv("ttest.csv", res)
        metas = [meta_a] if run_b is None else [meta_a, meta_b]
        final = run.finish(model=_common_model(metas), prompt_sets=_prompt_sets(metas), seed=None,
                           params=cfg.params(command="ttest", run_a=str(folder_a), run_b=str(folder_b)),
                           results={"test": test_name, "correction": corr_name,
                                    "missing_values": {"a": a["n_missing"], "b": b["n_missing"]},
                                    "rows": res.to_dict(orient="records"),
                                    "sources": [_source(folder_a, meta_a)]
                                    + ([] if run_b is None else [_source(folder_b, meta_b)])})
    show = res[[by]].copy() if by else pd.DataFrame(index=res.index)
    if boolean:
        for c in ("n_pairs", "rate_a", "rate_b", "b01", "b10"):
            show[c] = res.get(c)
    else:
        for c in (["n_a", "n_b"] if welch else ["n_pairs"]) + ["mean_a", "mean_b"]:
            show[c] = res.get(c)
        show["diff [95% CI]"] = [f"{_fmt(r.get('mean_diff'))} [{_fmt(r.get('ci_low'))}, {_fmt(r.get('ci_high'))}]"
                                 for _, r in res.iterrows()]
        show["t"], show["df"] = res.get("statistic"), res.get("df")
    show["p"], show["p adj"] = res["p_value"], res["p_adjusted"]
    if not boolean:
        show[str(res["effect_size_name"].dropna().iloc[0]) if res["effect_size_name"].notna().any()
             else "effect"] = res.get("effect_size")
    _print(show, f"{test_name} on {metric}: A = {_describe(a)}, B = {_describe(b)}", list(show.columns))
    extra = ""
    if "effect_size_name" in res and res["effect_size_name"].notna().any():
        extra = f"; effect size {res['effect_size_name'].dropna().iloc[0]}"
    console.print(f"test: {test_name}; p-values adjusted: {corr_name}{extra}", highlight=False)
    for s in sides:
        if s["n_missing"]:
            console.print(f"{s['n_missing']} row(s) of {s['label']} without a {metric} value skipped", highlight=False)
    console.print(f"wrote {final}/ttest.csv")


# ------------------------------------------------------------------------------------------------ control
class ControlConfig(RunOptions):
    """The options of ``refusal stats control``."""

    run: Annotated[str, Cli(argument=True)] = Field(..., description="a steer run (runs/steer/NAME or NAME)")
    metric: Literal["score", "refusal"] = Field("score", description="score or refusal")
    kind: Literal["random", "orthogonal"] = Field("random", description="control directions: random or orthogonal")
    correction: Correction = Field("holm", description=CORRECTION_HELP)


@stats_app.command("control")
@command(ControlConfig)
def control(cfg: ControlConfig):
    """Place the learned direction's steering effect within its control directions' effects.

    For each layer, set, part and steering strength alpha != 0: the learned direction's effect (mean metric at
    alpha minus its mean at alpha 0) against the same effect of each control direction: their 95 % band
    (2.5th-97.5th percentile), the learned effect's percentile, a two-sided empirical p-value (Phipson & Smyth
    2010), adjusted across all rows with --correction. Writes runs/stats/NAME/control.csv and run.json.
    """
    metric, kind, correction = cfg.metric, cfg.kind, cfg.correction
    folder, meta = load_run(cfg.run, "steer")
    path = folder / "results.csv"
    if not path.is_file():
        raise ToolkitError(f"steer run {folder} has no results.csv")
    df = read_run_table(path)
    need = ["kind", "direction_index", "layer", "set", "part", "alpha", metric]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ToolkitError(f"{path} lacks column(s) {', '.join(missing)}")
    df = df.copy()
    df["_v"] = as_float(df[metric], metric)
    if df["_v"].isna().all():
        raise ToolkitError(f"{path} has no {metric} values" + (" (steered without generation? use --metric score)"
                                                               if metric == "refusal" else ""))
    df["_alpha"] = as_float(df["alpha"], "alpha")
    if not (df["kind"] == "learned").any():
        raise ToolkitError(f"steer run {folder} has no learned-direction rows")
    if not (df["kind"] == kind).any():
        present = ", ".join(sorted(df["kind"].dropna().unique()))
        raise ToolkitError(f"steer run {folder} has no {kind} control directions (kinds: {present})")
    if not ((df["kind"] == "learned") & (df["_alpha"] == 0)).any():
        raise ToolkitError(f"steer run {folder} has no alpha 0 rows (the baseline) for the learned direction")
    group = ["layer", "set", "part"] + [c for c in ("site", "positions")
                                        if c in df.columns and df[c].map(normalize_key).nunique() > 1]
    df = df[df["kind"].isin(["learned", kind])]
    dkey = ["kind", "direction_index"]
    means = df.groupby(group + dkey + ["_alpha"], dropna=False, sort=True)["_v"].mean().reset_index()
    base = means[means["_alpha"] == 0].drop(columns="_alpha").rename(columns={"_v": "_base"})
    steered = means[means["_alpha"] != 0].merge(base, on=group + dkey, how="left")
    steered["_effect"] = steered["_v"] - steered["_base"]
    n_learned = df.loc[df["kind"] == "learned", "direction_index"].map(normalize_key).nunique()
    rows = []
    for gkey, g in steered.groupby(group + ["_alpha"], dropna=False, sort=True):
        learned = g[g["kind"] == "learned"]
        randoms = g.loc[g["kind"] == kind, "_effect"].dropna().to_numpy(dtype=float)
        for _, lr in learned.iterrows():
            row = dict(zip(group, gkey[:-1]))
            row["alpha"] = gkey[-1]
            if n_learned > 1:
                row["direction_index"] = lr["direction_index"]
            row["metric"] = metric
            row["learned_effect"] = float(lr["_effect"])
            if len(randoms):
                rc = random_control(lr["_effect"], randoms)
            else:
                rc = {"n_random": 0, "random_mean": float("nan"), "band_low": float("nan"),
                      "band_high": float("nan"), "percentile": float("nan"), "p_value": float("nan"),
                      "t": float("nan"), "p_parametric": float("nan"), "exceeds_band": False}
            row.update({k: rc[k] for k in ("random_mean", "band_low", "band_high", "percentile", "p_value", "t",
                                           "p_parametric")})
            row["exceeds_band"], row["n_random"] = rc["exceeds_band"], rc["n_random"]
            rows.append(row)
    if not rows:
        raise ToolkitError(f"steer run {folder} has no learned-direction rows at alpha != 0")
    res = pd.DataFrame(rows)
    adjusted, corr_name = adjust_pvalues(res["p_value"].to_numpy(dtype=float), correction)
    res.insert(res.columns.get_loc("p_value") + 1, "p_adjusted", adjusted)
    res.insert(res.columns.get_loc("p_adjusted") + 1, "correction", corr_name)
    res["p_parametric_adjusted"] = adjust_pvalues(res["p_parametric"].to_numpy(dtype=float), correction)[0]
    n_exceed = int(res["exceeds_band"].sum())
    n_sig = int((res["p_adjusted"] < 0.05).sum())
    n_sig_t = int((res["p_parametric_adjusted"] < 0.05).sum())
    n_rand = int(res["n_random"].max())
    with Run("stats", cfg.name, cfg.force) as out_run:
        out_run.write_csv("control.csv", res)
        final = out_run.finish(model=meta.get("model"), prompt_sets=_prompt_sets([meta]), seed=None,
                               params=cfg.params(command="control", run=str(folder), source_seed=meta.get("seed")),
                               results={"rows": len(res), "n_exceeds_band": n_exceed,
                                        "n_p_adjusted_below_0.05": n_sig,
                                        "n_p_parametric_adjusted_below_0.05": n_sig_t,
                                        "min_empirical_p": 1 / (n_rand + 1), "correction": corr_name,
                                        "sources": [_source(folder, meta)]})
    show = res[[c for c in res.columns if c in group or c in ("alpha", "direction_index")]].copy()
    show["effect"], show[f"{kind} mean"] = res["learned_effect"], res["random_mean"]
    show[f"{kind} 95% band"] = [f"[{_fmt(r['band_low'])}, {_fmt(r['band_high'])}]" for _, r in res.iterrows()]
    show["pctl"], show["p"], show["p adj"] = res["percentile"], res["p_value"], res["p_adjusted"]
    show["t"], show["p_t adj"] = res["t"], res["p_parametric_adjusted"]
    show["outside"], show["n"] = res["exceeds_band"], res["n_random"]
    _print(show, f"learned vs {kind} directions, effect on mean {metric} (vs alpha 0): {_label(meta)}",
           list(show.columns))
    console.print(f"{n_exceed} of {len(res)} rows outside the {kind} 95 % band; {n_sig} with {corr_name}-adjusted "
                  f"empirical p < 0.05 (with {n_rand} {kind} directions no empirical p can be below "
                  f"{1 / (n_rand + 1):.3f}); {n_sig_t} with {corr_name}-adjusted prediction-interval t-test p < 0.05 "
                  "(assumes normally distributed random effects)", highlight=False)
    console.print(f"wrote {final}/control.csv")
