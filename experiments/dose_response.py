"""``refusal dose-response``: refusal, over-refusal, degeneration and coherence against steering strength, with
logistic fits, ED50s and the therapeutic index."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import pandas as pd
from pydantic import Field

from toolkit.directions import Direction
from toolkit.errors import ToolkitError
from toolkit.evaluation import Coherence, Degeneration, evaluate, judged
from toolkit.judges import parse_windows
from toolkit.index_spec import LayerSpec, PositionSpec, check_site
from toolkit.interventions import activation_addition
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run
from toolkit.steering import parse_alphas, scale_value
from toolkit.steering_summary import fit_curves, summarise_doses

from .shared import (DirectionSpec, JudgeOptions, ModelOptions, RunOptions, SteerPositions, SteerScale, SteerSite, command,
                     console, judge_columns, out, sweep_bar)


class DoseResponseConfig(ModelOptions, JudgeOptions, RunOptions):
    """``refusal dose-response``'s options."""

    direction: DirectionSpec = Field(..., description="runs/extract/NAME (or NAME) or a direction file (e.g. "
                                     "runs/steer/NAME/direction_L12.safetensors)")
    layer: Optional[int] = Field(None, description="layer steered [default: the direction's layer]")
    site: SteerSite = None
    positions: SteerPositions = "post"
    alpha: str = Field("0:1:0.125", description="dose grid: start:stop:step (inclusive) or a list")
    scale: SteerScale = "resid"
    harmful: str = Field("harmful", description="harmful prompt set (refusal is wanted)")
    benign: str = Field("borderline", description="benign prompt set (refusal is over-refusal)")
    split: str = Field("test", description="split of both sets (files without splits: all)")
    limit: Optional[int] = Field(None, ge=2, description="at most N prompts per set")
    gen_tokens: int = Field(12, ge=1, description="greedy tokens generated and judged per prompt")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples for the ED50 and TI-S intervals")
    plot: bool = Field(True, description="write dose_response.png")


@command(DoseResponseConfig)
def dose_response(cfg: DoseResponseConfig):
    """Dose-response of steering: for each alpha, generate on harmful and benign prompts and report harmful refusal,
    benign over-refusal and degenerate rates (Wilson 95 % intervals) and coherence; fit logistic curves (statsmodels
    GLM, binomial) and report each ED50 and TI-S = ED50(benign) / ED50(harmful) with bootstrap intervals. A curve
    that does not cross 50 % inside the grid gets no ED50 (no extrapolation).

    Writes runs/dose-response/NAME/ with results.csv (per alpha, set and prompt), summary.csv (per alpha and role),
    fits.csv (per role: logistic coefficients, ED50 and interval), dose_response.png and run.json.
    """
    alphas = parse_alphas(cfg.alpha)
    if len(alphas) < 3:
        raise ToolkitError("needs at least 3 doses to fit a dose-response curve", param="alpha")
    pos_spec = PositionSpec.parse(cfg.positions)
    d = Direction.resolve(cfg.direction)
    site = check_site(cfg.site or d.site or "resid_pre")
    if cfg.layer is None and d.layer is None:
        raise ToolkitError("the direction file names no layer; pass `layer`")
    layer_spec = LayerSpec.of([d.layer], "direction") if cfg.layer is None else LayerSpec.of([cfg.layer], "layer")
    sets = []
    for role, spec in (("harmful", cfg.harmful), ("benign", cfg.benign)):
        ps = load_prompt_set(spec).select(cfg.split).head(cfg.limit)
        sets.append((role, ps))
    sets = list(zip([r for r, _ in sets], distinct_names([ps for _, ps in sets])))
    with Run("dose-response", cfg.name, cfg.force) as run:
        ses = cfg.open_session()
        judge = cfg.open_judge(quiet=cfg.quiet)
        windows = parse_windows(cfg.windows, cfg.gen_tokens)
        r, lm = ses.runner, ses.lm
        d.check(lm)
        (layer,) = layer_spec.resolve(lm.n_layers)
        pos = pos_spec.resolve(ses.fmt.post_positions())
        pos = None if pos is None else list(pos)
        encs = [r.encode(ps.prompts) for _, ps in sets]
        # the resid scale: mean residual norm at the layer over both sets' post-instruction tokens
        t0 = time.time()
        norms = []
        for enc in encs:
            a = r.collect(enc, [layer], [site], ses.fmt.post_positions(), desc="residual norm")[site]
            norms.append(a.norm(dim=-1).flatten())
        resid_norm = float(np.concatenate([n.numpy() for n in norms]).astype(np.float64).mean())
        raw = d.norm
        s = scale_value(cfg.scale, raw, resid_norm)
        coh = [r.context(enc, 1, desc="prompt cache") for enc in encs]  # coherence passes: completion tokens only
        vec = (d.vector.double() / raw).float() * s
        run.time("norms", time.time() - t0)

        t0 = time.time()
        rows = []
        with sweep_bar(r, len(alphas) * len(sets), "dose-response", cfg.quiet) as bar:
            for a in alphas:
                for (role, ps), enc, cctx in zip(sets, encs, coh):
                    steering = (activation_addition(lm.model, vec, [layer], alpha=a, positions=pos, site=site)
                                if a != 0 else None)
                    res = evaluate(r, enc, [*judged(ses.refusal_ids, judge, ps.prompts, windows), Degeneration(),
                                            Coherence(cctx)],
                                   gen_tokens=cfg.gen_tokens, intervention=steering, desc="dose-response")
                    v = {k: res.get(k) for k in ("refusal", "degenerate", "coherence")}
                    for i, rec in enumerate(ps.records):
                        rows.append({"alpha": a, "set": ps.name, "role": role, "id": rec["id"],
                                     "score": float(res.scores[i]), "refusal": bool(v["refusal"][i]),
                                     "degenerate": bool(v["degenerate"][i]),
                                     "coherence": float(v["coherence"][i]), **judge_columns(res, i),
                                     "completion": res.completions[i]})
                    bar.update(1)
        run.time("sweep", time.time() - t0)
        df = pd.DataFrame(rows)
        summary = summarise_doses(df)
        t0 = time.time()
        fits, curves, ti = fit_curves(df, alphas, cfg.bootstrap, cfg.seed)
        run.time("fits", time.time() - t0)
        run.write_csv("results.csv", df)
        run.write_csv("summary.csv", summary)
        run.write_csv("fits.csv", fits)
        if cfg.plot:
            from toolkit.plots import dose_response_plot

            dose_response_plot(summary, curves, run.path("dose_response.png"))
        results = {"fits": fits.to_dict(orient="records"), "therapeutic_index": ti, "alphas": alphas,
                   "layer": layer, "scale": {"kind": cfg.scale, "value": s, "resid_norm": resid_norm, "raw_norm": raw},
                   "direction": d.describe()}
        final = run.finish(model=lm.describe(), prompt_sets=[ps.describe() | {"role": role} for role, ps in sets],
                           seed=cfg.seed, params=cfg.params(direction=d.source, layer=layer, site=site,
                                                            refusal_token_ids=ses.refusal_ids),
                           results=results, judge=judge.describe())
    print_dose(summary, fits, ti)
    console.print(f"wrote {final}")


def print_dose(summary: pd.DataFrame, fits: pd.DataFrame, ti: dict) -> None:
    """Print rates per alpha, then the ED50s and the therapeutic index."""
    from rich.table import Table

    t = Table(title="dose-response (Wilson 95 % intervals)", title_justify="left")
    for c in ("alpha", "harmful refusal", "benign over-refusal", "degenerate", "coherence"):
        t.add_column(c, justify="right")
    piv = {(r.alpha, r.role): r for r in summary.itertuples()}
    for a in sorted(summary.alpha.unique()):
        h, b, al = piv[(a, "harmful")], piv[(a, "benign")], piv[(a, "all")]
        t.add_row(f"{a:g}", *[f"{x.refusal_rate:.2f} [{x.refusal_ci_low:.2f}, {x.refusal_ci_high:.2f}]" for x in (h, b)],
                  f"{al.degenerate_rate:.2f} [{al.degenerate_ci_low:.2f}, {al.degenerate_ci_high:.2f}]",
                  f"{al.coherence:.2f}")
    out.print(t)
    for f in fits.itertuples():
        if f.ed50 is None or pd.isna(f.ed50):
            out.print(f"ED50 {f.role} {f.measure}: none ({f.reason})", highlight=False)
        else:
            out.print(f"ED50 {f.role} {f.measure}: {f.ed50:.3f} [{f.ci_low:.3f}, {f.ci_high:.3f}] "
                      f"({f.n_inside}/{f.n_resamples} resamples inside the grid)", highlight=False)
    if ti.get("ti") is not None:
        n_def, n_all = ti.get("n_ti_defined", 0), ti.get("n_resamples", 0)
        note = f" ({n_def}/{n_all} bootstrap resamples have both ED50s positive"
        if n_all and n_def < 0.95 * n_all:
            note += "; in the rest TI-S is undefined, so this interval is conditional and unreliable: see the window"
        out.print(f"TI-S = ED50(benign) / ED50(harmful) = {ti['ti']:.2f} [{ti['ti_ci_low']:.2f}, "
                  f"{ti['ti_ci_high']:.2f}]{note})", highlight=False)
    else:
        out.print(f"TI-S: not defined ({ti.get('ti_reason')})", highlight=False)
    if ti.get("window") is not None:
        out.print(f"therapeutic window ED50(benign) - ED50(harmful) = {ti['window']:.3f} "
                  f"[{ti['window_ci_low']:.3f}, {ti['window_ci_high']:.3f}]", highlight=False)
