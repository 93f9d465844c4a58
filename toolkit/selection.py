"""Candidate refusal directions and their selection (Arditi et al. 2024, made affordable on a CPU).

Candidates: difference-in-means at ``resid_pre`` for every layer x post-instruction position, from training
prompts filtered as in Arditi et al.: harmful prompts the model refuses, harmless prompts it does not.

Arditi et al. score every candidate on the validation set with three forward passes (``bypass``: mean
refusal score on harmful prompts with the direction ablated everywhere; ``induce``: mean refusal score on
harmless prompts with the raw direction added at its layer; ``kl``: KL(base || ablated) on harmless prompts),
discard ``layer >= 0.8 * n_layers``, ``kl > 0.1``, ``induce < 0`` or NaN, and keep the lowest ``bypass``.
On two CPU cores that is hours for a 24-layer model, so the search here is staged; every candidate's row in
``selection.csv`` says how far it got and why it stopped:

1. ``layer_filter``: candidates at ``layer >= max_layer_frac * n_layers`` are skipped (Arditi's filter,
   applied before any evaluation since it would discard them anyway).
2. ``screen``: every remaining candidate's ``bypass`` on a small screening subset of harmful validation prompts
   the model refuses (one pass each), which orders the candidates for the next stage.
3. ``full``: walking down the screening order, ``kl`` on the harmless validation prompts first (a candidate
   over ``kl_max`` is discarded by Arditi's filter anyway, so its other two passes are skipped), then ``bypass``
   on all harmful and ``induce`` on the harmless validation prompts, until ``keep`` candidates have passed
   the KL filter or ``max_full`` have been tried; then Arditi's induce filter.
4. ``judge`` (``select_by="judge"``): the logit score ranks candidates poorly on some models (a low ``I``/``As``
   probability does not mean the model complies), so the ``judge_top`` survivors with the lowest ``bypass`` are
   ranked by the marker judge's non-compliance rate (verdict refusal or other: the model did not do what was
   asked, so a direction whose ablation yields degenerate text does not pass for a bypass) on short greedy
   completions of the harmful validation prompts (generated in the bypass pass itself), ties broken by
   ``bypass``. The training filter and the screening set use the same non-compliance. With ``select_by="score"`` the lowest
   ``bypass`` wins, as in the paper.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .errors import ToolkitError
from .estimators import CAA_ANSWERS, Estimate, check_method, estimate
from .evaluation import Evaluation, evaluate, judged
from .interventions import activation_addition, directional_ablation
from .runner import Encoded, Runner


@dataclass
class SelectionConfig:
    """Knobs of the staged search (defaults chosen for the default model on two CPU cores).

    Attributes:
        max_layer_frac: Arditi's layer filter, ``layer < int(max_layer_frac * n_layers)``.
        kl_max: the KL filter (nats). Arditi et al. use 0.1; on the default model every candidate that removes
            refusal has a mean validation KL between 0.12 and 0.25 (median per prompt about 0.05), so 0.1 keeps
            none of them and the default here is 0.15 (``--kl-max 0.1`` reproduces the paper).
        screen_n: harmful validation prompts (refused at baseline) in the screening stage.
        keep: candidates that must pass the KL filter before the full evaluation stops.
        max_full: most candidates given the full evaluation (KL first).
        judge_top: survivors ranked by the marker judge (``select_by="judge"``).
        judge_tokens: greedy tokens per completion for the judge.
        select_by: ``"judge"`` or ``"score"``.
        induce_min: discard candidates whose ``induce`` is below this. ``None`` (auto): Arditi's 0, relaxed to
            "above the harmless baseline score" when no candidate reaches 0 (reported as ``induce_rule``).
    """

    max_layer_frac: float = 0.8
    kl_max: float = 0.15
    screen_n: int = 6
    keep: int = 3
    max_full: int = 12
    judge_top: int = 3
    judge_tokens: int = 12
    select_by: str = "judge"
    induce_min: float | None = None

    def check(self) -> None:
        """Raises ToolkitError for out-of-range settings."""
        if self.select_by not in ("judge", "score"):
            raise ToolkitError(f"select-by must be 'judge' or 'score', got {self.select_by!r}")
        if not (math.isfinite(self.kl_max) and self.kl_max > 0):
            raise ToolkitError(f"kl_max must be a finite number of nats > 0, got {self.kl_max}")
        if not 0 < self.max_layer_frac <= 1:
            raise ToolkitError("max layer fraction must be in (0, 1]")
        if min(self.screen_n, self.keep, self.max_full, self.judge_top, self.judge_tokens) < 1:
            raise ToolkitError("screen-n, keep, max-full, judge-top and judge-tokens must be >= 1")


@dataclass
class Selection:
    """Result of :func:`select_direction`.

    Attributes:
        table: one row per candidate (layer, pos, norm, stage reached, status, measures).
        chosen: ``(layer, pos)`` of the chosen candidate, or None if none passed the filters.
        baseline: baseline measures on the validation sets.
        timings: seconds per stage.
    """

    table: pd.DataFrame
    chosen: tuple[int, int] | None
    baseline: dict
    timings: dict = field(default_factory=dict)
    induce_rule: str = ""


def select_direction(runner: Runner, dirs: torch.Tensor, layers: list[int], positions: list[int],
                     harmful_val: Encoded, harmless_val: Encoded, refusal_ids: list[int],
                     cfg: SelectionConfig, log=print) -> Selection:
    """Staged search for the refusal direction among ``dirs`` (see module docstring).

    Args:
        runner: the model runner.
        dirs: raw difference-in-means candidates ``[n_layers, n_pos, d_model]``.
        layers: the layer index of each row of ``dirs``.
        positions: the (negative) position of each column of ``dirs``.
        harmful_val, harmless_val: encoded validation prompts.
        refusal_ids: refusal-opener token ids for the logit score.
        cfg: search settings.

    Returns:
        :class:`Selection`.

    Raises:
        ToolkitError: bad settings, or the model refuses none of the harmful validation prompts.
    """
    cfg.check()
    n_layers_model = runner.lm.n_layers
    t = {}
    t0 = time.time()
    base_h = evaluate(runner, harmful_val, judged(refusal_ids), gen_tokens=cfg.judge_tokens,
                      desc="baseline harmful val")
    base_b = evaluate(runner, harmless_val, judged(refusal_ids), desc="baseline harmless val")
    t["baseline"] = time.time() - t0
    refused = np.flatnonzero(base_h.noncompliance)
    if len(refused) == 0:
        raise ToolkitError("the model refuses none of the harmful validation prompts; nothing to select on")
    screen_idx = refused[: cfg.screen_n]
    screen_enc = Encoded([harmful_val.ids[i] for i in screen_idx], harmful_val.prefix_len)

    rows = []
    for li, layer in enumerate(layers):
        for pi, pos in enumerate(positions):
            rows.append({"layer": layer, "pos": pos, "norm": float(dirs[li, pi].norm()), "stage": "none",
                         "status": "", "bypass_screen": np.nan, "bypass": np.nan, "induce": np.nan,
                         "kl": np.nan, "harmless_score": np.nan, "judge_refusal": np.nan, "_li": li, "_pi": pi})
    df = pd.DataFrame(rows)
    limit = int(cfg.max_layer_frac * n_layers_model)
    df.loc[df.layer >= limit, ["stage", "status"]] = ["layer_filter", f"skipped: layer >= {limit}"]
    # The same template tokens at every post-instruction position have identical embeddings, so at layer 0
    # both means are equal and the difference is (numerically) zero: nothing to ablate.
    tiny = (df.stage == "none") & (df.norm < 1e-6 * max(float(df.norm.max()), 1e-30))
    df.loc[tiny, ["stage", "status"]] = ["zero", "skipped: zero direction"]

    def ablated(enc: Encoded, i: int, gen: int = 0, desc: str = "") -> Evaluation:
        d = dirs[int(df.at[i, "_li"]), int(df.at[i, "_pi"])].float()
        return evaluate(runner, enc, judged(refusal_ids), gen_tokens=gen, desc=desc,
                        intervention=directional_ablation(runner.model, d))

    # Stage 2: screening
    t0 = time.time()
    todo = df.index[df.stage == "none"].tolist()
    log(f"screening {len(todo)} candidates on {len(screen_idx)} refused harmful val prompts")
    for k, i in enumerate(todo):
        ev = ablated(screen_enc, i, desc=f"screen {k + 1}/{len(todo)}")
        df.loc[i, ["stage", "bypass_screen"]] = ["screen", float(ev.scores.mean())]
    t["screen"] = time.time() - t0
    log(f"screening took {t['screen']:.0f} s")
    order = df.loc[todo].sort_values("bypass_screen").index.tolist()

    # Stage 3: Arditi's three measures, walking down the screening order. KL first: a candidate over the KL
    # limit is discarded by Arditi's filter whatever its bypass and induce, so those passes are skipped for it.
    # The walk stops once `keep` candidates have passed the KL filter or `max_full` have been tried.
    t0 = time.time()
    log(f"full evaluation: walking the screening order until {cfg.keep} candidates pass KL <= {cfg.kl_max} "
        f"(at most {cfg.max_full} tried)")
    n_ok = n_tried = 0
    for i in order:
        if n_ok >= cfg.keep or n_tried >= cfg.max_full:
            df.at[i, "status"] = (f"pruned: {cfg.keep} better-screened candidates passed KL" if n_ok >= cfg.keep
                                  else f"pruned: full-evaluation budget of {cfg.max_full} spent")
            continue
        n_tried += 1
        li, pi = int(df.at[i, "_li"]), int(df.at[i, "_pi"])
        ev_b = ablated(harmless_val, i, desc=f"kl {n_tried}")
        kl = float(ev_b.kl_from(base_b).mean())
        df.loc[i, ["stage", "kl", "harmless_score"]] = ["full", kl, float(ev_b.scores.mean())]
        if not np.isfinite(kl) or kl > cfg.kl_max:
            df.at[i, "status"] = f"filtered: kl > {cfg.kl_max} (bypass, induce not evaluated)"
            continue
        n_ok += 1
        # With the judge, the bypass pass is a generation: its first step gives the bypass scores, and the
        # completions give the judged refusal rate, so no separate judge pass is needed later.
        ev_h = ablated(harmful_val, i, cfg.judge_tokens if cfg.select_by == "judge" else 0, desc=f"bypass {n_tried}")
        if ev_h.noncompliance is not None:
            df.at[i, "judge_refusal"] = float(ev_h.noncompliance.mean())
        ev_i = evaluate(runner, harmless_val, judged(refusal_ids), desc=f"induce {n_tried}",
                        intervention=activation_addition(runner.model, dirs[li, pi].float(),
                                                         [int(df.at[i, "layer"])], alpha=1.0))
        df.loc[i, ["bypass", "induce"]] = [float(ev_h.scores.mean()), float(ev_i.scores.mean())]
        df.at[i, "status"] = "filtered: NaN" if not np.isfinite(df.loc[i, ["bypass", "induce"]].astype(float)).all() \
            else "measured"
    t["full"] = time.time() - t0
    measured = df.status == "measured"
    base_harmless = float(base_b.scores.mean())
    if cfg.induce_min is not None:
        ok, rule = df.induce >= cfg.induce_min, f"induce >= {cfg.induce_min}"
    elif (df.loc[measured, "induce"] >= 0).any():
        ok, rule = df.induce >= 0, "induce >= 0 (Arditi et al.)"
    else:
        ok = df.induce > base_harmless
        rule = (f"induce > harmless baseline score {base_harmless:.2f} (relaxed: no candidate reached Arditi's "
                "induce >= 0 on this model)")
    low = measured & ~ok
    df.loc[low, "status"] = f"filtered: not {rule.split(' (')[0]}"
    df.loc[measured & ~low, "status"] = "passed"
    passed = df[df.status == "passed"].sort_values("bypass")
    if passed.empty:
        df["status"] = df["status"].where(df.status != "", "not evaluated")
        return Selection(df.drop(columns=["_li", "_pi"]), None, {}, {k: round(v, 2) for k, v in t.items()}, rule)

    if cfg.select_by == "judge":
        top = passed.index[: cfg.judge_top].tolist()
        df.loc[top, "stage"] = "judge"
        ranked = df.loc[top].sort_values(["judge_refusal", "bypass"])
    else:
        ranked = passed
    best = ranked.index[0]
    df.at[best, "status"] = "chosen"
    chosen = (int(df.at[best, "layer"]), int(df.at[best, "pos"]))
    baseline = {
        "harmful_val_refusal": float(base_h.noncompliance.mean()),
        "harmful_val_score": float(base_h.scores.mean()),
        "harmless_val_score": float(base_b.scores.mean()),
        "screen_prompts": int(len(screen_idx)),
    }
    return Selection(df.drop(columns=["_li", "_pi"]), chosen, baseline, {k: round(v, 2) for k, v in t.items()}, rule)


@dataclass
class Candidates:
    """Difference-in-means candidates from filtered training prompts.

    Attributes:
        dirs: ``[n_layers, n_pos, d_model]`` float64, ``mean_harmful - mean_harmless`` at ``resid_pre``.
        layers, positions: axes of ``dirs``.
        harmful_kept, harmless_kept: indices of the training prompts that passed the filter.
        harmful_refused: marker-judge verdict on every harmful training prompt (None if not judged).
        harmful_scores, harmless_scores: baseline logit refusal scores of every training prompt.
        mean_harmful, mean_harmless: the two means ``[n_layers, n_pos, d_model]`` float64.
        method: the estimator of ``dirs`` (:data:`toolkit.estimators.METHODS`).
        diff_means: difference-in-means of the kept prompts ``[n_layers, n_pos, d_model]`` float64 (equal to
            ``dirs`` for ``diff-means``; for ``caa`` at ``positions`` of the prompts, not of the answers).
        estimate: the estimator's full result (probe accuracies, group sizes, info), or None.
        acts_harmful, acts_harmless: the kept prompts' activations ``[n_kept, n_layers, n_pos', d_model]`` float32
            at the prompts' post-instruction positions (for probes of any candidate), or None.
    """

    dirs: torch.Tensor
    layers: list[int]
    positions: list[int]
    harmful_kept: list[int]
    harmless_kept: list[int]
    harmful_refused: np.ndarray | None
    harmful_scores: np.ndarray
    harmless_scores: np.ndarray
    mean_harmful: torch.Tensor
    mean_harmless: torch.Tensor
    method: str = "diff-means"
    diff_means: torch.Tensor | None = None
    estimate: Estimate | None = None
    acts_harmful: torch.Tensor | None = None
    acts_harmless: torch.Tensor | None = None


def build_candidates(runner: Runner, harmful: Encoded, harmless: Encoded, refusal_ids: list[int],
                     filter_by: str = "judge", judge_tokens: int = 12, layers: Sequence[int] | None = None,
                     positions: Sequence[int] | None = None, method: str = "diff-means", seed: int = 0,
                     harmful_texts: Sequence[str] | None = None) -> Candidates:
    """Candidate directions at ``resid_pre`` of every layer x post-instruction position: difference-in-means
    (Arditi et al. 2024) or another estimator of :mod:`toolkit.estimators` (``method``).

    The training prompts are filtered first: with ``filter_by="judge"`` harmful prompts whose greedy
    completion (``judge_tokens`` tokens) the marker judge calls a refusal; with ``"score"`` harmful prompts with
    refusal score > 0 (the paper's rule); harmless prompts always need score < 0; ``"none"`` keeps all.
    Activations are read in the same pass that produces the baseline (generation's prefill), so filtering costs
    no extra forward pass. Means are accumulated in float64.

    ``layers``/``positions`` restrict the candidates (default: every layer, every post-instruction position);
    ``layers`` are resolved indices (:meth:`toolkit.index_spec.LayerSpec.resolve`), used in increasing order.

    Estimators and their groups: ``diff-means``, ``geometric-median``, ``pca``, ``probe``: kept harmful vs kept
    harmless prompts. ``refused-minus-complied``: every harmful training prompt split by the marker judge's
    non-compliance verdict on its ``judge_tokens``-token completion (the filter is not applied; both groups must be
    non-empty). ``caa``: the kept harmful prompts each followed by the refusal and by the compliance opener of
    :data:`toolkit.estimators.CAA_ANSWERS`, read at the opener's last token (two extra capture passes that stop after
    the last needed layer); its candidates have the single position ``-1`` (of prompt + opener), so ``positions``
    does not apply; it needs ``harmful_texts`` (the instructions behind ``harmful``). ``seed`` seeds the probe's
    cross-validation folds.

    Raises:
        ToolkitError: unknown filter or method, a position that is not post-instruction, a side with no prompt
            left after filtering, an empty group for ``refused-minus-complied``, ``caa`` without ``harmful_texts``.
    """
    if filter_by not in ("judge", "score", "none"):
        raise ToolkitError(f"must be judge, score or none, got {filter_by!r}", param="filter_by")
    check_method(method)
    if method == "caa" and (harmful_texts is None or len(harmful_texts) != len(harmful)):
        raise ToolkitError("the caa estimator needs the harmful training instructions", param="harmful_texts")
    n, post = runner.lm.n_layers, runner.fmt.post_positions()
    layers = list(range(n)) if layers is None else sorted(set(layers))
    if positions is None:
        positions = post
    else:
        bad = [p for p in positions if p not in post]
        if bad:
            raise ToolkitError(f"position {bad[0]} is not a post-instruction position of this template "
                               f"({post[0]}..{post[-1]})", param="positions")
        positions = sorted(set(positions))
    with runner.capture(len(harmful), layers, ["resid_pre"], positions) as acts_h:
        need_verdict = filter_by == "judge" or method == "refused-minus-complied"
        ev_h = evaluate(runner, harmful, judged(refusal_ids), gen_tokens=judge_tokens if need_verdict else 0,
                        desc="harmful train")
    with runner.capture(len(harmless), layers, ["resid_pre"], positions) as acts_b:
        ev_b = evaluate(runner, harmless, judged(refusal_ids), desc="harmless train")
    if filter_by == "judge":
        keep_h = np.flatnonzero(ev_h.noncompliance)
    elif filter_by == "score":
        keep_h = np.flatnonzero(ev_h.scores > 0)
    else:
        keep_h = np.arange(len(harmful))
    keep_b = np.flatnonzero(ev_b.scores < 0) if filter_by != "none" else np.arange(len(harmless))
    if len(keep_h) == 0 or len(keep_b) == 0:
        raise ToolkitError(f"training filter left {len(keep_h)} harmful and {len(keep_b)} harmless prompts; "
                           "use `filter_by` none or more prompts")
    ah = acts_h["resid_pre"][torch.as_tensor(keep_h)]
    ab = acts_b["resid_pre"][torch.as_tensor(keep_b)]
    mh, mb = ah.double().mean(0), ab.double().mean(0)
    if method == "refused-minus-complied":
        verdict = np.asarray(ev_h.noncompliance, bool)
        if verdict.all() or not verdict.any():
            raise ToolkitError(f"refused-minus-complied needs harmful training prompts the model refuses and ones it "
                               f"answers; it refused {int(verdict.sum())} of {len(verdict)}", param="method")
        all_h = acts_h["resid_pre"]
        est = estimate(method, all_h[torch.as_tensor(np.flatnonzero(verdict))],
                       all_h[torch.as_tensor(np.flatnonzero(~verdict))], seed=seed)
    elif method == "caa":
        texts = [harmful_texts[i] for i in keep_h]
        refuse, comply = (runner.collect(runner.encode_continued(texts, a), layers, ["resid_pre"], [-1],
                                         desc=f"caa {kind}")["resid_pre"]
                          for a, kind in zip(CAA_ANSWERS, ("refusal", "compliance")))
        est = estimate(method, refuse, comply, seed=seed)
        positions = [-1]
        mh, mb = mh[:, [-1]], mb[:, [-1]]  # the prompts' own means at their last given position, for cosines
        ah, ab = ah[:, :, [-1]], ab[:, :, [-1]]
    else:
        est = estimate(method, ah, ab, seed=seed)
    return Candidates(est.directions, layers, positions, keep_h.tolist(), keep_b.tolist(),
                      ev_h.noncompliance, ev_h.scores, ev_b.scores, mh, mb, method, mh - mb, est, ah, ab)
