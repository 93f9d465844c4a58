"""Left-padded batches of token lists, sorted by length (less padding), for :class:`toolkit.runner.Runner`.

The Runner runs these batches (logits, activation collection, generation) and returns results in the
caller's order through each batch's ``index``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ToolkitError


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


