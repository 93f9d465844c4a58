"""``refusal extract``: candidate refusal directions (difference-in-means) and their selection."""

from __future__ import annotations

import math
import time

from typing import Annotated, Literal, Optional

import pandas as pd
from pydantic import Field

from toolkit.directions import DirectionSet
from toolkit.errors import ToolkitError
from toolkit.estimators import CAA_ANSWERS, METHOD_LABELS, METHODS, cosine, estimate
from toolkit.index_spec import LayerSpec, PositionSpec
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.judges import MarkersJudge
from toolkit.runs import Run
from toolkit.selection import SelectionConfig, build_candidates, select_direction
from toolkit.stats import rate_ci

from .shared import FiniteFloat, ModelOptions, RunOptions, command, console, out


class ExtractConfig(ModelOptions, RunOptions):
    """The options of ``refusal extract``."""

    harmful: str = Field("harmful", description="harmful prompt set (its train and val splits; a file without splits "
                         "is used whole for both)")
    harmless: str = Field("harmless", description="harmless prompt set (train and val splits; a file without splits: "
                          "whole)")
    n_train: Optional[int] = Field(None, ge=1, description="use at most N training prompts per set")
    n_val: Optional[int] = Field(None, ge=1, description="use at most N validation prompts per set")
    method: Literal[METHODS] = Field(
        "diff-means", description="direction estimator: diff-means (Arditi), geometric-median (Heretic's r*), "
        "refused-minus-complied (harmful prompts refused vs answered), pca (paired differences, repeng), probe "
        "(logistic regression, cross-validated accuracy per layer), caa (refusal vs compliance answer openers, "
        "Rimsky et al.)")
    sample: bool = Field(False, description="draw the --n-train training prompts at random with --seed instead "
                         "of taking the first N (seed-to-seed spread of the estimate)")
    filter: Literal["judge", "score", "none"] = Field(
        "judge", description="training filter: judge (harmful prompts the model refuses by marker judge), score "
        "(refusal score > 0, Arditi), none")
    select_by: Literal["judge", "score"] = Field(
        "judge", description="judge (marker judge on short completions among the best survivors) or score (lowest "
        "bypass score, Arditi)")
    screen_n: int = Field(6, ge=1, description="refused harmful val prompts used to screen candidates")
    keep: int = Field(3, ge=1, description="stop the full evaluation once this many candidates pass KL")
    max_full: int = Field(12, ge=1, description="most candidates given the full evaluation")
    judge_top: int = Field(3, ge=1, description="survivors ranked by the marker judge")
    judge_tokens: int = Field(12, ge=1, description="greedy tokens judged per completion")
    layers: Optional[str] = Field(None, description="restrict candidates to these layers, e.g. '8,10,12' or '6:18'")
    positions: Optional[str] = Field(None, description="restrict candidates to these post-instruction positions, "
                                     "e.g. '-1,-2' or post [default: post]")
    max_layer_frac: Annotated[FiniteFloat, Field(gt=0, le=1)] = Field(
        0.8, description="skip layers >= this fraction of depth")
    kl_max: Annotated[FiniteFloat, Field(gt=0)] = Field(
        0.15, description="discard candidates with mean harmless KL above this (nats; Arditi et al. use 0.1)")
    induce_min: str = Field("auto", description="discard candidates with induce below this; 'auto' = 0 (Arditi) "
                            "relaxed to the harmless baseline score if nothing passes")


@command(ExtractConfig)
def extract(cfg: ExtractConfig):
    """Extract the refusal direction (Arditi et al. 2024): candidates at every layer x post-instruction position
    from filtered training prompts (difference-in-means, or another --method), then a staged selection on the
    validation split.

    Writes runs/extract/NAME/ with candidates.safetensors (all candidates, both means and the difference-in-means),
    selection.csv (every candidate: how far it got, why it stopped, its measures), estimator.csv (each candidate's
    cosine with difference-in-means and, for --method probe, its cross-validated probe accuracy),
    direction.safetensors (the chosen raw direction and its metadata) and run.json.
    """
    sel_cfg = SelectionConfig(max_layer_frac=cfg.max_layer_frac, kl_max=cfg.kl_max, screen_n=cfg.screen_n,
                              keep=cfg.keep, max_full=cfg.max_full, judge_top=cfg.judge_top,
                              judge_tokens=cfg.judge_tokens, select_by=cfg.select_by)
    if cfg.induce_min != "auto":
        try:
            sel_cfg.induce_min = float(cfg.induce_min)
        except ValueError:
            raise ToolkitError(f"must be a number or 'auto', got {cfg.induce_min!r}", param="induce_min") from None
        if not math.isfinite(sel_cfg.induce_min):
            raise ToolkitError(f"must be a finite number or 'auto', got {cfg.induce_min!r}", param="induce_min")
    layer_spec = LayerSpec.parse(cfg.layers)
    pos_spec = PositionSpec.parse(cfg.positions, allow_all=False)
    H, B = distinct_names([load_prompt_set(cfg.harmful), load_prompt_set(cfg.harmless)])
    if cfg.sample and cfg.n_train is None:
        raise ToolkitError("drawing training prompts at random needs a sample size", param="n_train")
    if cfg.sample:
        h_train, b_train = H.select("train").sample(cfg.n_train, cfg.seed), B.select("train").sample(cfg.n_train, cfg.seed + 1)
    else:
        h_train, b_train = H.select("train").head(cfg.n_train), B.select("train").head(cfg.n_train)
    h_val, b_val = H.select("val").head(cfg.n_val), B.select("val").head(cfg.n_val)
    overlap = [ps.name for ps in (H, B) if not ps.has_splits]
    if overlap:
        console.print(f"note: {', '.join(overlap)} has no splits, so its training and validation prompts are the "
                      "same file (selection is then judged on the prompts the directions came from)")
    with Run("extract", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        r = ses.runner
        lay = layer_spec.resolve(ses.lm.n_layers)
        pos = pos_spec.resolve(ses.fmt.post_positions())
        t0 = time.time()
        cands = build_candidates(r, r.encode(h_train.prompts), r.encode(b_train.prompts), ses.refusal_ids,
                                 filter_by=cfg.filter, judge_tokens=cfg.judge_tokens, layers=lay, positions=pos,
                                 method=cfg.method, seed=cfg.seed, harmful_texts=h_train.prompts)
        run.time("candidates", time.time() - t0)
        console.print(f"training prompts kept by the filter: harmful {len(cands.harmful_kept)}/{len(h_train)}, "
                      f"harmless {len(cands.harmless_kept)}/{len(b_train)}")
        t0 = time.time()
        sel = select_direction(r, cands.dirs, cands.layers, cands.positions, r.encode(h_val.prompts),
                               r.encode(b_val.prompts), ses.refusal_ids, sel_cfg, log=console.print)
        run.time("selection", time.time() - t0)
        run.write_csv("selection.csv", sel.table)
        if sel.chosen is None:
            tried = sel.table[sel.table.stage == "full"][["layer", "pos", "bypass_screen", "kl", "bypass", "induce",
                                                           "status"]]
            console.print(f"candidates given the full evaluation:\n{tried.to_string(index=False)}", highlight=False)
            raise ToolkitError("no candidate direction passed the filters; inspect with a larger --keep, "
                               "--kl-max or --induce-min")
        layer, pos = sel.chosen
        grid = DirectionSet(cands.dirs, cands.layers, cands.positions, site="resid_pre", position=pos,
                            model_hash=ses.lm.model_hash, model_id=ses.lm.model_id,
                            method=METHOD_LABELS[cfg.method],
                            extra={"estimator": cfg.method} | ({"caa_answers": list(CAA_ANSWERS), "read_at":
                                   "last token of the answer opener"} if cfg.method == "caa" else {}),
                            tensors={"mean_harmful": cands.mean_harmful, "mean_harmless": cands.mean_harmless,
                                     "diff_means": cands.diff_means})
        grid.save(run.path("candidates.safetensors"))
        chosen = grid.direction(layer, pos)
        chosen.save(run.path("direction.safetensors"))
        chosen_row = sel.table[(sel.table.layer == layer) & (sel.table.pos == pos)].iloc[0].to_dict()
        li, pi = cands.layers.index(layer), cands.positions.index(pos)
        est = cands.estimate
        cos_dim = cosine(cands.dirs, cands.diff_means).float()  # [n_layers, n_pos]
        if est.probe_accuracy is not None:
            probe_acc = float(est.probe_accuracy[li, pi])
        else:  # the chosen candidate's layer and position, probed on the kept prompts
            probe_acc = float(estimate("probe", cands.acts_harmful[:, li, pi], cands.acts_harmless[:, li, pi],
                                       seed=cfg.seed).probe_accuracy)
        per_layer = pd.DataFrame([{"layer": l, "pos": p, "norm": float(cands.dirs[i, j].norm()),
                                   "cos_diff_means": float(cos_dim[i, j]),
                                   "probe_accuracy": (float(est.probe_accuracy[i, j]) if est.probe_accuracy
                                                      is not None else None)}
                                  for i, l in enumerate(cands.layers) for j, p in enumerate(cands.positions)])
        per_layer.to_csv(run.path("estimator.csv"), index=False)
        cond = f"ablate L{layer} p{pos}"
        summary = pd.DataFrame([
            {"set": h_val.name, "split": "val", "condition": "baseline", "n": len(h_val),
             "refusal_rate": sel.baseline["harmful_val_refusal"], "mean_score": sel.baseline["harmful_val_score"]},
            {"set": b_val.name, "split": "val", "condition": "baseline", "n": len(b_val),
             "mean_score": sel.baseline["harmless_val_score"]},
            {"set": h_val.name, "split": "val", "condition": cond, "n": len(h_val),
             "refusal_rate": chosen_row.get("judge_refusal"), "mean_score": chosen_row["bypass"]},
            {"set": b_val.name, "split": "val", "condition": cond, "n": len(b_val),
             "mean_score": chosen_row["harmless_score"], "mean_kl": chosen_row["kl"]},
        ])
        for col in ("ci_low", "ci_high"):
            summary[col] = None
        for i, row in summary.iterrows():  # Wilson 95 % intervals for the judged rates
            if pd.notna(row.get("refusal_rate")):
                _, lo, hi = rate_ci(round(row["refusal_rate"] * row["n"]), int(row["n"]))
                summary.loc[i, ["ci_low", "ci_high"]] = [lo, hi]
        summary.to_csv(run.path("summary.csv"), index=False)
        stages = sel.table.stage.value_counts().to_dict()
        results = {"chosen": {"layer": layer, "pos": pos, "norm": chosen.norm,
                              "cos_diff_means": float(cos_dim[li, pi]), "probe_accuracy": probe_acc,
                              **{k: chosen_row[k] for k in ("bypass", "induce", "kl", "judge_refusal",
                                                            "bypass_screen")}},
                   "estimator": {"method": cfg.method, "label": METHOD_LABELS[cfg.method], "n_pos": est.n_pos,
                                 "n_neg": est.n_neg, **est.info},
                   "baseline": sel.baseline, "stages": stages, "selection_timings": sel.timings,
                   "induce_filter": sel.induce_rule,
                   "train_val_same_prompts": overlap,
                   "train_kept": {"harmful": len(cands.harmful_kept), "harmless": len(cands.harmless_kept),
                                  "harmful_total": len(h_train), "harmless_total": len(b_train)}}
        final = run.finish(model=ses.lm.describe(), prompt_sets=[p.describe() for p in (h_train, b_train, h_val, b_val)],
                           seed=cfg.seed, params=cfg.params(induce_min=sel_cfg.induce_min, layers=list(cands.layers),
                                                            positions=list(cands.positions),
                                                            refusal_token_ids=ses.refusal_ids),
                           results=results, judge=MarkersJudge().describe() | {"counts": "noncompliance"})
    c = results["chosen"]
    out.print(f"chosen direction: layer {layer}, position {pos}, norm {c['norm']:.2f}; val bypass score "
              f"{c['bypass']:.2f}, induce {c['induce']:.2f}, KL {c['kl']:.3f}, judged refusal "
              f"{c['judge_refusal'] if c['judge_refusal'] == c['judge_refusal'] else '-'} "
              f"(baseline {sel.baseline['harmful_val_refusal']:.2f})")
    out.print(f"estimator {cfg.method}: cosine with difference-in-means {c['cos_diff_means']:.3f}, probe accuracy "
              f"at the chosen layer {c['probe_accuracy']:.3f}")
    out.print(f"evaluated: {stages}")
    console.print(f"wrote {final}")

