"""Evaluate a prompt set under whatever intervention is active: logit refusal scores, completions, judgements."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .runner import Encoded, Runner
from .scoring import is_refusal, kl_divergence, refusal_score


@dataclass
class Evaluation:
    """Per-prompt results of one pass over a prompt set.

    Attributes:
        logits: ``[n, vocab]`` float32 next-token logits at the last prompt position.
        scores: ``[n]`` logit refusal scores (Arditi et al.).
        completions: greedy completions, or None if no generation was asked for.
        refusals: marker-judge verdicts ``[n]`` bool, or None.
    """

    logits: torch.Tensor
    scores: np.ndarray
    completions: list[str] | None = None
    refusals: np.ndarray | None = None

    def kl_from(self, base: Evaluation) -> np.ndarray:
        """``KL(base || self)`` per prompt at the last prompt position, nats ``[n]``."""
        return kl_divergence(base.logits, self.logits).numpy()


def evaluate(runner: Runner, enc: Encoded, refusal_ids: list[int], gen_tokens: int = 0,
             desc: str = "evaluate") -> Evaluation:
    """Score ``enc`` with the runner (one pass); with ``gen_tokens > 0`` also generate and judge completions.

    Interventions active around the call apply (hooks). The logits of the generation's first step are the
    last-position logits, so generation costs no extra prompt pass.
    """
    if gen_tokens > 0:
        texts, logits = runner.generate(enc, gen_tokens, desc=desc)
        refusals = np.array([is_refusal(t) for t in texts], dtype=bool)
    else:
        logits, texts, refusals = runner.logits(enc, desc=desc), None, None
    scores = refusal_score(logits, refusal_ids).numpy()
    return Evaluation(logits, scores, texts, refusals)
