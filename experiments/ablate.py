"""``refusal ablate``: evaluate with the refusal direction ablated; optionally save an orthogonalized model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import pandas as pd
from pydantic import Field

from toolkit.checkpoints import check_export_target, check_save_path, export_orthogonalized
from toolkit.directions import Direction
from toolkit.evaluation import evaluate, judged
from toolkit.interventions import directional_ablation, orthogonalize_weights
from toolkit.models import dtype_from_name
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run, reuse_baseline

from .shared import Cli, ModelOptions, RunOptions, command, console, print_summary, summary_row


class AblateConfig(ModelOptions, RunOptions):
    """The options of ``refusal ablate``."""

    direction: Annotated[str, Cli("--direction", "-d")] = Field(
        ..., description="runs/extract/NAME (or NAME) or a direction file")
    harmful: str = Field("harmful", description="harmful prompt set")
    harmless: str = Field("harmless", description="harmless prompt set")
    split: str = Field("test", description="split evaluated: train, val, test or all (files without splits: all)")
    limit: Optional[int] = Field(None, ge=1, description="evaluate only the first N prompts of each set")
    gen_tokens: int = Field(12, ge=0, description="greedy completion length judged by the refusal markers")
    baseline: Optional[str] = Field(None, description="reuse the per-prompt baseline of a score run (same model, "
                                    "prompt files, split and --gen-tokens) instead of recomputing it")
    save: Optional[Path] = Field(None, description="write a weight-orthogonalized Hugging Face checkpoint here and "
                                 "evaluate it on the harmful set")
    replace_save: bool = Field(False, description="let --save replace an existing checkpoint folder (never the "
                               "--model folder, nor a folder without config.json); --force replaces runs only")
    save_dtype: str = Field("auto", description="dtype of the --save checkpoint: auto (the source checkpoint's "
                            "stored dtype, whatever --dtype computes in), float32, bfloat16, float16")


@command(AblateConfig)
def ablate(cfg: AblateConfig):
    """Ablate the refusal direction (directional ablation at every layer, all positions) and report harmful and
    harmless refusal before/after and KL divergence on harmless prompts.

    Writes runs/ablate/NAME/ with results.csv (per prompt and condition), summary.csv and run.json. With --save,
    also a weight-orthogonalized checkpoint that plain transformers loads, evaluated as a third condition; it is
    computed from the source checkpoint's weights and keeps their stored dtype unless --save-dtype says otherwise.
    """
    saved_as = None if cfg.save_dtype == "auto" else dtype_from_name(cfg.save_dtype, "--save-dtype")
    d = Direction.resolve(cfg.direction)
    H = load_prompt_set(cfg.harmful).select(cfg.split).head(cfg.limit)
    B = load_prompt_set(cfg.harmless).select(cfg.split).head(cfg.limit)
    H, B = distinct_names([H, B])
    if cfg.save is not None:
        check_save_path(cfg.save, overwrite=cfg.replace_save, what="the --save checkpoint")
        if cfg.model and Path(cfg.model).expanduser().is_dir():
            check_export_target(Path(cfg.model).expanduser(), cfg.save, overwrite=cfg.replace_save)
    with Run("ablate", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        d.check(ses.lm)
        if cfg.save is not None:
            check_export_target(Path(ses.lm.source), cfg.save, overwrite=cfg.replace_save)
        r = ses.runner
        eh, eb = r.encode(H.prompts), r.encode(B.prompts)
        t0 = time.time()
        if cfg.baseline:
            base_h = reuse_baseline(cfg.baseline, H, ses.lm, cfg.split, cfg.gen_tokens, cfg.limit)
            base_b = reuse_baseline(cfg.baseline, B, ses.lm, cfg.split, cfg.gen_tokens, cfg.limit)
            base_b.logits = r.logits(eb, desc="baseline harmless logits")  # KL needs the full distribution
        else:
            base_h = evaluate(r, eh, judged(ses.refusal_ids), gen_tokens=cfg.gen_tokens, desc="baseline harmful")
            base_b = evaluate(r, eb, judged(ses.refusal_ids), gen_tokens=cfg.gen_tokens, desc="baseline harmless")
        run.time("baseline", time.time() - t0)
        t0 = time.time()
        with directional_ablation(ses.lm.model, d):
            abl_h = evaluate(r, eh, judged(ses.refusal_ids), gen_tokens=cfg.gen_tokens, desc="ablated harmful")
            abl_b = evaluate(r, eb, judged(ses.refusal_ids), gen_tokens=cfg.gen_tokens, desc="ablated harmless")
        run.time("ablated", time.time() - t0)
        conds = [("baseline", H, base_h, None), ("baseline", B, base_b, None),
                 ("ablated", H, abl_h, kl_or_none(abl_h, base_h)), ("ablated", B, abl_b, abl_b.kl_from(base_b))]
        ortho_info = None
        if cfg.save is not None:
            t0 = time.time()
            ortho_info = orthogonalize_weights(ses.lm.model, d)
            orth_h = evaluate(r, eh, judged(ses.refusal_ids), gen_tokens=cfg.gen_tokens,
                              desc="orthogonalized harmful")
            orth_b = evaluate(r, eb, judged(ses.refusal_ids), gen_tokens=0, desc="orthogonalized harmless")
            conds += [("orthogonalized", H, orth_h, kl_or_none(orth_h, base_h)),
                      ("orthogonalized", B, orth_b, orth_b.kl_from(base_b))]
            ortho_info["max_abs_logit_diff_vs_hooks"] = float((orth_b.logits - abl_b.logits).abs().max())
            ortho_info.update(export_orthogonalized(Path(ses.lm.source), d.vector, cfg.save, dtype=saved_as,
                                                    overwrite=cfg.replace_save))
            run.time("orthogonalized", time.time() - t0)
        rows, summary = [], []
        for cond, ps, ev, kl in conds:
            for i, rec in enumerate(ps.records):
                rows.append({"set": ps.name, "id": rec["id"], "category": rec["category"], "condition": cond,
                             "score": float(ev.scores[i]),
                             "refusal": None if ev.refusals is None else bool(ev.refusals[i]),
                             "kl": None if kl is None else float(kl[i]),
                             "completion": None if ev.completions is None else ev.completions[i]})
            summary.append(summary_row(ps.name, ps.split, cond, ev.refusals, ev.scores, kl))
        sm = pd.DataFrame(summary)
        run.write_csv("results.csv", pd.DataFrame(rows))
        run.write_csv("summary.csv", sm)
        results = {"summary": sm.to_dict(orient="records"), "direction": d.describe()}
        if ortho_info is not None:
            results["orthogonalized"] = {"saved_to": str(cfg.save),
                                         "untied_lm_head": ortho_info["untied_lm_head"],
                                         "exact_equivalent": ortho_info["exact_equivalent"],
                                         "n_edited": len(ortho_info["edited"]),
                                         "max_abs_logit_diff_vs_hooks": ortho_info["max_abs_logit_diff_vs_hooks"],
                                         "compute_dtype": ses.lm.describe()["dtype"],
                                         "source_stored_dtype": ortho_info["stored_dtype"],
                                         "saved_dtype": ortho_info["saved_dtype"]}
        final = run.finish(model=ses.lm.describe(), prompt_sets=[H.describe(), B.describe()], seed=cfg.seed,
                           params=cfg.params(direction=d.source, refusal_token_ids=ses.refusal_ids),
                           results=results)
    print_summary(sm, f"ablation of {d.source} (layer {d.layer}, pos {d.position}): {final}")
    if ortho_info is not None:
        console.print(f"saved weight-orthogonalized model to {cfg.save} ({ortho_info['saved_dtype']}; "
                      f"untied LM head: "
                      f"{ortho_info['untied_lm_head']}; "
                      f"max |logit difference| vs hook ablation {ortho_info['max_abs_logit_diff_vs_hooks']:.2e})")
    console.print(f"wrote {final}")


def kl_or_none(ev, base):
    """Per-prompt KL(base || ev), or None when the baseline's logits were not computed (reused baseline)."""
    return None if base.logits is None else ev.kl_from(base)
