"""Figures (matplotlib with seaborn styling, Agg backend: files only, no window ever opens), including the
per-layer pictures of residual projections (:mod:`toolkit.projection`) and their animated GIF (Pillow)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import ToolkitError

if TYPE_CHECKING:
    from .projection import Frame


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


def cones_plot(cones: pd.DataFrame, pairs: pd.DataFrame, layer: int, path: Path) -> Path:
    """Concept cones across layers: mean pairwise |cos| and dimensionality (entropy effective rank) with their
    bootstrap 95 % intervals beside the random-split null band, and the pairwise cosine matrix at ``layer``.
    Writes a PNG at ``path``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (v, lo, hi, nlo, nhi, title) in zip(axes[:2], (
            ("mean_abs_cos", "cos_ci_low", "cos_ci_high", "cos_null_low", "cos_null_high", "mean pairwise |cos|"),
            ("dim", "dim_ci_low", "dim_ci_high", "dim_null_low", "dim_null_high", "cone dimensionality (eff. rank)"))):
        c = cones.sort_values("layer")
        if c[nlo].notna().any():
            ax.fill_between(c.layer, c[nlo], c[nhi], color="0.6", alpha=0.35, lw=0, label="random groups (95 %)")
        if c[lo].notna().any():
            ax.fill_between(c.layer, c[lo], c[hi], color="tab:red", alpha=0.25, lw=0, label="bootstrap 95 % CI")
        ax.plot(c.layer, c[v], color="tab:red", marker="o", ms=3, label="categories")
        ax.axvline(layer, color="0.3", ls=":", lw=1)
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.legend(fontsize=7)
    p = pairs[pairs.layer == layer]
    cats = list(dict.fromkeys(list(p.a) + list(p.b)))
    m = np.eye(len(cats))
    for _, r in p.iterrows():
        i, j = cats.index(r.a), cats.index(r.b)
        m[i, j] = m[j, i] = r.cos
    import seaborn as sns

    sns.heatmap(pd.DataFrame(m, index=cats, columns=cats), ax=axes[2], vmin=-1, vmax=1, cmap="RdBu_r",
                annot=len(cats) <= 12, fmt=".2f", annot_kws={"size": 6}, square=True, cbar_kws={"shrink": 0.7})
    axes[2].set_title(f"cosines of category directions, layer {layer}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def imprint_plot(layers: pd.DataFrame, path: Path) -> Path:
    """Alignment imprints side by side: per-layer strength (relative to the mean residual norm where known, else
    raw), cosine between adjacent layers' directions and, for runs of one model, the cosine with the first run's
    direction at each layer. ``layers`` is ``layers.csv`` of ``refusal imprint``. Writes a PNG at ``path``."""
    plt = _plt()
    panels = [("strength_rel" if layers["strength_rel"].notna().any() else "strength", "strength"),
              ("cos_next", "cos(layer l, layer l+1)")]
    if "cos_first_run" in layers.columns and layers["cos_first_run"].notna().any():
        panels.append(("cos_first_run", "cos with the first run's direction"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False)
    for ax, (col, title) in zip(axes[0], panels):
        for run, g in layers.groupby("run", sort=False):
            y = g[col] if col != "strength_rel" or g[col].notna().any() else g["strength"]
            ax.plot(g.layer, y, marker="o", ms=3, label=run)
        ax.set_xlabel("layer")
        ax.set_title(title + (" / mean residual norm" if col == "strength_rel" else ""))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _effect_panel(ax, mat: np.ndarray, vmax: float, annotate: bool):
    """One diverging heatmap panel centred on 0 (``RdBu_r``, limits ``-vmax..vmax``); NaN cells are left blank."""
    im = ax.imshow(mat, cmap="RdBu_r", vmin=-vmax, vmax=vmax, origin="lower", aspect="auto", interpolation="nearest")
    if annotate:
        for (i, j), v in np.ndenumerate(mat):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if abs(v) > 0.6 * vmax else "black")
    ax.grid(False)
    return im


def _limit(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(max(1.0, finite.max() if finite.size else 1.0))


def patch_heatmap(summary: pd.DataFrame, path: Path, title: str, position_labels: dict | None = None,
                  value: str = "normalised", label: str = "normalised (0 = corrupted, 1 = clean)") -> Path:
    """Activation patching per site: one panel per site, layer (y) x position (x), coloured by ``value`` (the
    normalised effect: 0 = corrupted baseline, 1 = clean baseline; or another column such as ``effect``) on a
    diverging map centred on 0 whose limits are +-max(1, largest |value|), so 1 always has the same colour.
    Cells are annotated when there are at most 240 per panel.

    Args:
        summary: rows of one direction with ``site``, ``layer``, ``position`` (int) and ``value``; head rows
            (``head`` not null) are ignored.
        title: figure title (say which direction and what 0 and 1 mean).
        position_labels: optional ``{position: token text}`` shown beside the position ticks.
        label: colour bar label.

    Writes a PNG at ``path`` and returns it.
    """
    plt = _plt()
    s = summary[summary["head"].isna()] if "head" in summary.columns else summary
    sites = list(dict.fromkeys(s["site"]))
    layers = sorted(s["layer"].unique())
    positions = sorted(s["position"].astype(int).unique())
    vmax = _limit(s[value].to_numpy(float))
    fig, axes = plt.subplots(1, max(1, len(sites)), squeeze=False, layout="constrained",
                             figsize=(1.5 + 0.45 * len(positions) * max(1, len(sites)), 1.8 + 0.22 * len(layers)))
    labels = position_labels or {}
    im = None
    for ax, site in zip(axes[0], sites):
        g = s[s.site == site]
        mat = np.full((len(layers), len(positions)), np.nan)
        for _, r in g.iterrows():
            mat[layers.index(r["layer"]), positions.index(int(r["position"]))] = r[value]
        im = _effect_panel(ax, mat, vmax, annotate=mat.size <= 240)
        ax.set_title(site, fontsize=9)
        ax.set_xticks(range(len(positions)))
        ax.set_xticklabels([f"{p} {labels[p]}" if p in labels else str(p) for p in positions], fontsize=6,
                           rotation=90)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels([str(l) for l in layers], fontsize=6)
        ax.set_xlabel("position from the end (token)", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.9).set_label(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def heads_heatmap(summary: pd.DataFrame, path: Path, title: str, value: str = "normalised",
                  label: str = "normalised (0 = corrupted, 1 = clean)") -> Path:
    """Per-head activation patching: layer (y) x query head (x, with its key/value group), coloured by ``value``
    like :func:`patch_heatmap`.

    Args:
        summary: rows of one direction with ``layer``, ``head`` (int), ``kv_group`` and ``value``; rows without a
            head are ignored.
        label: colour bar label.

    Writes a PNG at ``path`` and returns it.
    """
    plt = _plt()
    s = summary[summary["head"].notna()]
    layers = sorted(s["layer"].unique())
    heads = sorted(s["head"].astype(int).unique())
    groups = dict(zip(s["head"].astype(int), s["kv_group"].astype(int)))
    mat = np.full((len(layers), len(heads)), np.nan)
    for _, r in s.iterrows():
        mat[layers.index(r["layer"]), heads.index(int(r["head"]))] = r[value]
    vmax = _limit(mat)
    fig, ax = plt.subplots(layout="constrained", figsize=(2.2 + 0.45 * len(heads), 1.8 + 0.22 * len(layers)))
    im = _effect_panel(ax, mat, vmax, annotate=mat.size <= 400)
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([f"{h}\nkv{groups[h]}" for h in heads], fontsize=6)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([str(l) for l in layers], fontsize=6)
    ax.set_xlabel("query head (key/value group)", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.9).set_label(label, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------- residual projections
def default_colors(n: int) -> list[str]:
    """``n`` colours from seaborn's ``deep`` palette as hex: blue for the reference set, red for the second
    (harmless blue / harmful red), then green, orange, purple, brown, pink, grey, olive, cyan (repeating)."""
    import seaborn as sns

    deep = sns.color_palette("deep", 10).as_hex()
    order = [0, 3, 2, 1, 4, 5, 6, 7, 8, 9]
    return [deep[order[i % 10]] for i in range(n)]


def check_colors(colors: Sequence[str]) -> list[str]:
    """Validate matplotlib colour specifications (names like ``tab:red``, hex ``#1f77b4``, grey levels ``0.5``).

    Raises:
        ToolkitError: a string matplotlib does not read as a colour.
    """
    from matplotlib.colors import is_color_like

    for c in colors:
        if not is_color_like(c):
            raise ToolkitError(f"{c!r} is not a matplotlib colour (use a name like 'tab:red', hex '#1f77b4' or "
                               "a grey level '0.5')")
    return list(colors)


def frame_title(frame: Frame, site: str, position: int, method: str, model: str | None = None) -> str:
    """The title of one layer's picture: layer, site, position, method (and the model)."""
    head = f"layer {frame.layer} | {site} | position {position} | {method.upper() if method == 'pca' else 'PaCMAP'}"
    return head if not model else f"{model}\n{head}"


def draw_frames(frames: Sequence[Frame], groups, labels: Sequence[str], colors: Sequence[str],
                paths: Sequence[Path], *, site: str, position: int, method: str, model: str | None = None,
                size: tuple[float, float] = (6.4, 5.2), dpi: int = 100,
                progress: Callable | None = None) -> list[Path]:
    """Draw one scatter plot per frame (one colour per set, a legend with labels and counts above the axes for up
    to 4 sets, a title with layer, site, position and method, the silhouettes in a corner) and save it as PNG.

    All pictures come from one reused figure of fixed ``size`` (inches), ``dpi`` and margins (no tight bounding
    box, no per-frame layout pass), so they have identical pixel sizes and can be joined into a GIF. PCA axes
    are the principal components (equal aspect, in the activations' units, with their shares of the variance);
    PaCMAP axes carry no units and have no ticks. Each picture has its own axis limits.

    Args:
        frames: from :func:`toolkit.projection.project_layers`.
        groups: ``[n_points]`` set index per point, indexing ``labels`` and ``colors``.
        labels, colors: one per set.
        paths: one output PNG per frame.
        progress: called once per written picture.

    Returns:
        The written paths.

    Raises:
        ToolkitError: lengths that do not match, or a bad colour.
    """
    g = np.asarray(groups)
    k = int(g.max()) + 1 if len(g) else 0
    if len(labels) != k or len(colors) != k:
        raise ToolkitError(f"{k} sets need {k} labels and colours, got {len(labels)} and {len(colors)}")
    if len(paths) != len(frames):
        raise ToolkitError(f"{len(frames)} frames need {len(frames)} paths, got {len(paths)}")
    check_colors(colors)
    plt = _plt()
    fig, ax = plt.subplots(figsize=size)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.86)  # fixed: no per-frame layout pass
    counts = [int((g == i).sum()) for i in range(k)]
    written = []
    try:
        for frame, path in zip(frames, paths):
            ax.clear()
            if len(frame.points) != len(g):
                raise ToolkitError(f"layer {frame.layer}: {len(frame.points)} points for {len(g)} groups")
            for i in range(k):
                p = frame.points[g == i]
                ax.scatter(p[:, 0], p[:, 1], s=14, color=colors[i], alpha=0.6, linewidths=0,
                           label=f"{labels[i]} (n={counts[i]})")
            ax.set_title(frame_title(frame, site, position, method, model), fontsize=10, pad=20 if k <= 4 else 6)
            if method == "pca":
                ev = frame.info.get("explained_variance_ratio")
                ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f} % of variance)" if ev else "PC1")
                ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f} % of variance)" if ev else "PC2")
                ax.set_aspect("equal", adjustable="datalim")
            else:
                ax.set_aspect("auto")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel("PaCMAP 1")
                ax.set_ylabel("PaCMAP 2")
            if frame.degenerate:
                note = "all activations identical at this layer"
            else:
                note = f"silhouette: 2-D {frame.silhouette_2d:.2f}, full {frame.silhouette_full:.2f}"
            ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, ha="left", va="bottom", color="0.3")
            if k <= 4:  # one row between the title and the axes, clear of the points
                ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=k, fontsize=8, markerscale=1.5,
                          frameon=False, borderaxespad=0.1, handletextpad=0.2, columnspacing=1.2)
            else:
                ax.legend(loc="upper right", fontsize=8, markerscale=1.5, frameon=True)
            fig.savefig(path, dpi=dpi)
            written.append(Path(path))
            if progress is not None:
                progress(1)
    finally:
        plt.close(fig)
    return written


def write_gif(pngs: Sequence[Path], path: Path, fps: float = 2.0) -> Path:
    """Join same-sized images into an animated GIF (Pillow), one frame per image, ``fps`` frames per second,
    looping forever. Colours are reduced to an adaptive 256-colour palette per frame (fast octree). Pillow
    merges a frame identical to the one before it into a longer frame.

    Raises:
        ToolkitError: no images, ``fps <= 0``, or images of different sizes.
    """
    from PIL import Image

    if not pngs:
        raise ToolkitError("no images to join into a GIF")
    if not fps > 0:
        raise ToolkitError(f"frames per second must be > 0, got {fps}")
    frames = []
    for p in pngs:
        with Image.open(p) as im:
            frames.append(im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE))
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ToolkitError(f"GIF frames differ in size: {sorted(sizes)}")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=max(20, round(1000 / fps)), loop=0,
                   disposal=1, optimize=False)
    return Path(path)


def pareto_plot(trials: pd.DataFrame, front: pd.DataFrame, path: Path, *, x: str = "kl", y: str = "refusal",
                baseline: dict | None = None, others: dict | None = None, chosen: dict | None = None,
                title: str = "") -> Path:
    """The refusal-vs-damage plane of a search: every finished trial (grey), the Pareto front (red steps), the
    unedited model (black cross), the chosen trial (ringed) and other tools' trials (``others``: ``{label: DataFrame
    with columns x and y}``, e.g. Heretic's), KL on a symlog axis (0 is the unedited model).

    Args:
        trials, front: DataFrames with columns ``x`` and ``y`` (the front sorted by ``x``).
        path: PNG written.
        baseline, chosen: ``{x: ..., y: ...}`` points, or None.

    Raises:
        ToolkitError: a column missing.
    """
    for df in [trials, front, *(others or {}).values()]:
        if x not in df.columns or y not in df.columns:
            raise ToolkitError(f"the Pareto plot needs columns {x!r} and {y!r}")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    ax.scatter(trials[x], trials[y], s=14, color="0.6", alpha=0.7, label=f"trials ({len(trials)})")
    f = front.sort_values(x)
    ax.step(f[x], f[y], where="post", color="tab:red", lw=1.2)
    ax.scatter(f[x], f[y], s=26, color="tab:red", zorder=3, label=f"Pareto front ({len(f)})")
    marks = ["s", "^", "D", "v"]
    for i, (label, df) in enumerate((others or {}).items()):
        ax.scatter(df[x], df[y], s=24, marker=marks[i % len(marks)], facecolors="none", edgecolors=f"C{i + 2}",
                   label=label)
    if baseline is not None:
        ax.scatter([baseline[x]], [baseline[y]], marker="x", s=60, color="k", zorder=4, label="unedited model")
    if chosen is not None:
        ax.scatter([chosen[x]], [chosen[y]], s=140, facecolors="none", edgecolors="tab:blue", lw=1.6, zorder=4,
                   label="chosen trial")
    xmax = max([float(trials[x].max())] + [float(df[x].max()) for df in (others or {}).values() if len(df)])
    log = xmax > 0.5  # a wide KL range on a symlog axis; otherwise linear
    if log:
        ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel((f"{x} (nats" + (", symlog)" if log else ")")) if x.startswith("kl") else x)
    ax.set_ylabel(f"{y} rate" if y in ("refusal", "over_refusal") else y)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, frameon=False, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
