"""``refusal cones``: per-category refusal directions (concept cones) with bootstrap intervals and a null."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from rich.console import Console
from rich.table import Table

from toolkit.cones import ablation_test, cone_tables, pick_layer, separation
from toolkit.directions import DirectionSet
from toolkit.errors import ToolkitError
from toolkit.geometry import (LINEAR_MAX_DIM, LINEAR_MIN_COS, POLY_MAX_COS, POLY_MIN_DIM, cone_distributions,
                              contrast_layers, kmeans_scan)
from toolkit.hooks import SITES
from toolkit.index_spec import LayerSpec
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.residuals import residuals
from toolkit.runs import Run

from .shared import Invalid, ModelOptions, PromptPosition, RunOptions, Site, command, console, out


class ConesConfig(ModelOptions, RunOptions):
    """``refusal cones``' options."""

    harmful: str = Field("harmful", description="harmful prompt set with a category per prompt")
    harmless: str = Field("harmless", description="harmless prompt set")
    split: str = Field("train", description="split the cones are computed on (files without splits: all prompts)")
    max_per_category: Optional[int] = Field(None, ge=1, description="use at most N prompts per category (and N x "
                                            "categories harmless prompts)")
    min_per_category: Annotated[int, Field(ge=2), Invalid("must be at least 2: a direction from one prompt has no "
                                                          "interval, got {value}")] = Field(
        10, description="categories with fewer prompts are reported, not analysed")
    layers: Optional[str] = Field(None, description="layers, e.g. '12', '8,12,16' or '4:20' [default: all]")
    site: Site = Field("resid_pre", description=f"hook site: {', '.join(SITES)}")
    position: PromptPosition = Field(-1, description="prompt position (negative index; -1 = last token)")
    boot: int = Field(200, ge=0, description="bootstrap resamples (prompts resampled within categories)")
    null: int = Field(200, ge=0, description="random splits of the harmful prompts into groups of the same sizes "
                      "(the null)")
    kmeans: bool = Field(True, description="k-means of harmful residuals vs the labels")
    k_max: int = Field(12, ge=2, description="largest k tried by k-means")
    report_layer: Optional[int] = Field(None, description="layer of the per-category table and the ablation test "
                                        "[default: the best-separating layer below 80 % depth]")
    ablate_test: bool = Field(False, description="also ablate the single pooled direction, all category directions, "
                              "and the single one plus random directions of the same total dimension, and score "
                              "each category's held-out prompts")
    eval_split: str = Field("test", description="split scored by the ablation test")
    eval_harmless: int = Field(60, ge=0, description="harmless prompts scored by the ablation test (for the KL and "
                               "the harmless score)")
    plot: bool = Field(True, description="write cones.png")


@command(ConesConfig)
def cones(cfg: ConesConfig):
    """Concept cones (OBLITERATUS's method, with intervals and a null): per harm category, the direction
    mean_harmful_c - mean_harmless at each layer, its strength, pairwise cosines, specificity and the cone's
    dimensionality (entropy effective rank), each with a bootstrap 95 % interval over prompts and the same
    figures for random groups of the same sizes; k-means clusters against the labels; optionally an ablation test.

    Writes runs/cones/NAME/ with cones.csv (per layer), categories.csv (per layer and category), pairs.csv
    (pairwise cosines), kmeans.csv, ablation.csv (with --ablate-test), directions.safetensors (pooled and
    per-category directions, means and residual norms per layer: an input of `refusal imprint`), cones.png and
    run.json.
    """
    boot, null, site, position, seed = cfg.boot, cfg.null, cfg.site, cfg.position, cfg.seed
    min_per_category, max_per_category = cfg.min_per_category, cfg.max_per_category
    if boot and boot < 20 or null and null < 20:
        raise ToolkitError("use at least 20 resamples for `boot` and `null` (or 0 to skip)")
    layer_spec = LayerSpec.parse(cfg.layers)  # before the model is loaded
    H = load_prompt_set(cfg.harmful).select(cfg.split)
    G = load_prompt_set(cfg.harmless).select(cfg.split)
    H, G = distinct_names([H, G])
    counts = pd.Series([r["category"] for r in H.records]).value_counts().sort_index()
    kept = [c for c, n in counts.items() if n >= min_per_category]
    excluded = {c: int(n) for c, n in counts.items() if n < min_per_category}
    if len(kept) < 2:
        raise ToolkitError(f"cones need at least two categories with >= {min_per_category} prompts; "
                           f"{H.name} ({H.split or 'all'}) has "
                           + ", ".join(f"{c}: {int(n)}" for c, n in counts.items()))
    keep_idx, seen = [], {c: 0 for c in kept}
    for i, r in enumerate(H.records):
        c = r["category"]
        if c in seen and (max_per_category is None or seen[c] < max_per_category):
            keep_idx.append(i)
            seen[c] += 1
    H = H.subset(keep_idx)
    if max_per_category is not None:
        G = G.head(max_per_category * len(kept))
    if len(G) < 2:
        raise ToolkitError(f"the harmless set {G.name} has {len(G)} prompt(s); at least two are needed")
    labels = [r["category"] for r in H.records]
    for c, n in excluded.items():
        console.print(f"category {c!r}: {n} prompt(s) < --min-per-category {min_per_category}: reported, "
                      "not analysed", highlight=False)
    with Run("cones", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        r, lm = ses.runner, ses.lm
        lay = list(layer_spec.resolve(lm.n_layers))
        t0 = time.time()
        Xh = residuals(r, H.prompts, lay, site, position, "harmful residuals")
        Xg = residuals(r, G.prompts, lay, site, position, "harmless residuals")
        run.time("residuals", time.time() - t0)
        norms = torch.cat([Xh, Xg]).double().norm(dim=-1).mean(0)  # [L]
        pooled = Xh.double().mean(0) - Xg.double().mean(0)  # [L, d]
        live = contrast_layers(pooled, norms)
        dead = [lay[i] for i in range(len(lay)) if i not in live]
        if dead:
            console.print(f"no contrast at layer(s) {dead} (harmful and harmless residuals coincide at this "
                          "position): skipped", highlight=False)
        if len(live) == 0:
            raise ToolkitError("no layer has a contrast between the sets at this site and position")
        lay_l = [lay[i] for i in live]
        Xh_l, Xg_l = Xh[:, live], Xg[:, live]
        sep = separation(Xh_l, Xg_l)
        rep = cfg.report_layer if cfg.report_layer is not None else pick_layer(lay_l, sep, lm.n_layers)
        if rep not in lay_l:
            raise ToolkitError(f"{rep} is not among the analysed layers {lay_l}", param="report_layer")
        t0 = time.time()
        from tqdm.auto import tqdm

        with tqdm(total=boot + null, desc="bootstrap + null", disable=cfg.quiet, leave=False) as bar:
            dist = cone_distributions(Xh_l, labels, Xg_l, n_boot=boot, n_null=null, seed=seed, progress=bar.update)
        run.time("bootstrap", time.time() - t0)
        cats, sizes = dist["categories"], dist["sizes"]
        lab = np.asarray(labels)
        cat_dirs = torch.stack([Xh_l[torch.from_numpy(np.flatnonzero(lab == c))].double().mean(0) for c in cats]) \
            - Xg_l.double().mean(0)  # [k, L, d]
        tables = cone_tables(dist, lay_l, norms[live].numpy(), pooled[live], sep, cat_dirs)
        km = pd.DataFrame()
        if cfg.kmeans:
            t0 = time.time()
            ks = [k for k in range(2, cfg.k_max + 1) if k < len(H)]
            rows = []
            for i, l in enumerate(tqdm(lay_l, desc="k-means", disable=cfg.quiet, leave=False)):
                for res in kmeans_scan(Xh_l[:, i], labels, ks, seed=seed):
                    rows.append({"layer": l, **res})
            km = pd.DataFrame(rows)
            run.time("kmeans", time.time() - t0)
            if len(km):
                best = km.loc[km.groupby("layer").silhouette.idxmax()].set_index("layer")
                at_c = km[km.k == len(cats)].set_index("layer")
                tables["cones"]["kmeans_best_k"] = tables["cones"].layer.map(best.k)
                tables["cones"]["kmeans_best_silhouette"] = tables["cones"].layer.map(best.silhouette)
                tables["cones"][f"ari_k{len(cats)}"] = tables["cones"].layer.map(at_c.ari) if len(at_c) else np.nan
            run.write_csv("kmeans.csv", km)
        run.write_csv("cones.csv", tables["cones"])
        run.write_csv("categories.csv", tables["categories"])
        run.write_csv("pairs.csv", tables["pairs"])
        ri = lay_l.index(rep)
        abl = None
        if cfg.ablate_test:
            t0 = time.time()
            Hs = load_prompt_set(cfg.harmful).select(cfg.eval_split)
            Gs = load_prompt_set(cfg.harmless).select(cfg.eval_split).head(cfg.eval_harmless)
            abl = ablation_test(r, ses.refusal_ids, Hs, Gs, cats, pooled[live][ri], cat_dirs[:, ri], rep, seed)
            run.write_csv("ablation.csv", abl)
            run.time("ablation_test", time.time() - t0)
        DirectionSet(pooled[live], lay_l, site=site, position=position, model_hash=lm.model_hash,
                     model_id=lm.model_id, method="difference-in-means per layer: mean harmful - mean harmless (per "
                     "category and pooled)", extra={"categories": cats, "kind": "cones", "split": cfg.split},
                     tensors={"category_directions": cat_dirs, "mean_harmful": Xh_l.double().mean(0),
                              "mean_harmless": Xg_l.double().mean(0), "resid_norm": norms[live]}
                     ).save(run.path("directions.safetensors"))
        if cfg.plot:
            from toolkit.plots import cones_plot

            cones_plot(tables["cones"], tables["pairs"], rep, run.path("cones.png"))
        cones_df = tables["cones"]
        labels_count = cones_df.label.value_counts().to_dict()
        results = {"categories": dict(zip(cats, sizes)), "excluded_categories": excluded, "report_layer": rep,
                   "layers_without_contrast": dead, "labels": labels_count,
                   "thresholds": {"linear": f"mean |cos| CI low > {LINEAR_MIN_COS} and dim CI high < {LINEAR_MAX_DIM}",
                                  "polyhedral": f"(mean |cos| CI high < {POLY_MAX_COS} or dim CI low > "
                                                f"{POLY_MIN_DIM}) and permutation p < 0.05 against random groups for "
                                                "|cos| or dim; the share of random-group draws meeting the same rule "
                                                "is reported (null_polyhedral_share), not required",
                                  "intervals": "basic bootstrap 95 % (prompts resampled within categories)"},
                   "report": cones_df[cones_df.layer == rep].iloc[0].to_dict()}
        if abl is not None:
            results["ablation"] = abl.to_dict("records")
        final = run.finish(model=lm.describe(), prompt_sets=[H.describe(), G.describe()], seed=seed,
                           params=cfg.params(layers=lay), results=results)
    print_cones(cones_df, tables["categories"], rep, excluded, len(cats))
    if abl is not None:
        print_ablation(abl)
    console.print(f"wrote {final}")


def _fmt_ci(v, lo, hi, nd=2) -> str:
    if pd.isna(lo):
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{lo:.{nd}f}, {hi:.{nd}f}]"


def print_cones(df: pd.DataFrame, cat: pd.DataFrame, rep: int, excluded: dict, k: int) -> None:
    """Print the per-layer cone table and the per-category table at the report layer."""
    t = Table(title=f"concept cones of {k} categories (basic bootstrap 95 % CI; null = 95 % band of random groups "
              "of the same sizes; p = permutation p, |cos| below / dim above the null)", title_justify="left")
    ari = f"ARI k={k}"
    for c in ("layer", "mean |cos| [CI]", "null", "p", "dim [CI]", "null ", "p ", "rel. strength", ari, "label"):
        t.add_column(c, justify="left" if c == "label" else "right")
    for _, r in df.iterrows():
        t.add_row(str(r.layer), _fmt_ci(r.mean_abs_cos, r.cos_ci_low, r.cos_ci_high),
                  f"{r.cos_null_low:.2f}-{r.cos_null_high:.2f}" if pd.notna(r.cos_null_low) else "-",
                  f"{r.p_cos_below_null:.3f}" if pd.notna(r.p_cos_below_null) else "-",
                  _fmt_ci(r.dim, r.dim_ci_low, r.dim_ci_high),
                  f"{r.dim_null_low:.2f}-{r.dim_null_high:.2f}" if pd.notna(r.dim_null_low) else "-",
                  f"{r.p_dim_above_null:.3f}" if pd.notna(r.p_dim_above_null) else "-",
                  f"{r.pooled_strength_rel:.3f}", f"{r[f'ari_k{k}']:.2f}" if f"ari_k{k}" in r and pd.notna(r[f"ari_k{k}"])
                  else "-", str(r.label))
    wide = Console(width=max(out.width, 170), file=out.file, markup=False)  # never wrap the figures
    wide.print(t)
    t = Table(title=f"categories at layer {rep}", title_justify="left")
    for c in ("category", "n", "strength [CI]", "rel.", "specificity [CI]", "null spec. 97.5%"):
        t.add_column(c, justify="left" if c == "category" else "right")
    for _, r in cat[cat.layer == rep].iterrows():
        t.add_row(r.category, str(r.n), _fmt_ci(r.strength, r.strength_ci_low, r.strength_ci_high),
                  f"{r.strength_rel:.3f}", _fmt_ci(r.specificity, r.specificity_ci_low, r.specificity_ci_high, 3),
                  f"{r.specificity_null_high:.3f}" if pd.notna(r.specificity_null_high) else "-")
    for c, n in excluded.items():
        t.add_row(c, str(n), "too few prompts: not analysed", "", "", "")
    wide.print(t)


def print_ablation(df: pd.DataFrame) -> None:
    """Print the ablation test: mean refusal score per condition and category."""
    piv = df.pivot_table(index="category", columns="condition", values="mean_score", sort=False)
    t = Table(title="ablation test: mean refusal score on held-out prompts (harmless row: score; KL below)",
              title_justify="left")
    t.add_column("category")
    for c in piv.columns:
        t.add_column(c, justify="right")
    for cat, row in piv.iterrows():
        t.add_row(str(cat), *[f"{v:.2f}" for v in row])
    kl = df[df.category == "all harmless"].set_index("condition").mean_kl
    t.add_row("harmless KL", *[f"{kl.get(c, np.nan):.3f}" for c in piv.columns])
    out.print(t)
