"""``refusal steer``: activation addition over an alpha grid, with holdout and random-direction controls."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from toolkit.cast import calibrate_threshold, condition_similarity, conditional_addition, gate_from, parse_threshold
from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.evaluation import Coherence, Degeneration, Evaluation, evaluate, judged
from toolkit.hooks import check_layer
from toolkit.index_spec import LayerSpec, PositionSpec, check_site
from toolkit.interventions import activation_addition
from toolkit.judges import parse_windows
from toolkit.prompts import PromptSet, distinct_names, load_prompt_set
from toolkit.runner import Encoded
from toolkit.runs import Run
from toolkit.estimators import GROUP_METHODS, METHOD_LABELS
from toolkit.steering import dial_direction, hash_split, parse_alphas, random_directions, scale_value
from toolkit.steering_summary import band_table, cast_table, monotonicity, summarise

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
    method: Literal[GROUP_METHODS] = Field(
        "diff-means", description="estimator of the learned direction from the top-k vs bottom-k prompts: diff-means "
        "(the Refusal Dial), geometric-median, pca (paired differences) or probe (logistic regression)")
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
    condition: Optional[str] = Field(None, description="conditional activation steering (CAST, Lee et al. 2024): "
                                     "also steer only the prompts whose mean post-instruction hidden state has cosine "
                                     ">= --threshold with this condition direction (runs/extract/NAME, NAME or a "
                                     "direction file) at its layer and site, beside unconditional steering")
    condition_layer: Optional[int] = Field(None, description="layer where the condition is read [default: the "
                                           "condition direction's]")
    threshold: str = Field("auto", description="CAST gate: steer a prompt when its condition cosine >= this number; "
                           "auto: the threshold with the best balanced accuracy between --calibrate-sets")
    calibrate_sets: str = Field("harmful,harmless", description="with --threshold auto: the prompts to steer and the "
                                "prompts to spare, comma-separated (built-in names or files)")
    calibrate_split: str = Field("train", description="split of --calibrate-sets used to calibrate the threshold")


@command(SteerConfig)
def steer(cfg: SteerConfig):
    """Steer with a refusal direction (activation addition x <- x + alpha * s * r_hat) over an alpha grid and
    compare it with random-direction controls; a direction learned here is also checked on held-out prompts.

    Writes runs/steer/NAME/ with results.csv (one row per direction, layer, alpha, set, part and prompt),
    summary.csv (per direction, layer, alpha, set, part), band.csv (learned direction vs the random band per
    alpha), steer.png, the learned directions (direction_L<layer>.safetensors) and run.json.

    With --condition (CAST) the steered direction is also applied conditionally at every alpha (kind
    "conditional" in results.csv and summary.csv, whose rows also give each prompt's condition_similarity and
    gated), and cast.csv sets conditional beside unconditional steering per layer, set and alpha with the gate rate
    (share of prompts steered).
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
    cond = threshold = None
    calib_ps: list[PromptSet] = []
    if cfg.condition is not None:
        threshold = parse_threshold(cfg.threshold)
        cond = Direction.resolve(cfg.condition)
        if threshold is None:
            names = [x.strip() for x in cfg.calibrate_sets.split(",") if x.strip()]
            if len(names) != 2:
                raise ToolkitError("give two sets: the prompts to steer, then the prompts to spare",
                                   param="calibrate_sets")
            calib_ps = [load_prompt_set(n).select(cfg.calibrate_split) for n in names]
            for ps in calib_ps:
                if len(ps) == 0:
                    raise ToolkitError(f"{ps.name} has no {cfg.calibrate_split!r} prompts", param="calibrate_split")
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
        cast = None
        if cond is not None:
            t0 = time.time()
            cast = _condition(r, lm, enc, cond, cfg.condition_layer, threshold, calib_ps)
            run.time("condition", time.time() - t0)

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
                v, top, bottom = dial_direction(train_acts[:, li], train_scores, top_k, cfg.method, seed)
                learn_info[l] = {"top_mean_score": float(np.mean(train_scores[top])),
                                 "bottom_mean_score": float(np.mean(train_scores[bottom]))}
                Direction(v.float(), layer=l, site=site, position=-1, model_hash=lm.model_hash,
                          model_id=lm.model_id, method=f"Refusal Dial: top-{top_k} vs bottom-{top_k} by refusal "
                          f"score, {METHOD_LABELS[cfg.method]}", extra={"estimator": cfg.method, "learned_on": {"set": train_ps.name, "sha256": train_ps.sha256,
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
        total = len(layer_list) * (len(dirs) + (cast is not None)) * len(nonzero)
        # a mixed gate at every position cannot share the template prefix (computed once for all prompts)
        cenc = enc if pos is not None else Encoded(enc.ids, 0)
        cmeasures = measures if cenc is enc else [*measures[:-1], Coherence(None)]
        extra = {} if cast is None else {"sims": cast["sims"], "gate": cast["gate"]}
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
                            rows += _rows(res, u, kind, idx, dseed, l, site, cfg.positions, x, scales[l], **extra)
                        if cast is None or kind != "learned":
                            continue
                        if x == 0:
                            cres = base
                        else:
                            steering = conditional_addition(lm.model, vec, [l], alpha=x, gate=cast["gate"],
                                                            positions=pos, site=site)
                            cres = evaluate(r, cenc, cmeasures, gen_tokens=gen_tokens, intervention=steering,
                                            context=ctx if cenc is enc else None, desc="steer (conditional)")
                            bar.update(1)
                        for u in units:
                            rows += _rows(cres, u, "conditional", idx, dseed, l, site, cfg.positions, x, scales[l],
                                          **extra)
        run.time("sweep", time.time() - t0)
        res_df = pd.DataFrame(rows)
        summary = summarise(res_df)
        band = band_table(summary, bool(gen_tokens))
        mono = monotonicity(summary)
        run.write_csv("results.csv", res_df)
        run.write_csv("summary.csv", summary)
        run.write_csv("band.csv", band)
        cast_summary = None
        if cast is not None:
            cast_summary = cast_table(summary, res_df)
            run.write_csv("cast.csv", cast_summary)
            cast["info"]["gate_rate"] = {f"{u.ps.name}/{u.part}": float(np.mean(cast["gate"][u.sl])) for u in units}
        if cfg.plot and (random or orthogonal or len(alphas) > 1):
            from toolkit.plots import steer_plot

            steer_plot(summary, band, run.path("steer.png"))
        results = {"alphas": alphas, "layers": layer_list, "scale": {"kind": cfg.scale, "values": scales,
                                                                     "resid_norm": resid_norm, "raw_norm": raw_norm},
                   "monotonic": mono, "n_passes": total, "learned": learn_info,
                   "condition": None if cast is None else cast["info"],
                   "direction": d.describe() if d is not None else
                   {"source": "learned", "learn_set": learn_ps.name, "top_k": top_k, "n_train": len(train_ps)}}
        psets = [u.ps.describe() | {"part": u.part} for u in units]
        final = run.finish(model=lm.describe(), prompt_sets=psets, seed=seed,
                           params=cfg.params(direction=d.source if d is not None else None, layers=layer_list,
                                             site=site, refusal_token_ids=ses.refusal_ids,
                                             condition=cond.source if cond is not None else None),
                           results=results, judge=judge.describe() if judge is not None else None)
    print_band(band, mono)
    if cast_summary is not None:
        print_cast(cast_summary, cast["info"])
    console.print(f"wrote {final}")


def _condition(r, lm, enc: Encoded, cond: Direction, layer: int | None, threshold: float | None,
               calib_ps: list[PromptSet]) -> dict:
    """CAST's gate for every evaluated prompt: the condition cosine (mean over post-instruction positions, at the
    condition's layer and site) and the threshold, given or calibrated on ``calib_ps`` (steer, spare)."""
    try:
        cond.check(lm)
    except ToolkitError as e:
        raise ToolkitError(e.message, param="condition") from None
    if layer is None and cond.layer is None:
        raise ToolkitError("the condition direction records no layer; give one", param="condition_layer")
    try:
        layer = check_layer(lm.model, cond.layer if layer is None else layer)
    except ToolkitError as e:
        raise ToolkitError(e.message, param="condition_layer") from None
    site = check_site(cond.site or "resid_pre")
    info = {"source": cond.source, "layer": layer, "site": site, "positions": "post", "score": "cosine",
            "threshold_mode": "given" if threshold is not None else "auto"}
    if threshold is None:
        pos_s, neg_s = (condition_similarity(r, r.encode(ps.prompts), cond, layer=layer, site=site,
                                             desc=f"condition ({ps.name})") for ps in calib_ps)
        cal = calibrate_threshold(pos_s, neg_s)
        threshold = cal.threshold
        info["calibration"] = {"steer": calib_ps[0].describe(), "spare": calib_ps[1].describe(),
                               "balanced_accuracy": cal.balanced_accuracy,
                               "true_positive_rate": cal.true_positive_rate,
                               "false_positive_rate": cal.false_positive_rate}
    sims = condition_similarity(r, enc, cond, layer=layer, site=site)
    info["threshold"] = threshold if np.isfinite(threshold) else str(threshold)  # JSON has no infinities
    return {"sims": sims, "gate": gate_from(sims, threshold), "info": info}


def _rows(res: Evaluation, u: Unit, kind: str, idx: int, dseed, layer: int, site: str, positions: str,
          alpha: float, scale: float, sims: np.ndarray | None = None, gate: np.ndarray | None = None) -> list[dict]:
    """One results.csv row per prompt of unit ``u`` from the evaluation of the joint encoding; with CAST (``sims``
    and ``gate`` over the joint encoding) also each prompt's condition cosine and whether it passed the gate."""
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
        if sims is not None:
            out_rows[-1] |= {"condition_similarity": float(sims[i]), "gated": bool(gate[i])}
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


def print_cast(table: pd.DataFrame, info: dict) -> None:
    """Print CAST beside unconditional steering per layer, set and alpha: mean score (and refusal rate, when
    judged) both ways, and the share of prompts the gate steers."""
    from rich.table import Table

    cal = info.get("calibration")
    how = (f"calibrated, balanced accuracy {cal['balanced_accuracy']:.2f}" if cal else "given")
    out.print(f"CAST: condition cosine >= {float(info['threshold']):.4g} ({how}) at layer {info['layer']} "
              f"{info['site']}",
              highlight=False)
    rates = "refusal_rate_conditional" in table.columns
    for (layer, set_, part), g in table.groupby(["layer", "set", "part"], sort=False):
        out.print(f"layer {layer}, {set_} ({part}): gate rate {g['gate_rate'].iloc[0]:.2f} (share of prompts "
                  "steered)", highlight=False)
        t = Table(title="mean refusal score, unconditional vs CAST", title_justify="left")
        cols = ["alpha", "score", "score CAST"] + (["refusal rate", "refusal rate CAST"] if rates else [])
        for c in cols:
            t.add_column(c, justify="right")
        for _, r in g.iterrows():
            vals = [f"{r['alpha']:g}", f"{r['mean_score_unconditional']:.2f}", f"{r['mean_score_conditional']:.2f}"]
            if rates:
                vals += [f"{r['refusal_rate_unconditional']:.2f}", f"{r['refusal_rate_conditional']:.2f}"]
            t.add_row(*vals)
        out.print(t)
