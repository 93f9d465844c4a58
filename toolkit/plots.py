"""Figures (matplotlib with seaborn styling, Agg backend: files only, no window ever opens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt


def steer_plot(summary: pd.DataFrame, band: pd.DataFrame, path: Path) -> Path:
    """Score (and refusal rate, when judged) against alpha: the steered direction with its 95 % interval beside
    the random and orthogonal-random bands (2.5th-97.5th percentile of the control directions' means).

    One column per evaluated set/part, one row per layer and measure. Writes a PNG at ``path``.
    """
    plt = _plt()
    metrics = [("mean_score", "mean refusal score")]
    if "refusal_rate" in summary.columns and summary["refusal_rate"].notna().any():
        metrics.append(("refusal_rate", "refusal rate"))
    groups = list(dict.fromkeys(zip(summary["set"], summary["part"])))
    layers = sorted(summary["layer"].unique())
    nr, nc = len(layers) * len(metrics), len(groups)
    fig, axes = plt.subplots(nr, nc, figsize=(3.6 * nc, 2.8 * nr), squeeze=False, sharex=True)
    for li, layer in enumerate(layers):
        for mi, (m, label) in enumerate(metrics):
            for gi, (set_, part) in enumerate(groups):
                ax = axes[li * len(metrics) + mi, gi]
                sel = (summary.layer == layer) & (summary.set == set_) & (summary.part == part)
                learned = summary[sel & (summary.kind == "learned")].sort_values("alpha")
                b = band[(band.layer == layer) & (band.set == set_) & (band.part == part)].sort_values("alpha")
                for kind, colour in (("random", "0.55"), ("orthogonal", "tab:blue")):
                    lo, hi = f"{m}_{kind}_low", f"{m}_{kind}_high"
                    if lo in b.columns and b[lo].notna().any():
                        ax.fill_between(b.alpha, b[lo], b[hi], color=colour, alpha=0.25, lw=0,
                                        label=f"{kind} 95% band")
                        ax.plot(b.alpha, b[f"{m}_{kind}_mean"], color=colour, ls="--", lw=1)
                ax.plot(learned.alpha, learned[m], color="tab:red", marker="o", ms=3, label="steered direction")
                ci = ("score_ci_low", "score_ci_high") if m == "mean_score" else ("refusal_ci_low", "refusal_ci_high")
                if ci[0] in learned.columns:
                    ax.fill_between(learned.alpha, learned[ci[0]], learned[ci[1]], color="tab:red", alpha=0.15, lw=0)
                ax.axvline(0, color="k", lw=0.5)
                ax.set_title(f"L{layer} {set_} ({part})", fontsize=9)
                ax.set_ylabel(label)
                if m == "refusal_rate":
                    ax.set_ylim(-0.02, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("alpha")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=max(1, len(labels)), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def dose_response_plot(summary: pd.DataFrame, curves: dict, path: Path) -> Path:
    """Harmful refusal, benign over-refusal and degenerate rates against alpha with Wilson 95 % intervals, the
    fitted logistic curves and their ED50s (vertical lines, only where an ED50 exists inside the grid).

    Args:
        summary: one row per (alpha, role) with ``refusal_rate``, ``refusal_ci_low/high``, ``degenerate_rate``,
            ``degenerate_ci_low/high``.
        curves: ``{role: {"intercept", "slope", "ed50"}}`` (a missing key or None skips that curve).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    grid = np.linspace(summary.alpha.min(), summary.alpha.max(), 200)
    series = [("harmful", "refusal", "tab:red", "harmful refusal"),
              ("benign", "refusal", "tab:blue", "benign over-refusal"),
              ("all", "degenerate", "0.4", "degenerate (both sets)")]
    for role, m, colour, label in series:
        s = summary[summary.role == role].sort_values("alpha")
        if s.empty:
            continue
        err = np.vstack([s[f"{m}_rate"] - s[f"{m}_ci_low"], s[f"{m}_ci_high"] - s[f"{m}_rate"]])
        c = curves.get(role) if m == "refusal" else None
        if c is not None:
            ed = c.get("ed50")
            label += f" (ED50 {ed:.3g})" if ed is not None and np.isfinite(ed) else " (no ED50 in the grid)"
        ax.errorbar(s.alpha, s[f"{m}_rate"], yerr=err, color=colour, marker="o", ms=4, lw=0 if m == "refusal" else 1,
                    elinewidth=1, capsize=2, label=label)
        if c and c.get("slope") is not None and np.isfinite(c["slope"]):
            ax.plot(grid, 1 / (1 + np.exp(-(c["intercept"] + c["slope"] * grid))), color=colour, lw=1.5)
            if c.get("ed50") is not None and np.isfinite(c["ed50"]):
                ax.axvline(c["ed50"], color=colour, ls=":", lw=1)
    ax.axhline(0.5, color="k", lw=0.5, ls="--")
    ax.set_xlabel("alpha")
    ax.set_ylabel("rate")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
