"""``refusal depth``: where refusal lives, per model, as fractions of depth (patching peak and direction layer)."""

from __future__ import annotations

from typing import Annotated, Literal

import pandas as pd
from pydantic import Field
from rich.table import Table

from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.patching import DIRECTIONS
from toolkit.runs import Run, load_run, read_run_table
from toolkit.xmodel import depth_fraction, patch_peak

from .shared import Cli, RunOptions, command, console, out

KINDS = ("patch", "extract")
COLUMNS = ["model", "model_hash", "n_layers", "patch_run", "patch_layer", "patch_site", "patch_positions",
           "patch_effect", "patch_depth", "extract_run", "extract_layer", "extract_site", "extract_depth"]


class DepthConfig(RunOptions):
    """The options of ``refusal depth``."""

    # not from $REFUSAL_RUNS: that variable names the runs folder
    runs: Annotated[list[str], Cli(argument=True, env=False, metavar="RUN...")] = Field(
        ..., description="patch and extract run folders of one or more models, in any order (grouped by model hash)")
    direction: Literal[DIRECTIONS] = Field("denoise", description="patching direction whose peak is taken")
    sites: str = Field("attn_out,mlp_out", description="comma-separated patched sites the peak is taken over (the "
                       "block components by default: resid_* carries everything written so far and peaks late)")


def _n_layers(folder, meta) -> int:
    n = (meta.get("model") or {}).get("n_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ToolkitError(f"{folder}: run.json records no model n_layers")
    return n


def _patch(folder, meta, direction: str, sites: list[str]) -> dict:
    summary = read_run_table(folder / "summary.csv", "patch summary")
    try:
        peak = patch_peak(summary, direction, sites)
    except ToolkitError as e:
        raise ToolkitError(f"{folder}: {e}", param=e.param) from None
    n = _n_layers(folder, meta)
    return {"patch_run": str(folder), "patch_layer": peak["layer"], "patch_site": peak["site"],
            "patch_positions": peak["positions"], "patch_effect": peak["effect"],
            "patch_depth": depth_fraction(peak["layer"], n, peak["site"])}


def _extract(folder, meta) -> dict:
    chosen = (meta.get("results") or {}).get("chosen") or {}
    layer = chosen.get("layer")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ToolkitError(f"{folder}: run.json records no chosen layer")
    site = "resid_pre"  # extract reads resid_pre; version 1 direction files record no site
    if (folder / "direction.safetensors").is_file():
        site = Direction.load(folder / "direction.safetensors").site or site
    n = _n_layers(folder, meta)
    return {"extract_run": str(folder), "extract_layer": layer, "extract_site": site,
            "extract_depth": depth_fraction(layer, n, site)}


def depth_table(specs: list[str], direction: str = "denoise", sites: list[str] = ("attn_out", "mlp_out")
                ) -> pd.DataFrame:
    """One row per model (by hash, in order of first appearance) with its patching peak and chosen direction
    layer as fractions of depth (:func:`toolkit.xmodel.depth_fraction`; columns :data:`COLUMNS`, NaN for a kind
    of run a model lacks).

    Raises:
        ToolkitError: a run that is neither patch nor extract, two runs of one kind for one model, runs of one
            hash recording different depths, a run without model n_layers, a patch run without the asked
            components, or an extract run without a chosen layer.
    """
    rows: dict[str, dict] = {}
    for spec in specs:
        folder, meta = load_run(spec)
        cmd = meta.get("command")
        if cmd not in KINDS:
            raise ToolkitError(f"{folder} is a '{cmd}' run; depth reads patch and extract runs")
        model = meta.get("model") or {}
        key = model.get("hash") or model.get("id") or str(folder)
        n = _n_layers(folder, meta)
        row = rows.setdefault(key, {"model": model.get("id"), "model_hash": model.get("hash"), "n_layers": n})
        if row["n_layers"] != n:
            raise ToolkitError(f"{folder}: model {row['model']} recorded with {row['n_layers']} and {n} layers")
        if f"{cmd}_run" in row:
            raise ToolkitError(f"two {cmd} runs of model {row['model']} ({row[f'{cmd}_run']} and {folder}): give one "
                               "per model")
        row.update(_patch(folder, meta, direction, list(sites)) if cmd == "patch" else _extract(folder, meta))
    return pd.DataFrame(list(rows.values()), columns=COLUMNS)


@command(DepthConfig)
def depth(cfg: DepthConfig):
    """Where refusal lives, per model, as fractions of its depth so that models of 24, 28 or 30 layers compare:
    the activation-patching peak (the single site x layer x position component of a patch run with the largest
    effect, at --sites in --direction) and the layer of an extract run's chosen direction. Depth fraction =
    (L + o) / n_layers with o the part of block L done at the site read: 0 at resid_pre (extract's directions,
    L blocks have run), 0.5 inside the block (attn_out, mlp_out), 1 at resid_post; n_layers from each run's
    run.json.

    Writes runs/depth/NAME/ with depth.csv (one row per model) and run.json.
    """
    sites = [s.strip() for s in cfg.sites.split(",") if s.strip()]
    if not sites:
        raise ToolkitError("give at least one site", param="sites")
    df = depth_table(cfg.runs, cfg.direction, sites)
    with Run("depth", cfg.name, cfg.force) as run:
        run.write_csv("depth.csv", df)
        final = run.finish(model=None, prompt_sets=[], seed=None, params=cfg.params(),
                           results={"models": df.astype(object).where(df.notna(), None).to_dict("records"),
                                    "depth_fraction": "(layer + offset) / n_layers; offset 0 at resid_pre, 0.5 "
                                    "inside the block (attn_out, mlp_out, resid_mid), 1 at resid_post"})
    print_depth(df)
    console.print(f"wrote {final}")


def print_depth(df: pd.DataFrame) -> None:
    """Print one row per model: depth, patching peak and direction layer (layer, site, fraction of depth)."""
    t = Table(title="where refusal lives, as a fraction of depth ((L + offset) / n_layers)", title_justify="left")
    for c in ("model", "layers", "patch peak", "patch depth", "direction layer", "direction depth"):
        t.add_column(c, justify="left" if c == "model" else "right")
    for _, r in df.iterrows():
        peak = "-" if pd.isna(r.patch_layer) else f"{int(r.patch_layer)} {r.patch_site} ({r.patch_effect:.2f})"
        t.add_row(str(r.model), str(r.n_layers), peak, "-" if pd.isna(r.patch_depth) else f"{r.patch_depth:.3f}",
                  "-" if pd.isna(r.extract_layer) else f"{int(r.extract_layer)} {r.extract_site}",
                  "-" if pd.isna(r.extract_depth) else f"{r.extract_depth:.3f}")
    out.print(t)
