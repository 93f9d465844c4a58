"""Conditional activation steering (CAST; Lee et al. 2024, "Programming Refusal with Conditional Activation
Steering", IBM, arXiv:2409.05907).

CAST steers ``h <- h + f(sim(h, proj_c h)) * alpha * v``: the behaviour vector ``v`` is added only to prompts whose
hidden state at a condition layer is similar enough to a condition vector ``c``, ``f`` being a step at a
threshold. Here the three parts are:

* :func:`condition_similarity`: per prompt, the cosine between ``c`` and the prompt's hidden state at the
  condition's layer and site, averaged over the post-instruction positions (one capture pass that stops after the
  condition layer);
* :func:`calibrate_threshold`: the threshold that best separates two sets of similarities (balanced accuracy,
  e.g. harmful vs harmless training prompts);
* :func:`conditional_addition`: activation addition (:func:`toolkit.interventions.activation_addition`) applied
  only to the batch rows of prompts whose gate is open.

The decision is made once per prompt, from the prompt (as in CAST, where the condition is checked on the prompt and
the behaviour vector then acts on the generation), so a gate is a fixed boolean per prompt; the hook finds which
prompts are in the batch now running from the Runner's pass state (:attr:`toolkit.hooks.PassState.rows`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .directions import Direction
from .errors import ToolkitError
from .hooks import SITES, Reach, check_layer, hooked
from .interventions import _check_direction, addition_args
from .runner import Encoded, Runner


def condition_similarity(runner: Runner, encoded: Encoded, condition: Direction | torch.Tensor, *,
                         layer: int | None = None, site: str | None = None, positions: Sequence[int] | None = None,
                         desc: str = "condition") -> np.ndarray:
    """Per-prompt cosine similarity between the condition vector and the prompt's hidden state.

    ``sim_i = cos(mean_{p in positions} h_i[p], c)`` with ``h_i`` the activation ``[pos, d_model]`` of prompt ``i``
    at ``blocks.{layer}.hook_{site}`` of the unmodified model (plus whatever interventions are active around the
    call). Computed in float64 from float32 captures, in one capture pass (:meth:`toolkit.runner.Runner.collect`)
    that stops the forward pass right after the condition layer (no later blocks, no LM head).

    Choice of positions: CAST (Lee et al. 2024) pools the prompt's hidden states over its tokens and compares the
    pooled state with its projection on ``c``, ``cos(h, tanh(proj_c h))``; here the pool is the post-instruction
    positions (the template tokens after the instruction, :meth:`toolkit.templates.ChatFormat.post_positions`, where
    the toolkit reads refusal directions, and never the shared template prefix, which is the same for every prompt),
    and the score is the signed cosine with ``c``, so that the side of ``c`` a prompt lies on is kept (the
    projection-based score of CAST is ``|cos(h, c)|`` without its ``tanh``).

    Args:
        runner: the :class:`toolkit.runner.Runner`.
        encoded: prompts from ``runner.encode``.
        condition: the condition vector ``[d_model]`` (any norm), or a :class:`toolkit.directions.Direction`
            whose recorded layer and site are the defaults of ``layer`` and ``site``.
        layer: the condition layer [default: the direction's].
        site: hook site (:data:`toolkit.hooks.SITES`) [default: the direction's, else ``resid_pre``].
        positions: negative prompt positions pooled [default: the runner's post-instruction positions].
        desc: progress-bar label.

    Returns:
        ``[n_prompts]`` float64 cosines in ``[-1, 1]``, caller's order.

    Raises:
        ToolkitError: condition of another width, zero or not finite (``condition``); no layer given for a direction
            that records none, or a layer out of range (``layer``); unknown site; a position beyond a prompt.
    """
    own = condition if isinstance(condition, Direction) else None
    try:
        c = _check_direction(runner.model, condition).double()
    except ToolkitError as e:
        raise ToolkitError(e.message, param="condition") from None
    if layer is None:
        if own is None or own.layer is None:
            raise ToolkitError("the condition records no layer; give one", param="layer")
        layer = own.layer
    layer = check_layer(runner.model, layer)
    site = site or (own.site if own is not None and own.site else "resid_pre")
    if site not in SITES:
        raise ToolkitError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}", param="site")
    positions = list(runner.fmt.post_positions() if positions is None else positions)
    acts = runner.collect(encoded, [layer], [site], positions, desc=desc)[site]  # [n, 1, n_pos, d] float32
    h = acts[:, 0].double().mean(1)  # [n, d]
    return torch.nn.functional.cosine_similarity(h, c.unsqueeze(0), dim=-1, eps=1e-300).numpy()


@dataclass(frozen=True)
class Calibration:
    """A threshold chosen by :func:`calibrate_threshold`.

    Attributes:
        threshold: the gate is open for ``similarity >= threshold`` (float; ``-inf`` when every value should pass).
        balanced_accuracy: ``(TPR + TNR) / 2`` of that gate on the calibration values.
        true_positive_rate: share of the positive values at or above the threshold.
        false_positive_rate: share of the negative values at or above the threshold.
    """

    threshold: float
    balanced_accuracy: float
    true_positive_rate: float
    false_positive_rate: float


def calibrate_threshold(sims_pos: Sequence[float] | np.ndarray, sims_neg: Sequence[float] | np.ndarray
                        ) -> Calibration:
    """The threshold on a similarity that best separates positive from negative prompts (for the gate
    ``sim >= threshold``), by balanced accuracy ``(TPR + TNR) / 2`` (so unequal set sizes do not matter).

    Balanced accuracy is constant between consecutive distinct values; the candidates are those values
    (scikit-learn's ``roc_curve`` lists every one with its TPR and FPR). Among the best, the highest threshold is
    taken (the fewest prompts steered), and the returned threshold is the midpoint between that value and the next
    lower distinct value (``-inf`` when it is the lowest of all values), so a new value at the boundary falls in the
    middle of the margin. Used for CAST's threshold search (Lee et al. 2024 pick the condition threshold that best
    separates the two contrast sets on training data).

    Args:
        sims_pos: ``[n_pos]`` similarities of prompts that should be steered (e.g. harmful).
        sims_neg: ``[n_neg]`` similarities of prompts that should not (e.g. harmless).

    Returns:
        :class:`Calibration`.

    Raises:
        ToolkitError: an empty or non-finite side (``sims_pos`` / ``sims_neg``).
    """
    from sklearn.metrics import roc_curve

    pos = np.asarray(sims_pos, dtype=np.float64).reshape(-1)
    neg = np.asarray(sims_neg, dtype=np.float64).reshape(-1)
    for name, v in (("sims_pos", pos), ("sims_neg", neg)):
        if v.size == 0:
            raise ToolkitError("no values to calibrate on", param=name)
        if not np.isfinite(v).all():
            raise ToolkitError("values must be finite", param=name)
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    fpr, tpr, thr = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    bal = (tpr + 1.0 - fpr) / 2.0
    k = int(np.argmax(bal))  # thresholds decrease along the curve: the first maximum is the highest threshold
    if not np.isfinite(thr[k]):  # nothing passes (roc_curve's leading +inf)
        t = float("inf")
    else:
        values = np.unique(np.r_[pos, neg])
        lower = values[values < thr[k]]
        t = float((thr[k] + lower[-1]) / 2.0) if lower.size else float("-inf")
    return Calibration(t, float(bal[k]), float(tpr[k]), float(fpr[k]))


def parse_threshold(spec: str) -> float | None:
    """A CAST threshold as given on the command line: ``"auto"`` (None: calibrate it) or a number (``inf`` and
    ``-inf`` allowed: no prompt passes, every prompt passes).

    Raises:
        ToolkitError: anything else, or NaN (``threshold``).
    """
    text = str(spec).strip()
    if text.lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ToolkitError(f"expected a number or auto, got {spec!r}", param="threshold") from None
    if np.isnan(value):
        raise ToolkitError("the threshold is not a number", param="threshold")
    return value


def gate_from(similarity: Sequence[float] | np.ndarray, threshold: float) -> np.ndarray:
    """The CAST gate ``similarity >= threshold`` per prompt, ``[n]`` bool (``-inf`` opens every gate, ``+inf``
    closes every one).

    Raises:
        ToolkitError: a NaN threshold.
    """
    if np.isnan(threshold):
        raise ToolkitError("the threshold is not a number", param="threshold")
    return np.asarray(similarity, dtype=np.float64) >= threshold


@contextlib.contextmanager
def conditional_addition(model: nn.Module, vector: torch.Tensor | Direction, layers: Sequence[int] | None = None, *,
                         alpha: float = 1.0, gate: Sequence[bool] | np.ndarray | torch.Tensor,
                         positions: Sequence[int] | None = None, site: str | None = None) -> Iterator[None]:
    """Conditional activation addition (CAST, Lee et al. 2024): ``x <- x + alpha * vector`` at ``site`` of each
    layer in ``layers``, for the prompts whose ``gate`` is True only; other prompts run unchanged.

    Same vector, sites, layers and positions as :func:`toolkit.interventions.activation_addition` (which this equals
    exactly when every gate is open, and which it leaves out exactly when every gate is closed). Row ``r`` of an
    activation belongs to prompt ``rows[r]`` of the Runner's pass state (:attr:`toolkit.hooks.PassState.rows`:
    batches are sorted by length), so the gate follows each prompt through sorted batches, context-cached passes
    (:meth:`toolkit.runner.Runner.logits` with a context) and generation (:meth:`toolkit.runner.Runner.generate`,
    whose batches keep their rows to the end).

    A pass whose rows are not known (a plain forward call outside a Runner, or the shared template prefix, which
    the Runner computes once for every prompt) can be served only when the gate is uniform
    (all open or all closed). With ``positions`` given that never matters (those passes are not steered); at every
    position (``positions=None``) with a mixed gate, run the prompts without a shared prefix
    (``Encoded(enc.ids, 0)``).

    Args:
        model: the ``transformers`` causal LM the Runner runs.
        vector: ``[d_model]`` as given (not normalised), or a :class:`toolkit.directions.Direction` whose layer and
            site are the defaults of ``layers`` and ``site``.
        layers: block indices [default: the direction's layer].
        alpha: coefficient.
        gate: ``[n_prompts]`` bool in the caller's prompt order (e.g. :func:`gate_from`).
        positions: negative prompt positions (steered in the prompt pass only), or None for every position of every
            pass (prompt and generated tokens).
        site: hook site [default: the direction's site, else ``resid_pre``].

    Raises:
        ToolkitError: as :func:`toolkit.interventions.activation_addition`; a gate that is not a non-empty 1-D
            boolean sequence (``gate``); and, while running, a batch with a prompt index beyond the gate, or a pass
            with unknown rows under a mixed gate at every position.
    """
    g = torch.as_tensor(np.asarray(gate))
    if g.ndim != 1 or g.numel() == 0 or g.dtype != torch.bool:
        raise ToolkitError(f"the gate must be a non-empty 1-D boolean sequence, got shape {tuple(g.shape)} and dtype "
                           f"{g.dtype}", param="gate")
    layers, site, v, pos_t, depth = addition_args(model, vector, layers, positions, site, "conditional addition")
    all_open, all_closed = bool(g.all()), not bool(g.any())

    def fn(x, ctx):
        if pos_t is not None and not ctx.in_prompt:
            return None
        rows = ctx.state.rows
        if rows is None or ctx.state.phase == "prefix":
            if not (all_open or all_closed):
                raise ToolkitError("a mixed gate at every position cannot steer a pass whose prompts are not known "
                                   "(a shared prefix or a plain forward call); run without a shared prefix")
            sel = None if all_open else False
        else:
            if int(rows.max()) >= g.numel():
                raise ToolkitError(f"the batch holds prompt {int(rows.max())} but the gate covers {g.numel()} "
                                   "prompts", param="gate")
            sel = g[rows]
            sel = None if bool(sel.all()) else (sel if bool(sel.any()) else False)
        if sel is False:
            return None
        delta = (alpha * v).to(device=x.device, dtype=x.dtype)
        if pos_t is None:
            if sel is None:
                return x + delta
            return torch.where(sel.to(x.device)[:, None, None], x + delta, x)
        ctx.check_span(x, depth)
        x = x.clone()
        if sel is None:
            x[:, pos_t.to(x.device)] += delta
        else:
            r = sel.nonzero().squeeze(1).to(x.device)
            x[r[:, None], pos_t.to(x.device)[None, :]] += delta
        return x

    reach = Reach(every=True) if pos_t is None else Reach(depth=depth)
    with hooked(model, [(site, l, fn) for l in layers], reach=reach):
        yield
