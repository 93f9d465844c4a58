"""``refusal patch``: activation patching (denoising and noising) between harmful and harmless prompts of matching
token length, per site x layer x position and per attention head (method: :mod:`toolkit.patching`)."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field

from toolkit.errors import ToolkitError
from toolkit.hooks import SITES
from toolkit.index_spec import LayerSpec, PositionSpec
from toolkit.patching import (DIRECTIONS, head_components, head_layout, max_variants, normalised_effect,
                              pair_by_length, parse_sites, plan_passes, run_patching, site_components)
from toolkit.prompts import PromptSet, load_prompt_set
from toolkit.runs import Run

from .shared import ModelOptions, RunOptions, command, console, out, styled, sweep_bar

MAX_ROWS = 256  # rows per stacked forward pass (components x prompts of one base batch)
UNSTABLE_GAP = 0.5  # score units: below this clean-corrupt gap normalised figures are unstable


def _select(spec: str, split: str, column: str | None) -> PromptSet:
    ps = load_prompt_set(spec, column)
    return ps.select(split)


class PatchConfig(ModelOptions, RunOptions):
    """The options of ``refusal patch``."""

    harmful: str = Field("harmful", description="clean prompts (the model refuses): built-in set or file")
    harmless: str = Field("harmless", description="corrupted prompts (answered): built-in set or file")
    split: str = Field("test", description="split of sets that have splits (files without: all)")
    column: Optional[str] = Field(None, description="field/column holding the prompt in user files")
    pairs: int = Field(10, ge=1, description="at most N pairs (harmful prompts in file order); time grows linearly "
                       "with it: the full default sweep takes about 8 minutes on two CPU cores")
    max_len_diff: int = Field(0, ge=0, description="pair prompts whose formatted token lengths differ by at most "
                              "this (0: exact match; positions count from the end of each prompt)")
    layers: Optional[str] = Field(None, description="layers patched (default: all), e.g. '12', '8,12,16' or '8:16'")
    sites: str = Field("resid_pre,attn_out,mlp_out", description=f"comma-separated sites: {', '.join(SITES)}")
    positions: Optional[str] = Field(None, description="positions patched one at a time (default: the "
                                     "post-instruction positions and the last --last-k): negative indices like "
                                     "'-1,-3', post or last")
    last_k: int = Field(8, ge=0, description="default positions include the last K (-K..-1)")
    direction: Literal[("both",) + DIRECTIONS] = Field(
        "both", description="denoise (harmless run, harmful activation copied in), noise (the reverse) or both")
    heads: bool = Field(True, description="also patch each attention (query) head's output z (o_proj input) at "
                        "every patched layer")
    head_positions: str = Field("post", description="positions a head is patched at, all together: post, last or "
                                "negative indices")
    top: int = Field(10, ge=0, description="components listed per direction")
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples of pairs for the 95 % intervals (0: none; "
                           "seeded by --seed)")


@command(PatchConfig)
def patch(cfg: PatchConfig):
    """Activation patching between harmful (clean) and harmless (corrupted) prompts: which layers, sites, positions
    and attention heads carry the refusal score.

    Pairs: harmful prompts in file order, each with the unused harmless prompt of nearest formatted token length
    (ties: earlier in the file) within --max-len-diff tokens (default 0: equal length); others are dropped.
    Positions are negative indices aligned from the end of the prompt, where the post-instruction tokens are
    identical in both prompts. Denoising runs the harmless prompt with one clean activation copied in (site x
    layer x position, or one head's z at --head-positions); noising runs the harmful prompt with the harmless
    activation. Normalised effect = (mean patched - mean corrupt) / (mean clean - mean corrupt) of the refusal
    score over pairs: 0 = harmless baseline, 1 = harmful baseline; bootstrap 95 % intervals over pairs.

    Writes runs/patch/NAME/ with results.csv (one row per direction, component and pair: patched, clean and
    corrupted scores), summary.csv (per direction and component: mean score, normalised with its bootstrap 95 %
    interval ci_low..ci_high, effect = normalised for denoising and 1 - normalised for noising, rank by effect),
    pairs.csv, patch_<direction>.png and heads_<direction>.png (the effect: 0 = no change) and run.json.
    """
    heads, max_len_diff, last_k = cfg.heads, cfg.max_len_diff, cfg.last_k
    dirs = list(DIRECTIONS) if cfg.direction == "both" else [cfg.direction]
    site_list = parse_sites(cfg.sites)
    layer_spec = LayerSpec.parse(cfg.layers)  # before the model is loaded
    pos_spec = PositionSpec.parse(cfg.positions, "positions", allow_all=False)
    hpos_spec = PositionSpec.parse(cfg.head_positions if heads else None, "head_positions", allow_all=False)
    if cfg.positions is None and last_k == 0:
        raise ToolkitError("--last-k 0 leaves only the post-instruction positions: give --positions post instead")
    hset, bset = _select(cfg.harmful, cfg.split, cfg.column), _select(cfg.harmless, cfg.split, cfg.column)

    with Run("patch", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        r, lm = ses.runner, ses.lm
        lays = list(layer_spec.resolve(lm.n_layers))
        post = ses.fmt.post_positions()
        default = sorted(set(post) | set(range(-last_k, 0)))  # the post-instruction positions and the last K
        pos = list(pos_spec.resolve(post, default))
        hpos = list(hpos_spec.resolve(post, default)) if heads else []
        lay = head_layout(lm.model) if heads else None

        # pairs by formatted token length
        hlen = [len(x) for x in ses.fmt.encode(hset.prompts)]
        blen = [len(x) for x in ses.fmt.encode(bset.prompts)]
        plist, dropped = pair_by_length(hlen, blen, max_len_diff, cfg.pairs)
        console.print(f"{len(plist)} pairs within {max_len_diff} token(s) of equal length; {dropped} harmful "
                      "prompt(s) had no such harmless partner and were dropped", highlight=False)
        clean = r.encode([hset.prompts[p.harmful] for p in plist])
        corrupt = r.encode([bset.prompts[p.harmless] for p in plist])

        deepest = max(-min(pos), -min(hpos) if hpos else 0)
        shortest = min(min(map(len, clean.ids)), min(map(len, corrupt.ids)))
        if deepest + 1 > shortest:
            raise ToolkitError(f"position {-deepest} needs prompts of at least {deepest + 1} tokens, but the shortest "
                               f"paired prompt has {shortest}: patch fewer positions (--last-k, --positions, "
                               "--head-positions)")
        comps = site_components(site_list, lays, pos)
        if heads:
            comps += head_components(lays, lay.n_heads, hpos)
        n = len(plist)
        total = len(plan_passes(comps, max_variants(r.batch_size, n, MAX_ROWS))) * len(dirs)
        with sweep_bar(r, total, "patch", cfg.quiet) as bar:
            res = run_patching(r, clean, corrupt, comps, ses.refusal_ids, dirs, max_rows=MAX_ROWS,
                               on_pass=lambda m: bar.update(1))
        run.time("prepare", res.timings["prepare"])
        run.time("sweep", res.timings["sweep"])

        gap = float(res.clean.mean() - res.corrupt.mean())
        unstable = abs(gap) < UNSTABLE_GAP
        if unstable:
            console.print(styled("warning:", "yellow", f" the clean and corrupted mean refusal scores differ by only "
                                 f"{gap:.2f}; normalised effects are unstable (use prompts the model treats more "
                                 "differently, or more pairs)"), highlight=False)
        pairs_df = pd.DataFrame([{
            "pair": i, "harmful_id": hset.ids[p.harmful], "harmless_id": bset.ids[p.harmless],
            "harmful_len": p.harmful_len, "harmless_len": p.harmless_len, "len_diff": p.harmful_len - p.harmless_len,
            "clean_score": float(res.clean[i]), "corrupt_score": float(res.corrupt[i]),
            "harmful_prompt": hset.prompts[p.harmful], "harmless_prompt": bset.prompts[p.harmless],
        } for i, p in enumerate(plist)])
        results_df, summary = _tables(res, dirs, plist, hset, bset, lay, cfg.bootstrap, cfg.seed)
        run.write_csv("pairs.csv", pairs_df)
        run.write_csv("results.csv", results_df)
        run.write_csv("summary.csv", summary)

        from toolkit.plots import heads_heatmap, patch_heatmap

        tok = lm.tokenizer
        labels = {p: repr(tok.decode([t]))[1:-1] for p, t in zip(post, ses.fmt.post_ids)}
        # denoising: the normalised value itself; noising: 1 - normalised, so that in both 0 = no change and
        # 1 = the whole gap between the baselines (on the normalised scale every noising cell sits near 1)
        what = {"denoise": ("denoising: harmless run + one harmful activation",
                            "normalised (0 = harmless score, 1 = harmful score)"),
                "noise": ("noising: harmful run + one harmless activation",
                          "1 - normalised (0 = harmful score kept, 1 = harmless score)")}
        for d in dirs:
            sd = summary[summary.direction == d]
            patch_heatmap(sd, run.path(f"patch_{d}.png"), f"{what[d][0]}; {n} pairs", labels, value="effect",
                          label=what[d][1])
            if heads:
                heads_heatmap(sd, run.path(f"heads_{d}.png"), f"{what[d][0]}, per head at positions "
                              f"{','.join(map(str, hpos))}; {n} pairs", value="effect", label=what[d][1])

        tops = {d: _top(summary, d, cfg.top) for d in dirs}
        seconds = res.timings["sweep"] / max(1, res.n_passes)
        results = {
            "baseline": {"clean_mean": float(res.clean.mean()), "corrupt_mean": float(res.corrupt.mean()),
                         "gap": gap, "unstable": unstable},
            "pairs": {"n": n, "dropped": dropped, "max_len_diff": max_len_diff,
                      "harmful_candidates": len(hset), "harmless_candidates": len(bset)},
            "layers": lays, "sites": site_list, "positions": pos, "post_positions": post,
            "heads": None if lay is None else {"n_heads": lay.n_heads, "n_kv_heads": lay.n_kv_heads,
                                               "head_dim": lay.head_dim, "positions": hpos},
            "directions": dirs, "n_components": len(comps), "n_passes": res.n_passes,
            "seconds_per_pass": seconds, "normalisation": "(mean patched - mean corrupt) / (mean clean - mean "
            "corrupt) over pairs; effect = normalised (denoise) or 1 - normalised (noise)",
            "top": tops,
        }
        final = run.finish(model=lm.describe(), prompt_sets=[hset.describe() | {"role": "clean"},
                                                             bset.describe() | {"role": "corrupt"}],
                           seed=cfg.seed,
                           params=cfg.params(max_rows=MAX_ROWS, refusal_token_ids=ses.refusal_ids),
                           results=results)
    out.print(f"baseline mean refusal score over {n} pairs: harmful (clean) {res.clean.mean():.2f}, harmless "
              f"(corrupted) {res.corrupt.mean():.2f}, gap {gap:.2f}", highlight=False)
    for d in dirs:
        _print_top(tops[d], d)
    console.print(f"{res.n_passes} patched passes in {res.timings['sweep']:.1f} s ({seconds:.2f} s each); "
                  f"wrote {final}", highlight=False)


def _tables(res, dirs, plist, hset, bset, lay, n_boot: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The tidy per-pair table and the per-component summary (normalised effect with bootstrap interval)."""
    n = len(plist)
    comps = res.components
    meta = pd.DataFrame([{
        "site": c.site, "layer": c.layer, "position": c.positions[0] if c.head is None and len(c.positions) == 1
        else pd.NA, "positions": ",".join(map(str, c.positions)), "head": c.head if c.head is not None else pd.NA,
        "kv_group": lay.kv_group(c.head) if c.head is not None else pd.NA, "component": c.label,
    } for c in comps]).astype({"position": "Int64", "head": "Int64", "kv_group": "Int64"})
    rows, summ = [], []
    hid = [hset.ids[p.harmful] for p in plist]
    bid = [bset.ids[p.harmless] for p in plist]
    for d in dirs:
        sc = res.scores[d]  # [n_components, n_pairs]
        tidy = meta.loc[np.repeat(np.arange(len(comps)), n)].reset_index(drop=True)
        tidy.insert(0, "direction", d)
        tidy["pair"] = np.tile(np.arange(n), len(comps))
        tidy["harmful_id"] = np.tile(hid, len(comps))
        tidy["harmless_id"] = np.tile(bid, len(comps))
        tidy["score"] = sc.reshape(-1)
        tidy["clean_score"] = np.tile(res.clean, len(comps))
        tidy["corrupt_score"] = np.tile(res.corrupt, len(comps))
        rows.append(tidy)
        eff = normalised_effect(sc, res.clean, res.corrupt, n_boot, seed)
        s = meta.copy()
        s.insert(0, "direction", d)
        s["n_pairs"] = n
        s["mean_score"] = eff["mean_score"]
        s["normalised"] = eff["normalised"]
        s["ci_low"] = eff["ci_low"]
        s["ci_high"] = eff["ci_high"]
        s["effect"] = eff["normalised"] if d == "denoise" else 1 - eff["normalised"]
        s["rank"] = s["effect"].rank(ascending=False, method="first").astype("Int64")
        summ.append(s)
    return pd.concat(rows, ignore_index=True), pd.concat(summ, ignore_index=True)


def _top(summary: pd.DataFrame, direction: str, k: int) -> list[dict]:
    s = summary[summary.direction == direction].sort_values("rank").head(k)
    cols = ["component", "site", "layer", "positions", "head", "kv_group", "mean_score", "normalised", "ci_low",
            "ci_high", "effect"]
    recs = []
    for _, r in s.iterrows():
        recs.append({c: (None if pd.isna(r[c]) else (r[c].item() if hasattr(r[c], "item") else r[c])) for c in cols})
    return recs


def _print_top(top: list[dict], direction: str) -> None:
    from rich.table import Table

    what = {"denoise": "denoising (harmless run, harmful activation in): effect = normalised",
            "noise": "noising (harmful run, harmless activation in): effect = 1 - normalised"}[direction]
    t = Table(title=f"top components, {what}", title_justify="left")
    for c in ("rank", "component", "kv group", "mean score", "normalised [95% CI]", "effect"):
        t.add_column(c, justify="left" if c == "component" else "right")
    for i, r in enumerate(top, 1):
        ci = "" if r["ci_low"] is None else f" [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        t.add_row(str(i), r["component"], "-" if r["kv_group"] is None else str(r["kv_group"]),
                  f"{r['mean_score']:.2f}", f"{r['normalised']:.2f}{ci}", f"{r['effect']:.2f}")
    out.print(t)
