"""``refusal plot-residuals``: per-layer 2-D projections (PaCMAP or PCA) of several prompt sets' residuals."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field
from rich.table import Table

from toolkit.errors import ToolkitError
from toolkit.hooks import SITES
from toolkit.index_spec import LayerSpec
from toolkit.plots import check_colors, default_colors, draw_frames, write_gif
from toolkit.projection import METHODS, PACMAP_NEIGHBORS, min_points, project_layers
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.residuals import residuals
from toolkit.runs import Run

from .shared import (FiniteFloat, Invalid, ModelOptions, PromptPosition, RunOptions, Site, command, console,
                     out)


def _split_list(text: str | None) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if text else []


class PlotResidualsConfig(ModelOptions, RunOptions):
    """The options of ``refusal plot-residuals``."""

    sets: str = Field("harmless,harmful", description="comma-separated prompt sets (built-in names or files), 2 or "
                      "more; the first is the reference, drawn on the left")
    labels: Optional[str] = Field(None, description="comma-separated legend labels, one per set (default: the set "
                                  "names)")
    colors: Optional[str] = Field(None, description="comma-separated matplotlib colours, one per set, e.g. "
                                  "'tab:blue,#c44e52' (default: seaborn deep: blue, red, green, ...)")
    split: str = Field("train", description="train, val, test or all (files without splits: all)")
    limit: Optional[int] = Field(None, ge=1, description="at most N prompts per set")
    layers: Optional[str] = Field(None, description="layers, e.g. '12' or '4,8,12' or '0:24' (half-open) "
                                  "(default: every layer)")
    site: Site = Field("resid_pre", description=f"hook site: {', '.join(SITES)}")
    position: PromptPosition = Field(-1, description="prompt position read, a negative index from the end (-1: the "
                                     "last prompt token, as Heretic reads residuals)")
    method: Annotated[Literal[METHODS], Invalid("unknown projection method {value!r}; choose one of {choices}")] = \
        Field("pacmap", description=f"projection: {' or '.join(METHODS)} (fast)")
    neighbors: int = Field(PACMAP_NEIGHBORS, ge=1, description="PaCMAP near neighbours (lowered automatically for "
                           "few points)")
    gif: bool = Field(True, description="also join the layers' pictures into residuals.gif")
    fps: Annotated[FiniteFloat, Field(gt=0)] = Field(2.0, description="GIF frames (layers) per second")


@command(PlotResidualsConfig)
def plot_residuals(cfg: PlotResidualsConfig):
    """Plot residuals: per-layer 2-D projections of the prompt sets' activations at one site and position,
    oriented so the first (reference) set is on the left, with each layer's silhouette of the sets.

    Writes runs/plot-residuals/NAME/ with projection.csv (layer, set, label, id, x, y), separation.csv
    (silhouette per layer, in 2-D and in the full residual space), layer_<LL>.png per layer, residuals.gif and
    run.json.
    """
    site, position, method = cfg.site, cfg.position, cfg.method
    set_specs = _split_list(cfg.sets)
    if len(set_specs) < 2:
        raise ToolkitError(f"--sets needs 2 or more prompt sets (the first is the reference), got {len(set_specs)}")
    label_list = _split_list(cfg.labels)
    if cfg.labels is not None and len(label_list) != len(set_specs):
        raise ToolkitError(f"--labels has {len(label_list)} entries for {len(set_specs)} sets")
    color_list = _split_list(cfg.colors)
    if cfg.colors is not None and len(color_list) != len(set_specs):
        raise ToolkitError(f"--colors has {len(color_list)} entries for {len(set_specs)} sets")
    check_colors(color_list)
    layer_spec = LayerSpec.parse(cfg.layers)  # before the model is loaded
    loaded = []
    for s in set_specs:
        ps = load_prompt_set(s)
        loaded.append(ps.select(cfg.split).head(cfg.limit))
    loaded = distinct_names(loaded)
    label_list = label_list or [ps.name for ps in loaded]
    if len(set(label_list)) != len(label_list):
        raise ToolkitError(f"labels must differ between sets, got {', '.join(label_list)} (give --labels)")
    color_list = color_list or default_colors(len(loaded))
    n_points = sum(len(ps) for ps in loaded)
    if n_points < min_points(method):
        raise ToolkitError(f"--method {method} needs at least {min_points(method)} prompts in all, got {n_points}"
                           + ("; use more prompts or --method pca" if method == "pacmap" else ""))

    with Run("plot-residuals", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        r, lm = ses.runner, ses.lm
        lays = list(layer_spec.resolve(lm.n_layers))

        # one pass over every set's prompts, stopping after the last needed layer
        t0 = time.time()
        prompts, groups = [], []
        for gi, ps in enumerate(loaded):
            prompts += ps.prompts
            groups += [gi] * len(ps)
        groups = np.array(groups)
        acts = residuals(r, prompts, lays, site, position, "residuals")
        run.time("collect", time.time() - t0)

        from tqdm.auto import tqdm

        hide = cfg.quiet or not sys.stderr.isatty()  # as the runner's own bars
        t0 = time.time()
        with tqdm(total=len(lays), desc=f"project ({method})", unit="layer", disable=hide, leave=False,
                  dynamic_ncols=True) as bar:
            frames = project_layers(acts, groups, lays, method, seed=cfg.seed, n_neighbors=cfg.neighbors,
                                    progress=bar.update)
        run.time("project", time.time() - t0)

        t0 = time.time()
        width = max(2, len(str(lm.n_layers - 1)))
        pngs = [run.path(f"layer_{f.layer:0{width}d}.png") for f in frames]
        with tqdm(total=len(frames), desc="draw", unit="layer", disable=hide, leave=False,
                  dynamic_ncols=True) as bar:
            draw_frames(frames, groups, label_list, color_list, pngs, site=site, position=position, method=method,
                        model=_model_label(lm.model_id), progress=bar.update)
        if cfg.gif:
            write_gif(pngs, run.path("residuals.gif"), cfg.fps)
        run.time("draw", time.time() - t0)

        rows = []
        for f in frames:
            for gi, ps in enumerate(loaded):
                sel = np.flatnonzero(groups == gi)
                for j, rec in zip(sel, ps.records):
                    rows.append({"layer": f.layer, "set": ps.name, "label": label_list[gi], "id": rec["id"],
                                 "x": float(f.points[j, 0]), "y": float(f.points[j, 1])})
        sep = pd.DataFrame([_separation_row(f, method) for f in frames])
        run.write_csv("projection.csv", pd.DataFrame(rows, columns=["layer", "set", "label", "id", "x", "y"]))
        run.write_csv("separation.csv", sep)
        best = sep.dropna(subset=["silhouette_full"])
        results = {"layers": lays, "n_points": len(groups),
                   "counts": {label_list[i]: int((groups == i).sum()) for i in range(len(loaded))},
                   "separation": sep.to_dict(orient="records"),
                   "best_layer_full": int(best.loc[best.silhouette_full.idxmax(), "layer"]) if len(best) else None,
                   "separation_measure": "silhouette coefficient by set (scikit-learn, Euclidean) of the oriented "
                                         "2-D points and of the full activations",
                   "files": ["projection.csv", "separation.csv"] + [p.name for p in pngs]
                   + (["residuals.gif"] if cfg.gif else [])}
        final = run.finish(model=lm.describe(), prompt_sets=[ps.describe() | {"label": lab, "color": col}
                                                             for ps, lab, col in zip(loaded, label_list, color_list)],
                           seed=cfg.seed,
                           # the sets, labels, colours and layers as resolved (lists), as before the config
                           params=cfg.params(sets=set_specs, labels=label_list, colors=color_list, layers=lays),
                           results=results)
    _print_separation(sep, label_list)
    console.print(f"wrote {final}")


def _model_label(model_id: str) -> str:
    """A short model name for the pictures: the default model's name, a local folder's or file's name, or the id."""
    from toolkit.default_model import DEFAULT_MODEL_ALIAS, DEFAULT_MODEL_NAME

    if model_id == DEFAULT_MODEL_ALIAS:
        return DEFAULT_MODEL_NAME
    return Path(model_id).name if Path(model_id).exists() else model_id


def _separation_row(f, method: str) -> dict:
    row = {"layer": f.layer, "silhouette_2d": f.silhouette_2d, "silhouette_full": f.silhouette_full,
           "degenerate": f.degenerate}
    if method == "pca":
        ev = f.info.get("explained_variance_ratio") or [float("nan")] * 2
        row.update({"explained_variance_pc1": ev[0], "explained_variance_pc2": ev[1]})
    else:
        row["n_neighbors"] = f.info.get("n_neighbors")
    return row


def _print_separation(sep: pd.DataFrame, labels: list[str]) -> None:
    """Print the silhouette per layer."""
    t = Table(title="silhouette per layer", caption=f"sets: {', '.join(labels)}", title_justify="left",
              caption_justify="left")
    for c in ("layer", "2-D", "full"):
        t.add_column(c, justify="right")
    for _, r in sep.iterrows():
        fmt = (lambda v: "-" if pd.isna(v) else f"{v:.2f}")
        t.add_row(str(int(r["layer"])), fmt(r["silhouette_2d"]), fmt(r["silhouette_full"]))
    out.print(t)
