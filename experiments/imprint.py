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
from toolkit.runs import Run

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
    runs: Annotated[list[str], Cli(argument=True, env=False, metavar="RUN...")] = Field(
        ..., description="cones, geometry or extract run folders, e.g. runs/cones/NAME")
    position: Optional[int] = Field(None, description="post-instruction position of an extract run's candidates "
                                    "[default: the run's chosen position]")
    classify: bool = Field(False, description="also print training-method probabilities from hand-set templates: an "
                           "UNVALIDATED heuristic, off by default")
    templates: Optional[Path] = Field(None, description="JSON {method: {figure: [mean, sd]}} for --classify")
    plot: bool = Field(True, description="write imprint.png")


@command(ImprintConfig)
def imprint_cmd(cfg: ImprintConfig):
    """Alignment imprint (OBLITERATUS's figures): per-layer refusal directions summarised by the Gini
    coefficient of their strengths, effective rank, spectral decay, adjacent-layer smoothness, tail-layer share,
    orthogonality and cumulative angular drift, for one or more runs side by side (the main use is comparing
    models or prompt sets). With two runs of the same model, also the cosine between their directions per layer.

    Writes runs/imprint/NAME/ with imprint.csv (one row per run), layers.csv (per run and layer), imprint.png and
    run.json.
    """
    tpl = _templates(cfg.templates) if cfg.classify else None
    infos = [DirectionSet.resolve(p, cfg.position) for p in cfg.runs]
    names = [i.source for i in infos]
    if len(set(names)) != len(names):
        raise ToolkitError("the same run is given twice")
    rows, lrows, notes = [], [], []
    for info in infos:
        d, layers = info.vectors.double(), list(info.layers)
        rn = None if info.resid_norm is None else info.resid_norm.double()
        norms = d.norm(dim=1)
        scale = rn if rn is not None else torch.ones_like(norms)
        live = contrast_layers(d, scale)
        dead = [layers[i] for i in range(len(layers)) if i not in live]
        if dead:
            notes.append(f"{info.source}: layer(s) {dead} have no contrast (zero direction) and are left out")
        if len(live) < 2:
            raise ToolkitError(f"{info.source}: fewer than two layers with a non-zero direction")
        idx = torch.tensor(live)
        figs = imprint(d[idx], [layers[i] for i in live], None if rn is None else rn[idx])
        row = {"run": info.source, "model": info.model_id, "site": info.site, "position": info.position,
               "n_layers": len(live), **figs}
        if tpl is not None:
            row.update({f"p_{k}": v for k, v in classify(figs, tpl).items()})
        rows.append(row)
        u = d[idx] / norms[idx, None]
        for j, i in enumerate(live):
            lrows.append({"run": info.source, "layer": layers[i], "strength": float(norms[i]),
                          "strength_rel": float(norms[i] / rn[i]) if rn is not None else np.nan,
                          "cos_next": float(u[j] @ u[j + 1]) if j + 1 < len(live) else np.nan})
    ldf = pd.DataFrame(lrows)
    cross = cross_cosines(infos)
    if len(cross):
        ldf = ldf.merge(cross, on=["run", "layer"], how="left")
    df = pd.DataFrame(rows)
    with Run("imprint", cfg.name, cfg.force) as run:
        run.write_csv("imprint.csv", df)
        run.write_csv("layers.csv", ldf)
        if cfg.plot:
            from toolkit.plots import imprint_plot

            imprint_plot(ldf, run.path("imprint.png"))
        final = run.finish(model=None, prompt_sets=[], seed=None,
                           params=cfg.params(templates=tpl),
                           results={"imprint": df.to_dict("records"), "notes": notes,
                                    "definitions": IMPRINT_FIGURES})
    for n in notes:
        console.print(n, highlight=False)
    print_imprint(df, ldf, tpl)
    console.print(f"wrote {final}")


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
