"""Damage measures beyond first-token KL: multi-token KL and cross-entropy, teacher-forced.

First-token KL (:func:`toolkit.scoring.kl_divergence`) sees one next-token distribution per prompt. An edit can
leave that distribution alone and still derail the text a few tokens later, so:

* **multi-token KL** (Heretic's and OBLITERATUS's users ask for it): the base model's own greedy ``N``-token
  completions of harmless prompts are teacher-forced through the base and the edited model; at each of the ``N``
  positions that predict a completion token, ``KL(base || edited)`` of the next-token distributions (nats); the
  mean over the positions is the prompt's value. Exactly 0 for an unchanged model.
* **cross-entropy** (Arditi et al. 2024 report CE loss): the mean negative log-likelihood, nats/token, of the
  same reference completions under the edited model, and under the base model for comparison.

Both come from one pair of teacher-forced passes (:meth:`toolkit.runner.Runner.forced`) per chunk of prompts:
the base pass without the intervention, then the edited pass inside it, so only one chunk's distributions
(``chunk x N x vocab`` float32) are ever held. The intervention is given as a factory (a callable returning a
fresh, not yet entered context manager such as ``lambda: directional_ablation(model, d)``) because it is opened
once per chunk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ToolkitError
from .runner import Encoded, Runner


@dataclass
class ForcedDamage:
    """Per-prompt teacher-forced damage over reference completions.

    Attributes:
        kl: ``[n]`` float64, mean per-token ``KL(base || edited)``, nats (NaN for an empty reference completion).
        ce: ``[n]`` float64, mean per-token cross-entropy of the reference completion under the edited model, nats.
        ce_base: ``[n]`` float64, the same under the base model.
        n_tokens: ``[n]`` int, reference tokens per prompt.
    """

    kl: np.ndarray
    ce: np.ndarray
    ce_base: np.ndarray
    n_tokens: np.ndarray

    def summary(self) -> dict:
        """Means over prompts with a non-empty reference (NaN-safe): ``{"kl_multi", "ce", "ce_base", "tokens"}``."""
        ok = self.n_tokens > 0
        f = (lambda a: float(np.mean(a[ok])) if ok.any() else float("nan"))
        return {"kl_multi": f(self.kl), "ce": f(self.ce), "ce_base": f(self.ce_base),
                "tokens": int(self.n_tokens.sum())}


def reference_completions(tokens: Sequence[Sequence[int]] | None, n_tokens: int) -> list[list[int]]:
    """The first ``n_tokens`` of each greedy completion (already cut at end-of-sequence by the runner).

    Raises:
        ToolkitError: ``tokens`` is None (no completions were generated) or ``n_tokens < 1``.
    """
    if n_tokens < 1:
        raise ToolkitError(f"the multi-token KL length must be >= 1, got {n_tokens}", param="kl_tokens")
    if tokens is None:
        raise ToolkitError("multi-token KL needs the base model's completions (gen_tokens > 0)")
    return [list(t[:n_tokens]) for t in tokens]


def forced_damage(runner: Runner, enc: Encoded, references: Sequence[Sequence[int]],
                  intervention: Callable[[], contextlib.AbstractContextManager] | None, *, chunk: int = 16,
                  desc: str = "multi-token KL") -> ForcedDamage:
    """Multi-token KL and cross-entropy of ``references`` (see the module docstring).

    Args:
        runner: the runner of the studied model, without interventions active around the call (the base pass
            must see the base model).
        enc: the encoded prompts ``[n]``.
        references: reference token ids per prompt (normally :func:`reference_completions` of the base model's
            greedy completions).
        intervention: factory of the edit's context manager, opened for the edited pass of each chunk; None for
            no edit (then KL is 0 and ``ce == ce_base``).
        chunk: prompts per base/edited pair of passes (memory: ``chunk x len x vocab`` float32 twice).

    Returns:
        :class:`ForcedDamage`.

    Raises:
        ToolkitError: lengths differ, ``chunk < 1``, or interventions are already active on the model.
    """
    from .hooks import active_hooks

    if len(references) != len(enc):
        raise ToolkitError(f"{len(references)} reference completions for {len(enc)} prompts")
    if chunk < 1:
        raise ToolkitError(f"chunk must be >= 1, got {chunk}")
    if active_hooks(runner.model).writes:
        raise ToolkitError("multi-token KL needs the base model: remove active interventions around the call")
    n = len(enc)
    kl, ce, ce_base = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    lens = np.array([len(r) for r in references], dtype=int)
    for start in range(0, n, chunk):
        idx = list(range(start, min(n, start + chunk)))
        sub = Encoded([enc.ids[i] for i in idx], enc.prefix_len)
        refs = [references[i] for i in idx]
        base: dict[int, torch.Tensor] = {}

        def keep_base(rows, logp, targets, ls):
            for r, i in enumerate(rows):
                base[i] = logp[r, : ls[r]].clone()
                ce_base[idx[i]] = float(-logp[r, : ls[r]].gather(-1, targets[r, : ls[r], None]).double().mean())

        def compare(rows, logp, targets, ls):
            for r, i in enumerate(rows):
                lq = logp[r, : ls[r]].double()
                lp = base.pop(i).double()
                kl[idx[i]] = float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean())
                ce[idx[i]] = float(-lq.gather(-1, targets[r, : ls[r], None]).mean())

        runner.forced(sub, refs, keep_base, desc=f"{desc} (base)")
        with intervention() if intervention is not None else contextlib.nullcontext():
            runner.forced(sub, refs, compare, desc=desc)
    return ForcedDamage(kl, ce, ce_base, lens)
