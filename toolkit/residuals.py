"""Residual-stream activations of a list of prompts at one hook site and prompt position, for every selected layer
(the input of the cones, geometry and projection figures)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .index_spec import check_position


def residuals(runner, prompts: list[str], layers: Sequence[int], site: str, position: int, desc: str
              ) -> torch.Tensor:
    """Activations ``[n_prompts, n_layers, d_model]`` float32 at one site and prompt position, read in one pass
    that stops after the last needed layer (:meth:`toolkit.runner.Runner.collect`).

    Args:
        runner: a :class:`toolkit.runner.Runner`.
        prompts: user prompts (formatted by the runner's chat template).
        layers: resolved layer indices (:meth:`toolkit.index_spec.LayerSpec.resolve`).
        site: a hook site (:data:`toolkit.hooks.SITES`).
        position: a negative index from the end of the prompt.
        desc: progress-bar label.

    Raises:
        ToolkitError: a non-negative ``position`` (param ``position``); from the runner: an unknown site or a
            position deeper than a prompt.
    """
    check_position(position)
    enc = runner.encode(prompts)
    return runner.collect(enc, list(layers), [site], [position], desc=desc)[site][:, :, 0]
