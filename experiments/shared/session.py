"""A command's model session: the loaded model, its chat format, a runner and the refusal-opener token ids."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from .output import console

@dataclass
class Session:
    """A loaded model, its chat format, a runner and the refusal-opener ids."""

    lm: object
    fmt: object
    runner: object
    refusal_ids: list[int]


def open_session(model: str | None, dtype: str, device: str, batch_size: int, system: str | None,
                 quiet: bool, seed: int = 0, device_map: str | None = None) -> Session:
    """Load the model and build the runner (the slow part of every command)."""
    import torch

    from toolkit.models import load_model
    from toolkit.runner import Runner
    from toolkit.scoring import refusal_token_ids
    from toolkit.templates import ChatFormat

    torch.manual_seed(seed)
    _quiet_libraries()
    with console.status(f"loading model {model or 'default'}"):
        lm = load_model(model, dtype=dtype, device=device, device_map=device_map)
    fmt = ChatFormat(lm.tokenizer, system=system)
    runner = Runner(lm, fmt, batch_size=batch_size, progress=not quiet and sys.stderr.isatty())
    ids = refusal_token_ids(lm.tokenizer)
    d = lm.describe()
    console.print(f"model {d['id']} ({d['architecture']}, {d['n_layers']} layers, d_model {d['d_model']}, "
                  f"{d['dtype']}, {d['device']}); refusal tokens {ids}", highlight=False)
    return Session(lm, fmt, runner, ids)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
