"""``refusal imprint``: per-layer refusal directions of one or more runs summarised and compared side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from rich.table import Table

from toolkit.directions import DirectionSet
from toolkit.errors import ToolkitError
from toolkit.geometry import IMPRINT_FIGURES, contrast_layers, imprint
from toolkit.runs import Run, load_run
from toolkit.xmodel import ABSOLUTE_FIGURES, depth_fraction, figure_spread, model_differences

from .shared import Cli, RunOptions, command, console, out

#: Hand-set templates for the optional training-method heuristic (--classify): per method, the mean and spread
#: of each figure. ILLUSTRATIVE VALUES CHOSEN BY HAND FOR THIS TOOLKIT, NOT FITTED TO OR VALIDATED ON ANY MODEL
#: (OBLITERATUS's own templates are likewise hand-set and called unvalidated by its authors). Replace them with
#: --templates FILE (JSON of the same shape) if you have measured imprints of models with known training.
TEMPLATES = {
    "DPO": {"gini": (0.25, 0.10), "effective_rank": (3.0, 1.5), "smoothness": (0.85, 0.08), "tail_share": (0.25, 0.08)},
    "RLHF": {"gini": (0.40, 0.10), "effective_rank": (5.0, 2.0), "smoothness": (0.75, 0.10), "tail_share": (0.35, 0.10)},
    "CAI": {"gini": (0.30, 0.10), "effective_rank": (4.0, 2.0), "smoothness": (0.80, 0.10), "tail_share": (0.30, 0.10)},
    "SFT": {"gini": (0.20, 0.10), "effective_rank": (2.5, 1.5), "smoothness": (0.90, 0.06), "tail_share": (0.20, 0.08)},
}


def classify(figures: dict, templates: dict) -> dict:
    """Softmax over methods of the Gaussian log-likelihood ``-sum_f (x_f - mu_f)^2 / (2 sd_f^2)`` of the figures
    under each method's template (an UNVALIDATED heuristic; see :data:`TEMPLATES`).

    Raises:
        ToolkitError: no template, a template figure missing from ``figures``, or a mean or spread that is not a
            finite number (spreads must be > 0).
    """
    if not templates:
        raise ToolkitError("no method templates to classify with")
    logl = {}
    for method, tpl in templates.items():
        s = 0.0
        for f, (mu, sd) in tpl.items():
            if f not in figures or figures[f] is None or not math.isfinite(figures[f]):
                raise ToolkitError(f"template {method!r} uses figure {f!r}, which this run lacks")
            if not (math.isfinite(sd) and sd > 0 and math.isfinite(mu)):
                raise ToolkitError(f"template {method!r}: mean and spread of {f!r} must be finite and the spread > 0")
            s -= (figures[f] - mu) ** 2 / (2 * sd * sd)
        logl[method] = s
    m = max(logl.values())
    z = sum(math.exp(v - m) for v in logl.values())
    return {k: math.exp(v - m) / z for k, v in logl.items()}


def _templates(path: Path | None) -> dict:
    if path is None:
        return TEMPLATES
    try:
        data = json.loads(Path(path).read_text())
        tpls = {m: {f: (float(v[0]), float(v[1])) for f, v in tpl.items()} for m, tpl in data.items()}
    except (OSError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise ToolkitError(f"--templates {path}: expected JSON {{method: {{figure: [mean, sd]}}}} ({e})") from None
    if not tpls or not all(tpls.values()):
        raise ToolkitError(f"--templates {path}: no method, or a method without figures")
    for m, tpl in tpls.items():
        for f, (mu, sd) in tpl.items():
            if not (math.isfinite(mu) and math.isfinite(sd) and sd > 0):
                raise ToolkitError(f"--templates {path}: {m!r} {f!r}: mean and spread must be finite, the spread > 0")
    return tpls


class ImprintConfig(RunOptions):
    """The options of ``refusal imprint``."""

    # not from $REFUSAL_RUNS: that variable names the runs folder
    runs: Annotated[Optional[list[str]], Cli(argument=True, env=False, metavar="[RUN...]")] = Field(
        None, description="cones, geometry or extract run folders, e.g. runs/cones/NAME (optional with --spread)")
    spread: list[str] = Field([], description="RUN_A:RUN_B, two runs of one model on disjoint prompt halves (e.g. "
                              "`refusal geometry --half a` and `--half b`): that model's figures as the mean of the "
                              "halves with the spread |A - B| (repeatable, one per model); models are compared "
                              "pairwise, each difference beside the two spreads")
    position: Optional[int] = Field(None, description="post-instruction position of an extract run's candidates "
                                    "[default: the run's chosen position]")
    classify: bool = Field(False, description="also print training-method probabilities from hand-set templates: an "
                           "UNVALIDATED heuristic, off by default")
    templates: Optional[Path] = Field(None, description="JSON {method: {figure: [mean, sd]}} for --classify")
    plot: bool = Field(True, description="write imprint.png")


def _pairs(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 2 or not all(parts):
            raise ToolkitError(f"expected RUN_A:RUN_B (two runs of one model on disjoint prompt halves), got {spec!r}",
                               param="spread")
        pairs.append((parts[0], parts[1]))
    return pairs


def check_halves(a: DirectionSet, b: DirectionSet, n_a: int | None = None, n_b: int | None = None) -> str | None:
    """Check that two direction runs can be halves of one model's prompts; returns a note when their disjointness
    is not recorded (runs made without ``--half``), else None.

    Raises:
        ToolkitError: different models (hash, width or recorded depth ``n_a``/``n_b``), sites, positions or
            layers, or halves recorded as not disjoint (the same half, or different split seeds).
    """
    where = f"{a.source}:{b.source}"
    if a.model_hash != b.model_hash or a.d_model != b.d_model:
        raise ToolkitError(f"{where}: runs of different models ({a.model_id}, hash {str(a.model_hash)[:12]}; "
                           f"{b.model_id}, hash {str(b.model_hash)[:12]}) cannot be halves of one model's prompts",
                           param="spread")
    if n_a != n_b:
        raise ToolkitError(f"{where}: the runs record models of {n_a} and {n_b} layers", param="spread")
    for what in ("site", "position", "layers"):
        if getattr(a, what) != getattr(b, what):
            raise ToolkitError(f"{where}: the halves differ in {what} ({getattr(a, what)} and {getattr(b, what)})",
                               param="spread")
    ha, hb = a.extra.get("half"), b.extra.get("half")
    if ha is None or hb is None:
        return (f"--spread {where}: not recorded as disjoint prompt halves (made without --half); the spread "
                "assumes they are")
    if ha == hb:
        raise ToolkitError(f"{where}: both runs are half {ha!r}; give half a and half b", param="spread")
    if a.extra.get("half_seed") != b.extra.get("half_seed"):
        raise ToolkitError(f"{where}: the halves were split with different seeds ({a.extra.get('half_seed')} and "
                           f"{b.extra.get('half_seed')}), so they overlap", param="spread")
    return None


def _figures(info: DirectionSet, tpl: dict | None) -> tuple[dict, dict, list[dict], list[str]]:
    """One run's imprint: (figures, its imprint.csv row, its layers.csv rows, notes)."""
    d, layers = info.vectors.double(), list(info.layers)
    rn = None if info.resid_norm is None else info.resid_norm.double()
    norms = d.norm(dim=1)
    scale = rn if rn is not None else torch.ones_like(norms)
    live = contrast_layers(d, scale)
    dead = [layers[i] for i in range(len(layers)) if i not in live]
    notes = [f"{info.source}: layer(s) {dead} have no contrast (zero direction) and are left out"] if dead else []
    if len(live) < 2:
        raise ToolkitError(f"{info.source}: fewer than two layers with a non-zero direction")
    idx = torch.tensor(live)
    figs = imprint(d[idx], [layers[i] for i in live], None if rn is None else rn[idx])
    row = {"run": info.source, "model": info.model_id, "site": info.site, "position": info.position,
           "n_layers": len(live), **figs}
    if tpl is not None:
        row.update({f"p_{k}": v for k, v in classify(figs, tpl).items()})
    u = d[idx] / norms[idx, None]
    lrows = [{"run": info.source, "layer": layers[i], "strength": float(norms[i]),
              "strength_rel": float(norms[i] / rn[i]) if rn is not None else np.nan,
              "cos_next": float(u[j] @ u[j + 1]) if j + 1 < len(live) else np.nan} for j, i in enumerate(live)]
    return figs, row, lrows, notes


def _with_depth(figs: dict, info: DirectionSet, n_layers) -> dict:
    """The figures plus ``peak_depth``: the peak layer as a fraction of the model's depth (NaN when the run does not
    record the model's number of layers)."""
    ok = isinstance(n_layers, int) and not isinstance(n_layers, bool) and n_layers > 0
    return {**figs, "peak_depth": depth_fraction(int(figs["peak_layer"]), n_layers, info.site or "resid_pre")
            if ok else math.nan}


@command(ImprintConfig)
def imprint_cmd(cfg: ImprintConfig):
    """Alignment imprint (OBLITERATUS's figures): per-layer refusal directions summarised by the Gini
    coefficient of their strengths, effective rank, spectral decay, adjacent-layer smoothness, tail-layer share,
    orthogonality and cumulative angular drift, for one or more runs side by side (the main use is comparing
    models or prompt sets). With two runs of the same model, also the cosine between their directions per layer.

    Across models (directions of different widths cannot be compared, the figures can): --spread A:B per model,
    two runs on disjoint prompt halves (`refusal geometry --half a|b`). A model's value is the mean of its halves,
    its spread |A - B|; for each pair of models each difference is printed beside both spreads and flagged
    "within sampling spread" when |diff| <= spread_a + spread_b (a rough single-draw check, not a test). Runs given
    without --spread are models without a spread. peak_depth = peak layer as a fraction of depth (L/n at
    resid_pre: the share of blocks run; n from run.json).

    Writes runs/imprint/NAME/ with imprint.csv (one row per run), layers.csv (per run and layer), imprint.png and
    run.json; with --spread also spread.csv (per model and figure: halves, value, spread) and differences.csv (per
    pair of models and figure: difference, both spreads, within_spread).
    """
    tpl = _templates(cfg.templates) if cfg.classify else None
    pairs = _pairs(cfg.spread)
    singles = list(cfg.runs or [])
    if not singles and not pairs:
        raise ToolkitError("give at least one run (or `spread` RUN_A:RUN_B)")
    specs = singles + [p for pair in pairs for p in pair]
    infos = [DirectionSet.resolve(p, cfg.position) for p in specs]
    names = [i.source for i in infos]
    if len(set(names)) != len(names):
        raise ToolkitError("the same run is given twice")
    n_layers = {}
    for spec, info in zip(specs, infos):
        model = load_run(spec)[1].get("model") or {}
        n_layers[info.source] = model.get("n_layers")
    rows, lrows, notes, figs = [], [], [], {}
    for info in infos:
        f, row, lr, nt = _figures(info, tpl)
        figs[info.source] = _with_depth(f, info, n_layers[info.source])
        rows.append(row)
        lrows += lr
        notes += nt
    sdf = ddf = None
    if pairs:
        by = dict(zip(specs, infos))
        groups = [(by[s], None) for s in singles] + [(by[a], by[b]) for a, b in pairs]
        for a, b in groups:
            if b is not None:
                note = check_halves(a, b, n_layers[a.source], n_layers[b.source])
                if note:
                    notes.append(note)
        sdf = model_table(groups, figs, n_layers)
        ddf = model_differences(sdf)
    ldf = pd.DataFrame(lrows)
    cross = cross_cosines(infos)
    if len(cross):
        ldf = ldf.merge(cross, on=["run", "layer"], how="left")
    df = pd.DataFrame(rows)
    with Run("imprint", cfg.name, cfg.force) as run:
        run.write_csv("imprint.csv", df)
        run.write_csv("layers.csv", ldf)
        if sdf is not None:
            run.write_csv("spread.csv", sdf)
            run.write_csv("differences.csv", ddf)
        if cfg.plot:
            from toolkit.plots import imprint_plot

            imprint_plot(ldf, run.path("imprint.png"))
        results = {"imprint": df.to_dict("records"), "notes": notes, "definitions": IMPRINT_FIGURES}
        if sdf is not None:
            results["spread"] = {"value": "mean of the two halves' figures", "spread": "|half A - half B|",
                                 "within_spread": "|value_b - value_a| <= spread_a + spread_b",
                                 "peak_depth": "peak_layer as a fraction of depth (toolkit.xmodel.depth_fraction)",
                                 "left_out_of_differences": list(ABSOLUTE_FIGURES)}
        final = run.finish(model=None, prompt_sets=[], seed=None,
                           params=cfg.params(templates=tpl),
                           results=results)
    for n in notes:
        console.print(n, highlight=False)
    print_imprint(df, ldf, tpl)
    if sdf is not None:
        print_spread(sdf, ddf)
    console.print(f"wrote {final}")


def model_table(groups: list[tuple[DirectionSet, DirectionSet | None]], figs: dict, n_layers: dict) -> pd.DataFrame:
    """One row per model and figure: ``model`` (its id; with the run name when an id repeats), ``run_a``,
    ``run_b``, ``n_layers`` (the model's), ``figure``, ``half_a``, ``half_b``, ``value`` and ``spread``
    (:func:`toolkit.xmodel.figure_spread`; a run without halves: its figures, spread NaN)."""
    ids = [a.model_id or a.source for a, _ in groups]
    frames = []
    for (a, b), mid in zip(groups, ids):
        label = mid if ids.count(mid) == 1 else f"{mid} ({a.source})"
        if b is None:
            t = figure_spread(figs[a.source], figs[a.source])
            t["half_b"] = t["spread"] = np.nan
            t["half_a"] = np.nan
        else:
            t = figure_spread(figs[a.source], figs[b.source])
        t.insert(0, "model", label)
        t.insert(1, "run_a", a.source)
        t.insert(2, "run_b", None if b is None else b.source)
        t.insert(3, "n_layers", n_layers.get(a.source))
        frames.append(t)
    return pd.concat(frames, ignore_index=True)


def cross_cosines(infos: list[DirectionSet]) -> pd.DataFrame:
    """Per layer, the cosine between each run's direction and the first run's, for runs of the same model (by
    hash) and width: how much the directions agree across prompt sets or methods."""
    ref = infos[0]
    rows = []
    for info in infos[1:]:
        if info.model_hash != ref.model_hash or info.d_model != ref.d_model:
            continue
        for i, l in enumerate(info.layers):
            if l in ref.layers:
                a, b = info.vectors[i].double(), ref.vectors[ref.layers.index(l)].double()
                na, nb = float(a.norm()), float(b.norm())
                if na > 0 and nb > 0:
                    rows.append({"run": info.source, "layer": l, "cos_first_run": float(a @ b) / (na * nb)})
    return pd.DataFrame(rows)


def print_imprint(df: pd.DataFrame, ldf: pd.DataFrame, tpl: dict | None) -> None:
    """Print the figures with runs side by side (and the heuristic, clearly labelled, if asked)."""
    t = Table(title="alignment imprint (definitions in run.json and `refusal imprint --help`)", title_justify="left")
    t.add_column("figure")
    for r in df.run:
        t.add_column(r, justify="right")
    for key, desc in IMPRINT_FIGURES.items():
        vals = []
        for v in df[key]:
            vals.append("-" if v is None or (isinstance(v, float) and math.isnan(v)) else
                        str(int(v)) if key == "peak_layer" else f"{v:.3f}")
        t.add_row(key, *vals)
    if "cos_first_run" in ldf.columns:
        m = ldf.groupby("run", sort=False).cos_first_run.mean()
        t.add_row("mean cos with first run", *[f"{m[r]:.3f}" if r in m and pd.notna(m[r]) else "-" for r in df.run])
    out.print(t)
    if tpl is not None:
        t = Table(title="UNVALIDATED HEURISTIC: training-method probabilities from hand-set templates "
                  "(softmax of Gaussian log-likelihoods; not evidence of how a model was trained)",
                  title_justify="left")
        t.add_column("method")
        t.add_column("template (mean ± sd)")
        for r in df.run:
            t.add_column(r, justify="right")
        for m, spec in tpl.items():
            t.add_row(m, ", ".join(f"{f} {mu:g}±{sd:g}" for f, (mu, sd) in spec.items()),
                      *[f"{p:.2f}" for p in df[f"p_{m}"]])
        out.print(t)


def print_spread(sdf: pd.DataFrame, ddf: pd.DataFrame) -> None:
    """Print the cross-model table: per figure, each model's value ± spread, then each pair's difference flagged
    within or beyond the sum of the two spreads."""
    t = Table(title="across models: value ± spread (|half A - half B|); difference B - A, 'within' when "
              "|diff| <= spread_A + spread_B", title_justify="left")
    t.add_column("figure")
    models = list(dict.fromkeys(sdf.model))
    for m in models:
        t.add_column(m, justify="right")
    pair_names = list(dict.fromkeys(zip(ddf.model_a, ddf.model_b)))
    for a, b in pair_names:
        t.add_column(f"{b} - {a}", justify="right")

    def fmt(v):
        return "-" if pd.isna(v) else f"{v:.3f}"

    for f in dict.fromkeys(sdf.figure):
        cells = []
        for m in models:
            r = sdf[(sdf.model == m) & (sdf.figure == f)]
            if r.empty:
                cells.append("-")
                continue
            v, s = r.value.iloc[0], r.spread.iloc[0]
            cells.append(fmt(v) + ("" if pd.isna(s) else f" ± {s:.3f}"))
        for a, b in pair_names:
            r = ddf[(ddf.model_a == a) & (ddf.model_b == b) & (ddf.figure == f)]
            if r.empty:
                cells.append("-")
                continue
            w = r.within_spread.iloc[0]
            flag = "" if w is None or pd.isna(w) else " within" if w else " BEYOND"
            cells.append(f"{r['diff'].iloc[0]:+.3f}{flag}")
        t.add_row(f, *cells)
    from rich.console import Console

    Console(width=max(out.width, 40 + 22 * (len(models) + len(pair_names))), file=out.file, markup=False).print(t)
