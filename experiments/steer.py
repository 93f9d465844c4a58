"""``refusal steer``: activation addition over an alpha grid, with holdout and random-direction controls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.evaluation import Coherence, Degeneration, Evaluation, evaluate, judged
from toolkit.index_spec import LayerSpec, PositionSpec, check_site
from toolkit.interventions import activation_addition
from toolkit.judges import parse_windows
from toolkit.prompts import PromptSet, distinct_names, load_prompt_set
from toolkit.runs import Run
from toolkit.steering import dial_direction, hash_split, parse_alphas, random_directions, scale_value
from toolkit.steering_summary import band_table, monotonicity, summarise

from .shared import (Cli, FiniteFloat, JudgeOptions, ModelOptions, RunOptions, SteerPositions, SteerScale, SteerSite, command,
                     console, out, sweep_bar)


@dataclass
class Unit:
    """One evaluated group of prompts: a set (or one half of the learned set) and its rows in the joint encoding."""

    ps: PromptSet
    part: str
    sl: slice | None = None


class SteerConfig(ModelOptions, JudgeOptions, RunOptions):
    """``refusal steer``'s options."""

    direction: Annotated[Optional[str], Cli("--direction", "-d")] = Field(
        None, description="runs/extract/NAME (or NAME) or a direction file; or use --learn")
    learn: Optional[str] = Field(None, description="learn a Refusal Dial direction from this prompt set: top-k vs "
                                 "bottom-k prompts of one hash-split half by baseline refusal score")
    learn_split: str = Field("all", description="split of the --learn set that is hash-split into training and "
                             "holdout halves")
    top_k: int = Field(30, ge=1, description="prompts on each side of the Refusal Dial contrast")
    holdout_frac: Annotated[FiniteFloat, Field(gt=0, lt=1)] = Field(0.5, description="share of the --learn set "
                                                                     "held out")
    sets: str = Field("harmful,borderline", description="comma-separated evaluation sets (built-in names or files); "
                      "the --learn set is evaluated on both halves instead")
    split: str = Field("test", description="split of the evaluation sets (files without splits: all)")
    limit: Optional[int] = Field(None, ge=1, description="evaluate at most N prompts per set and per half")
    layers: Optional[str] = Field(None, description="layers steered, one at a time, e.g. '12' or '8,12,16' or "
                                  "'8:16' [default: the direction's layer, or the middle layer]")
    site: SteerSite = None
    positions: SteerPositions = "post"
    alpha: str = Field("-4:4:1", description="alpha grid: start:stop:step (inclusive) or a list")
    scale: SteerScale = "resid"
    random: int = Field(0, ge=0, description="random unit Gaussian control directions (seeded)")
    orthogonal: Optional[int] = Field(None, ge=0, description="random control directions orthogonal to the steered "
                                      "one [default: as many as --random]")
    gen_tokens: int = Field(0, ge=0, description="also generate this many greedy tokens per prompt and judge "
                            "refusal, degeneration and coherence (slow: one generation per point)")
    plot: bool = Field(True, description="write steer.png")


@command(SteerConfig)
def steer(cfg: SteerConfig):
    """Steer with a refusal direction (activation addition x <- x + alpha * s * r_hat) over an alpha grid and
    compare it with random-direction controls; a direction learned here is also checked on held-out prompts.

    Writes runs/steer/NAME/ with results.csv (one row per direction, layer, alpha, set, part and prompt),
    summary.csv (per direction, layer, alpha, set, part), band.csv (learned direction vs the random band per
    alpha), steer.png, the learned directions (direction_L<layer>.safetensors) and run.json.
    """
    if (cfg.direction is None) == (cfg.learn is None):
        raise ToolkitError("give exactly one of `direction` or `learn`")
    alphas = parse_alphas(cfg.alpha)
    limit, seed, top_k, gen_tokens, random = cfg.limit, cfg.seed, cfg.top_k, cfg.gen_tokens, cfg.random
    windows = parse_windows(cfg.windows, gen_tokens)
    orthogonal = random if cfg.orthogonal is None else cfg.orthogonal
    layer_spec = LayerSpec.parse(cfg.layers)
    pos_spec = PositionSpec.parse(cfg.positions)
    d = Direction.resolve(cfg.direction) if cfg.direction is not None else None
    site = check_site(cfg.site or (d.site if d is not None and d.site else "resid_pre"))
    units: list[Unit] = []
    learn_ps = train_ps = None
    if cfg.learn is not None:
        learn_ps = load_prompt_set(cfg.learn).select(cfg.learn_split)
        mask = hash_split(learn_ps.ids, seed, 1 - cfg.holdout_frac)
        train_ps = learn_ps.subset([i for i in range(len(learn_ps)) if mask[i]])
        hold_ps = learn_ps.subset([i for i in range(len(learn_ps)) if not mask[i]])
        if len(train_ps) < 2 * top_k:
            raise ToolkitError(f"the training half of {learn_ps.name} has {len(train_ps)} prompts; --top-k {top_k} "
                               f"needs at least {2 * top_k}")
        if len(hold_ps) == 0:
            raise ToolkitError(f"the holdout half of {learn_ps.name} is empty")
        units += [Unit(train_ps.head(limit), "train"), Unit(hold_ps.head(limit), "holdout")]
    for s in [x.strip() for x in cfg.sets.split(",") if x.strip()]:
        ps = load_prompt_set(s)
        if learn_ps is not None and (ps.source, ps.sha256) == (learn_ps.source, learn_ps.sha256):
            continue
        units.append(Unit(ps.select(cfg.split).head(limit), "all"))
    if not units:
        raise ToolkitError("nothing to evaluate: give --sets")
    for u, ps in zip(units, distinct_names([u.ps for u in units])):
        u.ps = ps

    with Run("steer", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        judge = cfg.open_judge(quiet=cfg.quiet) if gen_tokens else None
        r, lm = ses.runner, ses.lm
        if d is not None:
            d.check(lm)
        layer_list = list(layer_spec.resolve(lm.n_layers, default=[d.layer] if d is not None and d.layer is not None
                                             else [lm.n_layers // 2]))
        pos = pos_spec.resolve(ses.fmt.post_positions())
        pos = None if pos is None else list(pos)
        post = ses.fmt.post_positions()

        # every evaluated prompt (all sets and halves) goes through one encoding: one pass per point, one LM-head
        # call per pass; units are slices of it
        allp, off = [], 0
        for u in units:
            u.sl = slice(off, off + len(u.ps))
            allp += u.ps.prompts
            off += len(u.ps)
        enc = r.encode(allp)
        shortest = min(map(len, enc.ids))
        if pos is not None and -min(pos) > shortest:
            raise ToolkitError(f"--positions {min(pos)} is beyond the shortest evaluated prompt ({shortest} tokens, "
                               f"so -{shortest} is its first token)")

        # baseline: one pass, reading the residual at the steered layers (post-instruction positions)
        t0 = time.time()
        coh_ctx = r.context(enc, 1, desc="prompt cache") if gen_tokens > 0 else None
        measures = [*judged(ses.refusal_ids, judge, allp, windows), Degeneration(), Coherence(coh_ctx)]
        with r.capture(len(allp), layer_list, [site], post) as acts:
            base = evaluate(r, enc, measures, gen_tokens=gen_tokens, desc="baseline")
        a = acts[site]  # [n, n_layers, n_post, d]
        resid_norm = {l: float(a[:, li].norm(dim=-1).double().mean()) for li, l in enumerate(layer_list)}
        run.time("baseline", time.time() - t0)

        # the steered directions per layer: learned (or given), random, orthogonal random
        learned: dict[int, torch.Tensor] = {}
        raw_norm: dict[int, float] = {}
        learn_info = {}
        if d is None:
            tu = units[0]
            train_scores, train_acts = base.scores[tu.sl], a[tu.sl, :, -1]
            if len(tu.ps) < len(train_ps):  # --limit cut the evaluated half: learn on the whole half
                tenc = r.encode(train_ps.prompts)
                with r.capture(len(train_ps), layer_list, [site], [-1]) as tacts:
                    train_scores = evaluate(r, tenc, judged(ses.refusal_ids), desc="training half").scores
                train_acts = tacts[site][:, :, 0]
        for li, l in enumerate(layer_list):
            if d is not None:
                v = d.vector.double()
            else:
                v, top, bottom = dial_direction(train_acts[:, li], train_scores, top_k)
                learn_info[l] = {"top_mean_score": float(np.mean(train_scores[top])),
                                 "bottom_mean_score": float(np.mean(train_scores[bottom]))}
                Direction(v.float(), layer=l, site=site, position=-1, model_hash=lm.model_hash,
                          model_id=lm.model_id, method=f"Refusal Dial: top-{top_k} minus bottom-{top_k} by refusal "
                          "score", extra={"learned_on": {"set": train_ps.name, "sha256": train_ps.sha256,
                                                         "n": len(train_ps), "split_seed": seed,
                                                         "holdout_frac": cfg.holdout_frac}}
                          ).save(run.path(f"direction_L{l}.safetensors"))
            if float(v.norm()) == 0:
                raise ToolkitError(f"the direction at layer {l} is zero")
            raw_norm[l] = float(v.norm())
            learned[l] = (v / v.norm()).float()
        scales = {l: scale_value(cfg.scale, raw_norm[l], resid_norm[l]) for l in layer_list}
        rand, rand_seeds = random_directions(random, lm.d_model, seed)
        dirs = [("learned", 0, None, {l: learned[l] for l in layer_list})]
        dirs += [("random", i, rand_seeds[i], {l: rand[i] for l in layer_list}) for i in range(random)]
        orth, orth_seeds = {}, []
        for l in layer_list:
            orth[l], orth_seeds = random_directions(orthogonal, lm.d_model, seed, orthogonal_to=learned[l])
        dirs += [("orthogonal", i, orth_seeds[i], {l: orth[l][i] for l in layer_list}) for i in range(orthogonal)]

        # context cache: steering at the last k prompt positions from layer L on changes only those tokens'
        # computation from block L on; everything else is computed once here
        ctx = None
        if pos is not None and gen_tokens == 0 and -min(pos) < shortest:  # a cache needs one token before the window
            t0 = time.time()
            ctx = r.context(enc, -min(pos), desc="context", start_layer=min(layer_list))
            run.time("context", time.time() - t0)

        # the sweep
        t0 = time.time()
        nonzero = [x for x in alphas if x != 0]
        total = len(layer_list) * len(dirs) * len(nonzero)
        rows = []
        with sweep_bar(r, total, "steer", cfg.quiet) as bar:
            for l in layer_list:
                for kind, idx, dseed, vecs in dirs:
                    vec = vecs[l] * scales[l]
                    for x in alphas:
                        if x == 0:
                            res = base
                        else:
                            steering = activation_addition(lm.model, vec, [l], alpha=x, positions=pos, site=site)
                            res = evaluate(r, enc, measures, gen_tokens=gen_tokens, intervention=steering,
                                           context=ctx, desc="steer")
                            bar.update(1)
                        for u in units:
                            rows += _rows(res, u, kind, idx, dseed, l, site, cfg.positions, x, scales[l])
        run.time("sweep", time.time() - t0)
        res_df = pd.DataFrame(rows)
        summary = summarise(res_df)
        band = band_table(summary, bool(gen_tokens))
        mono = monotonicity(summary)
        run.write_csv("results.csv", res_df)
        run.write_csv("summary.csv", summary)
        run.write_csv("band.csv", band)
        if cfg.plot and (random or orthogonal or len(alphas) > 1):
            from toolkit.plots import steer_plot

            steer_plot(summary, band, run.path("steer.png"))
        results = {"alphas": alphas, "layers": layer_list, "scale": {"kind": cfg.scale, "values": scales,
                                                                     "resid_norm": resid_norm, "raw_norm": raw_norm},
                   "monotonic": mono, "n_passes": total, "learned": learn_info,
                   "direction": d.describe() if d is not None else
                   {"source": "learned", "learn_set": learn_ps.name, "top_k": top_k, "n_train": len(train_ps)}}
        psets = [u.ps.describe() | {"part": u.part} for u in units]
        final = run.finish(model=lm.describe(), prompt_sets=psets, seed=seed,
                           params=cfg.params(direction=d.source if d is not None else None, layers=layer_list,
                                             site=site, refusal_token_ids=ses.refusal_ids),
                           results=results, judge=judge.describe() if judge is not None else None)
    print_band(band, mono)
    console.print(f"wrote {final}")


def _rows(res: Evaluation, u: Unit, kind: str, idx: int, dseed, layer: int, site: str, positions: str,
          alpha: float, scale: float) -> list[dict]:
    """One results.csv row per prompt of unit ``u`` from the evaluation of the joint encoding."""
    from .shared import judge_columns

    out_rows = []
    col = {name: res.get(name) for name in ("refusal", "degenerate", "coherence")}
    for j, rec in enumerate(u.ps.records):
        i = u.sl.start + j
        out_rows.append({"kind": kind, "direction_index": idx, "direction_seed": dseed, "layer": layer, "site": site,
                         "positions": positions, "alpha": alpha, "scale": scale, "set": u.ps.name, "part": u.part,
                         "id": rec["id"], "score": float(res.scores[i]),
                         "refusal": None if col["refusal"] is None else bool(col["refusal"][i]),
                         "degenerate": None if col["degenerate"] is None else bool(col["degenerate"][i]),
                         "coherence": None if col["coherence"] is None else float(col["coherence"][i]),
                         **judge_columns(res, i),
                         "completion": None if res.completions is None else res.completions[i]})
    return out_rows


def print_band(band: pd.DataFrame, mono: list[dict]) -> None:
    """Print the steered direction's mean score per alpha with the random band (``*`` = outside it)."""
    from rich.table import Table

    for (layer, set_, part), g in band.groupby(["layer", "set", "part"], sort=False):
        t = Table(title=f"layer {layer}, {set_} ({part}): mean refusal score", title_justify="left")
        cols = ["alpha", "steered"] + [c for c in ("random band", "orthogonal band") if
                                       f"mean_score_{c.split()[0]}_low" in g.columns]
        if "refusal_rate" in g.columns:
            cols.append("refusal rate")
        for c in cols:
            t.add_column(c, justify="right")
        for _, r in g.iterrows():
            vals = [f"{r['alpha']:g}", f"{r['mean_score']:.2f}"]
            for kind in ("random", "orthogonal"):
                if f"mean_score_{kind}_low" in g.columns:
                    mark = "*" if r.get(f"mean_score_{kind}_outside") is True else ""
                    vals.append(f"[{r[f'mean_score_{kind}_low']:.2f}, {r[f'mean_score_{kind}_high']:.2f}]{mark}")
            if "refusal_rate" in g.columns:
                vals.append(f"{r['refusal_rate']:.2f}")
            t.add_row(*vals)
        out.print(t)
    for m in mono:
        out.print(f"layer {m['layer']} {m['set']} ({m['part']}): Spearman rho {m['spearman_rho']:.2f}; mean score "
                  f"non-decreasing for alpha in [{m['monotone_from']:g}, {m['monotone_to']:g}]", highlight=False)
