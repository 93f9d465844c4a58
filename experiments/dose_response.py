"""``refusal dose-response``: refusal, over-refusal, degeneration and coherence against steering strength, with
logistic fits, ED50s and the therapeutic index."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import typer

from toolkit.errors import ToolkitError
from toolkit.hooks import SITES, check_layer
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run
from toolkit.steering import SCALES, measure, parse_alphas, parse_positions, scale_value

from .ablate import check_direction_matches, resolve_direction
from .common import (BatchOpt, DeviceOpt, DtypeOpt, ForceOpt, ModelOpt, NameOpt, QuietOpt, SeedOpt, SystemOpt,
                     console, handle_errors, open_session, out, sweep_bar)
from .steer import PositionsOpt, ScaleOpt, SiteOpt


@handle_errors
def dose_response(
    direction: str = typer.Option(..., "--direction", "-d", help="runs/extract/NAME (or NAME) or a direction file "
                                  "(e.g. runs/steer/NAME/direction_L12.safetensors)"),
    layer: int = typer.Option(None, "--layer", help="layer steered [default: the direction's layer]"),
    site: str = SiteOpt,
    positions: str = PositionsOpt,
    alpha: str = typer.Option("0:1:0.125", "--alpha", help="dose grid: start:stop:step (inclusive) or a list"),
    scale: str = ScaleOpt,
    harmful: str = typer.Option("harmful", "--harmful", help="harmful prompt set (refusal is wanted)"),
    benign: str = typer.Option("borderline", "--benign", help="benign prompt set (refusal is over-refusal)"),
    split: str = typer.Option("test", "--split", help="split of both sets (files without splits: all)"),
    limit: int = typer.Option(None, "--limit", min=2, help="at most N prompts per set"),
    gen_tokens: int = typer.Option(12, "--gen-tokens", min=1, help="greedy tokens generated and judged per prompt"),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=100, help="bootstrap resamples for the ED50 and TI-S intervals"),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="write dose_response.png"),
    model: str = ModelOpt, dtype: str = DtypeOpt, device: str = DeviceOpt, batch_size: int = BatchOpt,
    system: str = SystemOpt, name: str = NameOpt, force: bool = ForceOpt, seed: int = SeedOpt, quiet: bool = QuietOpt,
):
    """Dose-response of steering: for each alpha, generate on harmful and benign prompts and report harmful refusal,
    benign over-refusal and degenerate rates (Wilson 95 % intervals) and coherence; fit logistic curves (statsmodels
    GLM, binomial) and report each ED50 and TI-S = ED50(benign) / ED50(harmful) with bootstrap intervals. A curve
    that does not cross 50 % inside the grid gets no ED50 (no extrapolation).

    Writes runs/dose-response/NAME/ with results.csv (per alpha, set and prompt), summary.csv (per alpha and role),
    fits.csv (per role: logistic coefficients, ED50 and interval), dose_response.png and run.json.
    """
    alphas = parse_alphas(alpha)
    if len(alphas) < 3:
        raise ToolkitError("--alpha needs at least 3 doses to fit a dose-response curve")
    if site not in SITES:
        raise ToolkitError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}")
    if scale not in SCALES:
        raise ToolkitError(f"--scale must be one of {', '.join(SCALES)}, got {scale!r}")
    if gen_tokens < 1:
        raise ToolkitError("--gen-tokens must be >= 1: refusal is judged on completions")
    if bootstrap < 100:
        raise ToolkitError("--bootstrap needs at least 100 resamples")
    if limit is not None and limit < 2:
        raise ToolkitError("--limit must be >= 2")
    dvec, dmeta, dsource = resolve_direction(direction)
    sets = []
    for role, spec in (("harmful", harmful), ("benign", benign)):
        ps = load_prompt_set(spec)
        ps = ps.select(split).head(limit)
        sets.append((role, ps))
    sets = list(zip([r for r, _ in sets], distinct_names([ps for _, ps in sets])))
    with Run("dose-response", name, force) as run:
        ses = open_session(model, dtype, device, batch_size, system, quiet, seed)
        r, lm = ses.runner, ses.lm
        check_direction_matches(dmeta, dvec.shape[0], lm)
        if layer is None:
            if dmeta.get("layer") is None:
                raise ToolkitError("the direction file names no layer; pass --layer")
            layer = int(dmeta["layer"])
        layer = check_layer(lm.model, layer)
        pos = parse_positions(positions, ses.fmt.post_positions())
        encs = [r.encode(ps.prompts) for _, ps in sets]
        # the resid scale: mean residual norm at the layer over both sets' post-instruction tokens
        t0 = time.time()
        norms = []
        for enc in encs:
            a = r.collect(enc, [layer], [site], ses.fmt.post_positions(), desc="residual norm")[site]
            norms.append(a.norm(dim=-1).flatten())
        resid_norm = float(np.concatenate([n.numpy() for n in norms]).astype(np.float64).mean())
        raw = float(dvec.double().norm())
        s = scale_value(scale, raw, resid_norm)
        coh = [r.context(enc, 1, desc="prompt cache") for enc in encs]  # coherence passes: completion tokens only
        vec = (dvec.double() / raw).float() * s
        run.time("norms", time.time() - t0)

        t0 = time.time()
        rows = []
        with sweep_bar(r, len(alphas) * len(sets), "dose-response", quiet) as bar:
            for a in alphas:
                for (role, ps), enc, cctx in zip(sets, encs, coh):
                    res = measure(r, enc, ses.refusal_ids, gen_tokens, vector=vec, layers=[layer], alpha=a,
                                  positions=pos, site=site, coherence_context=cctx)
                    for i, rec in enumerate(ps.records):
                        rows.append({"alpha": a, "set": ps.name, "role": role, "id": rec["id"],
                                     "score": float(res["score"][i]), "refusal": bool(res["refusal"][i]),
                                     "degenerate": bool(res["degenerate"][i]),
                                     "coherence": float(res["coherence"][i]), "completion": res["completion"][i]})
                    bar.update(1)
        run.time("sweep", time.time() - t0)
        df = pd.DataFrame(rows)
        summary = summarise_doses(df)
        t0 = time.time()
        fits, curves, ti = fit_curves(df, alphas, bootstrap, seed)
        run.time("fits", time.time() - t0)
        run.write_csv("results.csv", df)
        run.write_csv("summary.csv", summary)
        run.write_csv("fits.csv", fits)
        if plot:
            from toolkit.plots import dose_response_plot

            dose_response_plot(summary, curves, run.path("dose_response.png"))
        results = {"fits": fits.to_dict(orient="records"), "therapeutic_index": ti, "alphas": alphas,
                   "layer": layer, "scale": {"kind": scale, "value": s, "resid_norm": resid_norm, "raw_norm": raw},
                   "direction": {"source": dsource, **dmeta}}
        final = run.finish(model=lm.describe(), prompt_sets=[ps.describe() | {"role": role} for role, ps in sets],
                           seed=seed, params={"direction": dsource, "layer": layer, "site": site,
                                              "positions": positions, "alpha": alpha, "scale": scale, "split": split,
                                              "limit": limit, "gen_tokens": gen_tokens, "bootstrap": bootstrap,
                                              "system": system, "refusal_token_ids": ses.refusal_ids},
                           results=results)
    print_dose(summary, fits, ti)
    console.print(f"wrote {final}")


def summarise_doses(df: pd.DataFrame) -> pd.DataFrame:
    """Per alpha and role (harmful, benign, and ``all`` for both sets together): refusal and degenerate rates with
    Wilson 95 % intervals, mean coherence (nats/token, t interval) and mean refusal score."""
    from toolkit.stats import mean_summary, rate_summary

    rows = []
    groups = [(a, role, g) for (a, role), g in df.groupby(["alpha", "role"], sort=True)]
    groups += [(a, "all", g) for a, g in df.groupby("alpha", sort=True)]
    for a, role, g in groups:
        row = {"alpha": a, "role": role, "n": len(g)}
        for col in ("refusal", "degenerate"):
            s = rate_summary(g[col].astype(bool).tolist())
            row.update({f"{col}_rate": s["rate"], f"{col}_ci_low": s["ci_low"], f"{col}_ci_high": s["ci_high"]})
        c = mean_summary(g["coherence"].dropna().to_numpy(float))
        row.update({"coherence": c["mean"], "coherence_ci_low": c["ci_low"], "coherence_ci_high": c["ci_high"],
                    "mean_score": float(g["score"].mean())})
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["role", "alpha"], kind="stable").reset_index(drop=True)


def _outcomes(df: pd.DataFrame, role: str, alphas: list[float]) -> np.ndarray:
    """``[n_prompts, n_alphas]`` refusal outcomes of one role (prompts observed at every dose)."""
    t = df[df.role == role].pivot(index="id", columns="alpha", values="refusal")
    return t[alphas].to_numpy(bool)


def fit_curves(df: pd.DataFrame, alphas: list[float], n_resamples: int, seed: int):
    """Logistic fits, ED50s with bootstrap intervals per role, and the therapeutic index.

    Returns:
        (fits table, ``{role: {"intercept", "slope", "ed50"}}`` for the plot, therapeutic-index dict).
    """
    from toolkit.stats import bootstrap_ed50, logistic_fit, therapeutic_index

    lo, hi = min(alphas), max(alphas)
    rows, curves, ys = [], {}, {}
    for role in ("harmful", "benign"):
        y = _outcomes(df, role, alphas)
        ys[role] = y
        fit = logistic_fit(np.tile(alphas, y.shape[0]), y.reshape(-1))
        b = bootstrap_ed50(alphas, y, lo, hi, n_resamples=n_resamples, seed=seed)
        rows.append({"role": role, "measure": "refusal" if role == "harmful" else "over-refusal",
                     "intercept": fit.intercept, "slope": fit.slope, "se_slope": fit.se_slope,
                     "converged": fit.converged, "fit_status": fit.status, "ed50": b["ed50"], "reason": b["reason"],
                     "ci_low": b["ci_low"], "ci_high": b["ci_high"], "n_inside": b["n_inside"],
                     "n_resamples": b["n_resamples"], "method": b["method"]})
        curves[role] = {"intercept": fit.intercept, "slope": fit.slope, "ed50": b["ed50"]}
    ti = therapeutic_index(alphas, ys["harmful"], ys["benign"], lo, hi, n_resamples=n_resamples, seed=seed)
    return pd.DataFrame(rows), curves, ti


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
