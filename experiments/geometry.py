"""``refusal geometry``: Heretic's per-layer residual geometry table (means, geometric medians, silhouette)."""

from __future__ import annotations

import time
from typing import Literal, Optional

import pandas as pd
import torch
from pydantic import Field
from rich.table import Table
from tqdm.auto import tqdm

from toolkit.directions import DirectionSet
from toolkit.errors import ToolkitError
from toolkit.geometry import residual_geometry
from toolkit.hooks import SITES
from toolkit.index_spec import LayerSpec
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.residuals import residuals
from toolkit.runs import Run

from .shared import ModelOptions, PromptPosition, RunOptions, Site, command, console, out

COLUMNS = [("cos_g_b", "S(g,b)"), ("cos_gm_bm", "S(g*,b*)"), ("cos_g_r", "S(g,r)"), ("cos_gm_rm", "S(g*,r*)"),
           ("cos_b_r", "S(b,r)"), ("cos_bm_rm", "S(b*,r*)"), ("norm_g", "|g|"), ("norm_gm", "|g*|"),
           ("norm_b", "|b|"), ("norm_bm", "|b*|"), ("norm_r", "|r|"), ("norm_rm", "|r*|"), ("silhouette", "Silh")]


class GeometryConfig(ModelOptions, RunOptions):
    """The options of ``refusal geometry``."""

    harmful: str = Field("harmful", description="harmful ('bad') prompt set")
    harmless: str = Field("harmless", description="harmless ('good') prompt set")
    split: str = Field("train", description="split of both sets (files without splits: all prompts)")
    limit: Optional[int] = Field(None, ge=1, description="use at most N prompts per set")
    half: Optional[Literal["a", "b"]] = Field(None, description="use one of two disjoint halves of each set (a seeded "
                                             "hash of the prompt id, --seed; before --limit): runs on halves a and "
                                             "b give `refusal imprint --spread` its prompt-sampling spread")
    layers: Optional[str] = Field(None, description="layers, e.g. '12', '8,12,16' or '4:20' [default: all]")
    site: Site = Field("resid_pre", description=f"hook site: {', '.join(SITES)}")
    position: PromptPosition = Field(-1, description="prompt position (negative index; -1 = last token, as Heretic "
                                     "reads residuals)")
    silhouette: bool = Field(True, description="compute the silhouette column")


@command(GeometryConfig)
def geometry(cfg: GeometryConfig):
    """Residual geometry per layer, as Heretic prints it: cosine similarities between the harmless mean g, the
    harmful mean b and r = b - g and between their geometric-median versions g*, b*, r* = b* - g*; the L2 norm of
    each; and the mean silhouette coefficient of the two clusters.

    With --half a|b only one of two disjoint, seeded halves of each prompt set is used (recorded in run.json and
    the directions file), for the prompt-sampling spread of `refusal imprint --spread`.

    Writes runs/geometry/NAME/ with geometry.csv, directions.safetensors (r and r* per layer with both means and
    the mean residual norm: an input of `refusal imprint`) and run.json.
    """
    site, position = cfg.site, cfg.position
    layer_spec = LayerSpec.parse(cfg.layers)  # before the model is loaded
    G = load_prompt_set(cfg.harmless).select(cfg.split).half(cfg.half, cfg.seed).head(cfg.limit)
    B = load_prompt_set(cfg.harmful).select(cfg.split).half(cfg.half, cfg.seed).head(cfg.limit)
    G, B = distinct_names([G, B])
    if len(G) < 2 or len(B) < 2:
        raise ToolkitError(f"the geometry table needs at least two prompts per set (got {len(G)} and {len(B)})")
    with Run("geometry", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        lm = ses.lm
        lay = list(layer_spec.resolve(lm.n_layers))
        t0 = time.time()
        Xg = residuals(ses.runner, G.prompts, lay, site, position, "harmless residuals")
        Xb = residuals(ses.runner, B.prompts, lay, site, position, "harmful residuals")
        run.time("residuals", time.time() - t0)
        t0 = time.time()
        rows, medians = [], []
        for i, l in enumerate(tqdm(lay, desc="geometry", disable=cfg.quiet, leave=False)):
            med: list = []
            row = residual_geometry(Xg[:, i], Xb[:, i], silhouette=cfg.silhouette, medians=med)
            medians.append(med[1] - med[0])
            rows.append({"layer": l, "n_harmless": len(G), "n_harmful": len(B), **row})
        run.time("geometry", time.time() - t0)
        df = pd.DataFrame(rows)
        run.write_csv("geometry.csv", df)
        rm = torch.stack(medians)
        norms = torch.cat([Xg, Xb]).double().norm(dim=-1).mean(0)
        DirectionSet(Xb.double().mean(0) - Xg.double().mean(0), lay, site=site, position=position,
                     model_hash=lm.model_hash, model_id=lm.model_id,
                     method="difference-in-means per layer: mean harmful - mean harmless",
                     extra={"kind": "geometry", "split": cfg.split,
                            **({} if cfg.half is None else {"half": cfg.half, "half_seed": cfg.seed})},
                     tensors={"median_directions": rm, "mean_harmful": Xb.double().mean(0),
                              "mean_harmless": Xg.double().mean(0), "resid_norm": norms}
                     ).save(run.path("directions.safetensors"))
        best = df.loc[df.silhouette.idxmax()] if cfg.silhouette and df.silhouette.notna().any() else None
        results = {"layers": lay, "best_silhouette": None if best is None else
                   {"layer": int(best.layer), "silhouette": float(best.silhouette)}}
        final = run.finish(model=lm.describe(), prompt_sets=[G.describe(), B.describe()], seed=cfg.seed,
                           params=cfg.params(), results=results)
    print_geometry(df, site, position)
    console.print(f"wrote {final}")


def print_geometry(df: pd.DataFrame, site: str, position: int) -> None:
    """Print the geometry table (Heretic's layout) to stdout."""
    t = Table(title=f"residual geometry ({site}, position {position}; g = harmless mean, b = harmful mean, "
              "r = b - g, * = geometric median)", title_justify="left")
    t.add_column("Layer", justify="right")
    for _, label in COLUMNS:
        t.add_column(label, justify="right")
    for _, r in df.iterrows():
        vals = []
        for key, _ in COLUMNS:
            v = r[key]
            vals.append("-" if pd.isna(v) else f"{v:.4f}" if key.startswith(("cos", "sil")) else f"{v:.2f}")
        t.add_row(str(int(r.layer)), *vals)
    from rich.console import Console

    Console(width=max(out.width, 160), file=out.file, markup=False).print(t)  # 14 columns: never squeeze the figures
