"""Batched forward passes: activation collection and last-position logits.

Prompts are sorted by token length before batching (less padding), left-padded, and results are returned in
the caller's order. Collection reads only the requested layers, sites and positions, and ends the forward pass
with :class:`~toolkit.hooks.StopForward` right after the last needed activation, so later blocks and the LM
head are never computed. Logit passes ask transformers for the last position only (``logits_to_keep=1``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .errors import ToolkitError
from .hooks import SITES, StopForward, check_layer, hooked


@dataclass
class Batch:
    """One left-padded batch.

    Attributes:
        index: positions of these prompts in the caller's list, ``[batch]``.
        input_ids: ``[batch, pos]`` long.
        attention_mask: ``[batch, pos]`` long, 0 on left padding.
    """

    index: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Number of real (non-pad) prompt tokens in the batch."""
        return int(self.attention_mask.sum())


def make_batches(ids: Sequence[Sequence[int]], batch_size: int, pad_id: int, device=None) -> list[Batch]:
    """Sort token lists by length, split into batches of at most ``batch_size``, left-pad each.

    Raises:
        ToolkitError: batch_size < 1 or an empty prompt.
    """
    if batch_size < 1:
        raise ToolkitError(f"batch size must be >= 1, got {batch_size}")
    if any(len(x) == 0 for x in ids):
        raise ToolkitError("a prompt encoded to zero tokens")
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        width = max(len(ids[i]) for i in idx)
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(ids[i])
            inp[r, width - n :] = torch.tensor(ids[i], dtype=torch.long)
            mask[r, width - n :] = 1
        batches.append(Batch(idx, inp.to(device) if device else inp, mask.to(device) if device else mask))
    return batches


