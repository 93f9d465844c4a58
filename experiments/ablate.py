"""``refusal ablate``: evaluate with the refusal direction ablated; optionally save an orthogonalized model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import pandas as pd
from pydantic import Field

from toolkit.abliteration import COMPONENTS, apply_weight_edit, edit_hooks, fixed_edit, layer_separation
from toolkit.checkpoints import (check_export_target, check_save_path, export_head_orthogonalized,
                                  export_orthogonalized, export_weight_edit)
from toolkit.damage import forced_damage, reference_completions
from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.heads import head_ablation, heads_from_patch, orthogonalize_heads, parse_heads
from toolkit.evaluation import evaluate, judged
from toolkit.judges import parse_windows
from toolkit.interventions import directional_ablation, orthogonalize_weights
from toolkit.models import dtype_from_name
from toolkit.patching import head_layout
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run, reuse_baseline

from .shared import (Cli, JudgeOptions, ModelOptions, RunOptions, command, console, evaluation_row, judge_columns,
                     out, print_summary)


class AblateConfig(ModelOptions, JudgeOptions, RunOptions):
    """The options of ``refusal ablate``."""

    direction: Annotated[str, Cli("--direction", "-d")] = Field(
        ..., description="runs/extract/NAME (or NAME) or a direction file")
    harmful: str = Field("harmful", description="harmful prompt set")
    harmless: str = Field("harmless", description="harmless prompt set")
    split: str = Field("test", description="split evaluated: train, val, test or all (files without splits: all)")
    limit: Optional[int] = Field(None, ge=1, description="evaluate only the first N prompts of each set")
    gen_tokens: int = Field(12, ge=0, description="greedy completion length judged by the refusal judge")
    over_refusal: str = Field("borderline", description="prompt set judged for over-refusal (refusals of "
                              "borderline-but-benign requests) before and after, or none")
    kl_tokens: int = Field(16, ge=0, description="multi-token KL and cross-entropy: teacher-force the base model's "
                           "own greedy completions of this many tokens of the harmless prompts (0: off)")
    capability: bool = Field(True, description="the offline multiple-choice capability check (prompts/"
                             "capability.jsonl, 218 items, cloze-scored) before and after")
    capability_set: Optional[Path] = Field(None, description="another multiple-choice file for the capability check "
                                           "(JSONL: id, category, question, choices (4), answer A-D)")
    lm_eval: Optional[str] = Field(None, description="comma-separated lm-evaluation-harness tasks run on the base and "
                                   "the ablated model (needs the lm-eval extra; most tasks download data)")
    lm_eval_include: Optional[Path] = Field(None, description="folder of local lm-eval task YAMLs")
    lm_eval_limit: Optional[int] = Field(None, ge=1, description="lm-eval items per task")
    baseline: Optional[str] = Field(None, description="reuse the per-prompt baseline of a score run (same model, "
                                    "prompt files, split and --gen-tokens) instead of recomputing it")
    save: Optional[Path] = Field(None, description="write a weight-orthogonalized Hugging Face checkpoint here and "
                                 "evaluate it on the harmful set")
    replace_save: bool = Field(False, description="let --save replace an existing checkpoint folder (never the "
                               "--model folder, nor a folder without config.json); --force replaces runs only")
    save_dtype: str = Field("auto", description="dtype of the --save checkpoint: auto (the source checkpoint's "
                            "stored dtype, whatever --dtype computes in), float32, bfloat16, float16")
    heads: Optional[str] = Field(None, description="ablate the direction from these attention (query) heads' outputs "
                                 "only, instead of the whole residual stream: LAYER.HEAD items such as "
                                 "'12.3,12.7,14.*' (each side an index, a half-open range a:b or *); --save then "
                                 "orthogonalizes only those heads' o_proj columns")
    heads_from: Optional[str] = Field(None, description="as --heads, with the --top-heads heads of largest effect in a "
                                      "`refusal patch` run (runs/patch/NAME or NAME; its noising effects, else its "
                                      "denoising ones)")
    top_heads: Optional[int] = Field(None, ge=1, description="with --heads-from: how many heads [default: 10]")
    form: Optional[Literal["projection", "norm-preserving", "affine"]] = Field(
        None, description="instead of directional ablation, a fixed weight edit of the residual writers (o_proj, "
        "down_proj) of every layer, strength 1, applied as hooks: projection (Arditi/Heretic; unlike directional "
        "ablation it leaves the embedding's component along the direction), norm-preserving (Heretic >= 1.2: edited "
        "rows keep their norms) or affine (Marshall et al.: the component is moved to the module's harmless mean, "
        "not 0; cannot be --save'd into a model whose writers have no bias)")
    activation_scaled: bool = Field(False, description="with --form: multiply each layer's strength by its "
                                    "separation (Cohen's d of harmful vs harmless training prompts along the "
                                    "direction, resid_pre at the last token) divided by the largest (clamped at 0)")
    train_limit: int = Field(64, ge=1, description="with --activation-scaled or --form affine: training prompts per "
                             "set read for the separation and the writers' harmless means")


DEFAULT_TOP_HEADS = 10


@command(AblateConfig)
def ablate(cfg: AblateConfig):
    """Ablate the refusal direction (directional ablation at every layer, all positions) and report harmful and
    harmless refusal before/after by the chosen judge (with the marker judge beside another judge), over-refusal
    on the borderline set, and damage: first-token KL and multi-token KL on harmless prompts, cross-entropy of the
    base model's completions, the offline capability check and optionally lm-evaluation-harness tasks.

    With --heads (or --heads-from a patch run) the direction is removed only from the chosen attention heads'
    contributions (o_proj output minus r r^T sum over chosen heads of W_O^h z_h, at every position), and --save
    orthogonalizes only those heads' o_proj columns; the outputs are the same, so `refusal compare` puts head-level
    and full ablation runs side by side.

    With --form projection|norm-preserving|affine the direction is instead removed by a fixed weight edit of the
    residual writers (o_proj and down_proj outputs of every layer, strength 1; toolkit.abliteration.fixed_edit),
    applied as hooks; --activation-scaled multiplies each layer's strength by its separation / max (Cohen's d of
    the --train-limit harmful vs harmless training prompts along the direction). --form projection is not the
    default ablation: the embedding's component along the direction is left in place. --save writes the edit merged
    into the weights (not for affine on models whose writers have no bias). run.json records form, scaling and
    per-layer strengths under results.edit.

    Writes runs/ablate/NAME/ with results.csv (per prompt and condition), summary.csv, damage.csv and run.json.
    With --save, also a weight-orthogonalized checkpoint that plain transformers loads, evaluated as a third
    condition; it is computed from the source checkpoint's weights and keeps their stored dtype unless
    --save-dtype says otherwise.
    """
    saved_as = None if cfg.save_dtype == "auto" else dtype_from_name(cfg.save_dtype, "--save-dtype")
    windows = parse_windows(cfg.windows, cfg.gen_tokens)
    d = Direction.resolve(cfg.direction)
    if cfg.heads is not None and cfg.heads_from is not None:
        raise ToolkitError("give `heads` or `heads_from`, not both", param="heads")
    if cfg.top_heads is not None and cfg.heads_from is None:
        raise ToolkitError("only counts heads taken from a patch run: give `heads_from` too", param="top_heads")
    form = None if cfg.form is None else cfg.form.replace("-", "_")
    if form is not None and (cfg.heads is not None or cfg.heads_from is not None):
        raise ToolkitError("a weight-edit form is not combined with head-level ablation: drop `heads`/`heads_from` "
                           "or `form`", param="form")
    if cfg.activation_scaled and form is None:
        raise ToolkitError("scales the strengths of a weight edit: give `form` too", param="activation_scaled")
    patch_heads = None
    if cfg.heads_from is not None:  # a file read: fails before the model loads
        try:
            patch_heads = heads_from_patch(cfg.heads_from, cfg.top_heads or DEFAULT_TOP_HEADS)
        except ToolkitError as e:
            raise ToolkitError(e.message, param=e.param or "heads_from") from None
    H = load_prompt_set(cfg.harmful).select(cfg.split).head(cfg.limit)
    B = load_prompt_set(cfg.harmless).select(cfg.split).head(cfg.limit)
    sets = [H, B]
    if cfg.over_refusal.lower() != "none":
        sets.append(load_prompt_set(cfg.over_refusal).select(cfg.split).head(cfg.limit))
    sets = distinct_names(sets)
    H, B, O = sets[0], sets[1], (sets[2] if len(sets) > 2 else None)
    cset = None
    if cfg.capability:
        from toolkit.capability import load_capability_set

        cset = load_capability_set(cfg.capability_set)
    lm_tasks = [t.strip() for t in cfg.lm_eval.split(",") if t.strip()] if cfg.lm_eval else []
    train_sets = None
    if form is not None and (cfg.activation_scaled or form == "affine"):
        train_sets = (load_prompt_set(cfg.harmful).select("train").head(cfg.train_limit),
                      load_prompt_set(cfg.harmless).select("train").head(cfg.train_limit))
    if cfg.save is not None:
        check_save_path(cfg.save, overwrite=cfg.replace_save, what="the --save checkpoint")
        if cfg.model and Path(cfg.model).expanduser().is_dir():
            check_export_target(Path(cfg.model).expanduser(), cfg.save, overwrite=cfg.replace_save)
    with Run("ablate", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        d.check(ses.lm)
        sel = None
        if cfg.heads is not None:
            sel = parse_heads(cfg.heads, ses.lm.n_layers, head_layout(ses.lm.model))
        elif patch_heads is not None:
            if patch_heads.model_hash and patch_heads.model_hash != ses.lm.model_hash:
                raise ToolkitError(f"the patch run was made on another model (hash {patch_heads.model_hash[:12]}), not "
                                   f"{ses.lm.model_id} (hash {ses.lm.model_hash[:12]})", param="heads_from")
            sel = patch_heads.check(ses.lm.n_layers, head_layout(ses.lm.model))
        if cfg.save is not None:
            check_export_target(Path(ses.lm.source), cfg.save, overwrite=cfg.replace_save)
        edit, edit_record = None, None
        if form is not None:
            edit, edit_record = build_fixed_edit(ses, d, form, cfg.activation_scaled, train_sets, cfg.save)
        judge = cfg.open_judge(quiet=cfg.quiet) if cfg.gen_tokens else None
        r = ses.runner
        model = ses.lm.model
        enc = {ps.name: r.encode(ps.prompts) for ps in sets}

        def measures(ps):
            return judged(ses.refusal_ids, judge, ps.prompts, windows)

        def ablation():
            if edit is not None:
                return edit_hooks(model, edit)
            return directional_ablation(model, d) if sel is None else head_ablation(model, d, sel)

        t0 = time.time()
        base = {}
        if cfg.baseline:
            for ps in sets:
                base[ps.name] = reuse_baseline(cfg.baseline, ps, ses.lm, cfg.split, cfg.gen_tokens, cfg.limit,
                                               judge=judge.describe() if judge else None)
            base[B.name].logits = r.logits(enc[B.name], desc="baseline harmless logits")  # KL needs them
        else:
            for ps in sets:
                base[ps.name] = evaluate(r, enc[ps.name], measures(ps), gen_tokens=cfg.gen_tokens,
                                         desc=f"baseline {ps.name}")
        run.time("baseline", time.time() - t0)
        t0 = time.time()
        abl = {ps.name: evaluate(r, enc[ps.name], measures(ps), gen_tokens=cfg.gen_tokens, intervention=ablation(),
                                 desc=f"ablated {ps.name}") for ps in sets}
        run.time("ablated", time.time() - t0)
        conds = [("baseline", ps, base[ps.name], None) for ps in sets]
        conds += [("ablated", ps, abl[ps.name], kl_or_none(abl[ps.name], base[ps.name])) for ps in sets]

        # damage beyond first-token KL, for the base and the ablated model
        damage_rows = {"baseline": {"condition": "baseline"}, "ablated": {"condition": "ablated"}}
        damage_rows["ablated"]["kl_first"] = float(abl[B.name].kl_from(base[B.name]).mean())
        damage_rows["baseline"]["kl_first"] = 0.0
        if cfg.kl_tokens:
            t0 = time.time()
            toks = base[B.name].tokens
            if toks is None or cfg.gen_tokens < cfg.kl_tokens:
                toks = evaluate(r, enc[B.name], [], gen_tokens=cfg.kl_tokens, desc="reference completions").tokens
            fd = forced_damage(r, enc[B.name], reference_completions(toks, cfg.kl_tokens), ablation,
                               desc="multi-token KL")
            sm_fd = fd.summary()
            damage_rows["ablated"].update(kl_multi=sm_fd["kl_multi"], ce=sm_fd["ce"])
            damage_rows["baseline"].update(kl_multi=0.0, ce=sm_fd["ce_base"])
            run.time("multi_token_kl", time.time() - t0)
        if cset is not None:
            from toolkit.capability import capability_check

            t0 = time.time()
            for cond, iv in (("baseline", None), ("ablated", ablation())):
                res = capability_check(r, cset, intervention=iv, desc=f"capability ({cond})")
                damage_rows[cond].update(capability=res.accuracy, capability_ci_low=res.ci_low,
                                         capability_ci_high=res.ci_high, capability_n=res.n)
            run.time("capability", time.time() - t0)
        lm_eval_results = {}
        if lm_tasks:
            from toolkit.lm_eval_adapter import run_lm_eval

            t0 = time.time()
            for cond, iv in (("baseline", None), ("ablated", ablation())):
                res = run_lm_eval(ses.lm, lm_tasks, intervention=iv, limit=cfg.lm_eval_limit,
                                  include_path=cfg.lm_eval_include, batch_size=cfg.batch_size)
                lm_eval_results[cond] = res.describe()
                for task, metrics in res.metrics.items():
                    for k, v in metrics.items():
                        if not k.endswith("stderr"):
                            damage_rows[cond][f"lm_eval:{task}:{k}"] = v
            run.time("lm_eval", time.time() - t0)

        ortho_info = None
        if cfg.save is not None:
            t0 = time.time()
            if edit is not None:
                ortho_info = {"untied_lm_head": False, "exact_equivalent": True, **apply_weight_edit(model, edit)}
            else:
                ortho_info = orthogonalize_weights(model, d) if sel is None else orthogonalize_heads(model, d, sel)
            orth_h = evaluate(r, enc[H.name], measures(H), gen_tokens=cfg.gen_tokens, desc="orthogonalized harmful")
            orth_b = evaluate(r, enc[B.name], measures(B), gen_tokens=0, desc="orthogonalized harmless")
            conds += [("orthogonalized", H, orth_h, kl_or_none(orth_h, base[H.name])),
                      ("orthogonalized", B, orth_b, orth_b.kl_from(base[B.name]))]
            ortho_info["max_abs_logit_diff_vs_hooks"] = float((orth_b.logits - abl[B.name].logits).abs().max())
            if edit is not None:
                ortho_info.update(export_weight_edit(Path(ses.lm.source), edit, cfg.save, dtype=saved_as,
                                                     overwrite=cfg.replace_save))
            elif sel is None:
                ortho_info.update(export_orthogonalized(Path(ses.lm.source), d.vector, cfg.save, dtype=saved_as,
                                                        overwrite=cfg.replace_save))
            else:
                ortho_info.update(export_head_orthogonalized(Path(ses.lm.source), d.vector, sel, cfg.save,
                                                             dtype=saved_as, overwrite=cfg.replace_save))
            run.time("orthogonalized", time.time() - t0)
        rows, summary = [], []
        for cond, ps, ev, kl in conds:
            for i, rec in enumerate(ps.records):
                rows.append({"set": ps.name, "id": rec["id"], "category": rec["category"], "condition": cond,
                             "score": float(ev.scores[i]),
                             "refusal": None if ev.refusals is None else bool(ev.refusals[i]),
                             **judge_columns(ev, i),
                             "kl": None if kl is None else float(kl[i]),
                             "completion": None if ev.completions is None else ev.completions[i]})
            summary.append(evaluation_row(ps.name, ps.split, cond, ev, kl))
        sm = pd.DataFrame(summary)
        dm = pd.DataFrame(list(damage_rows.values()))
        run.write_csv("results.csv", pd.DataFrame(rows))
        run.write_csv("summary.csv", sm)
        run.write_csv("damage.csv", dm)
        results = {"summary": sm.to_dict(orient="records"), "damage": dm.to_dict(orient="records"),
                   "direction": d.describe()}
        if lm_eval_results:
            results["lm_eval"] = lm_eval_results
        if sel is not None:
            results["heads"] = sel.describe()
        if edit_record is not None:
            results["edit"] = edit_record
        if ortho_info is not None:
            results["orthogonalized"] = {"saved_to": str(cfg.save),
                                         "untied_lm_head": ortho_info["untied_lm_head"],
                                         "exact_equivalent": ortho_info["exact_equivalent"],
                                         "n_edited": len(ortho_info["edited"]),
                                         "scope": ("heads" if sel is not None else "writers" if edit is not None
                                                   else "all"),
                                         "max_abs_logit_diff_vs_hooks": ortho_info["max_abs_logit_diff_vs_hooks"],
                                         "compute_dtype": ses.lm.describe()["dtype"],
                                         "source_stored_dtype": ortho_info["stored_dtype"],
                                         "saved_dtype": ortho_info["saved_dtype"]}
        damage = {"kl_first": {"set": B.name, "position": "last prompt token"},
                  "kl_multi": {"set": B.name, "tokens": cfg.kl_tokens,
                               "reference": "the base model's greedy completions"} if cfg.kl_tokens else None,
                  "capability": cset.describe() if cset is not None else None,
                  "lm_eval": {"tasks": lm_tasks, "limit": cfg.lm_eval_limit} if lm_tasks else None,
                  "over_refusal": O.describe() if O is not None else None}
        final = run.finish(model=ses.lm.describe(), prompt_sets=[ps.describe() for ps in sets], seed=cfg.seed,
                           params=cfg.params(direction=d.source, refusal_token_ids=ses.refusal_ids,
                                             windows=list(windows),
                                             top_heads=patch_heads.top_k if patch_heads else cfg.top_heads),
                           results=results, judge=judge.describe() if judge is not None else None, damage=damage)
    scope = "" if sel is None else f" from {len(sel.heads)} head(s) {','.join(sel.labels)}"
    if edit is not None:
        scope = f" as a {cfg.form} edit of the writers" + (" (activation-scaled)" if cfg.activation_scaled else "")
    print_summary(sm, f"ablation of {d.source} (layer {d.layer}, pos {d.position}){scope}: {final}")
    print_damage(dm)
    if ortho_info is not None:
        console.print(f"saved weight-orthogonalized model to {cfg.save} ({ortho_info['saved_dtype']}; "
                      f"untied LM head: "
                      f"{ortho_info['untied_lm_head']}; "
                      f"max |logit difference| vs hook ablation {ortho_info['max_abs_logit_diff_vs_hooks']:.2e})")
    console.print(f"wrote {final}")


def build_fixed_edit(ses, d: Direction, form: str, activation_scaled: bool, train_sets, save: Path | None):
    """The fixed-recipe :class:`toolkit.abliteration.WeightEdit` of ``--form`` on the session's model and its
    ``run.json`` record: the unit direction at every layer, strength 1 (times the separation / max with
    ``activation_scaled``, read from ``resid_pre`` at position -1 of every layer on the training prompts), the
    affine reference levels from the writers' mean outputs on the harmless training prompts.

    Raises:
        ToolkitError: no training prompts; no layer separating the sets (``activation_scaled``); an affine ``save``
            into a model whose writers have no bias (its checkpoint cannot hold the shift).
    """
    from toolkit.optimize import module_means

    lm, r = ses.lm, ses.runner
    L = lm.n_layers
    if form == "affine" and save is not None:
        from toolkit.hooks import decoder_layers, writer_module

        missing = [f"layer {l} {site}" for l in range(L) for site in COMPONENTS.values()
                   if writer_module(decoder_layers(lm.model)[l], site).bias is None]
        if missing:
            raise ToolkitError(f"cannot save the affine edit merged into weights: {missing[0]} (and "
                               f"{len(missing) - 1} more) has no bias to hold the shift in this architecture's "
                               "checkpoint; drop `save` (the affine edit is evaluated as hooks) or use "
                               "`refusal optimize --export ... --adapter`", param="save")
    separation, means, counts = None, None, None
    if train_sets is not None:
        h_train, b_train = train_sets
        if len(h_train) == 0 or len(b_train) == 0:
            raise ToolkitError(f"no training prompts ({h_train.name}: {len(h_train)}, {b_train.name}: {len(b_train)}): "
                               "the separation and the affine means read the train split", param="train_limit")
        counts = {"harmful": len(h_train), "harmless": len(b_train)}
        eb = r.encode(b_train.prompts)
        if activation_scaled:
            eh = r.encode(h_train.prompts)
            xh = r.collect(eh, range(L), ["resid_pre"], [-1], desc="harmful train residuals")["resid_pre"][:, :, 0]
            xb = r.collect(eb, range(L), ["resid_pre"], [-1], desc="harmless train residuals")["resid_pre"][:, :, 0]
            separation = layer_separation(xh, xb, d.vector)
        if form == "affine":
            means = module_means(r, eb, desc="writer means")
    try:
        edit = fixed_edit(d.vector, L, form, module_means=means, separation=separation)
    except ToolkitError as e:
        raise ToolkitError(e.message, param="activation_scaled" if e.param == "separation" else e.param) from None
    record = {"form": form, "activation_scaled": activation_scaled, "components": list(COMPONENTS.values()),
              "strengths": {c: [float(x) for x in w] for c, w in edit.strengths.items()},
              "separation": None if separation is None else [float(x) for x in separation],
              "references": (None if edit.references is None
                             else {c: [float(x) for x in v] for c, v in edit.references.items()}),
              "train_prompts": counts,
              "note": "a fixed edit of the residual writers only (o_proj, down_proj outputs at every layer); unlike "
                      "directional ablation the embedding is not edited, so --form projection differs from the "
                      "default"}
    return edit, record


def print_damage(dm: pd.DataFrame) -> None:
    """Print the damage table (one row per condition)."""
    from rich.table import Table

    t = Table(title="damage (harmless prompts; capability: multiple-choice accuracy)", title_justify="left")
    cols = [c for c in dm.columns if not c.startswith("capability_")]
    for c in cols:
        t.add_column(c, justify="left" if c == "condition" else "right")
    for _, row in dm.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c == "capability" and not pd.isna(v):
                cells.append(f"{v:.3f} [{row['capability_ci_low']:.2f}, {row['capability_ci_high']:.2f}]")
            elif isinstance(v, float):
                cells.append("-" if pd.isna(v) else f"{v:.4f}")
            else:
                cells.append(str(v))
        t.add_row(*cells)
    out.print(t)


def kl_or_none(ev, base):
    """Per-prompt KL(base || ev), or None when the baseline's logits were not computed (reused baseline)."""
    return None if base.logits is None else ev.kl_from(base)
