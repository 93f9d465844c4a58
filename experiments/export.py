"""``refusal export``: a refusal direction as a llama.cpp control vector, a repeng ControlVector file or plain
safetensors."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from toolkit.control_vectors import FORMATS, control_vectors, resolve_source, write_control_vectors
from toolkit.index_spec import LayerSpec

from .shared import Cli, CommandConfig, FiniteFloat, Invalid, command, console, out


class ExportConfig(CommandConfig):
    """The options of ``refusal export``."""

    direction: Annotated[str, Cli(argument=True, env=False, metavar="DIRECTION")] = Field(
        description="a direction .safetensors file (or per-layer file), an extract run (its chosen direction), or a "
        "cones/geometry run (its per-layer directions)")
    format: Annotated[Literal[FORMATS], Cli("--format", "-f"),
                      Invalid("unknown format {value!r}; choose one of {choices}")] = Field(
        "gguf-control-vector", description="gguf-control-vector (llama.cpp --control-vector-scaled), repeng "
        "(ControlVector.import_gguf) or safetensors (this toolkit's per-layer direction file)")
    out: Annotated[str, Cli("--out", "-o")] = Field(description="file to write (its folder must exist)")
    layers: Optional[str] = Field(None, description="layers that get the vector, in the direction's own site "
                                  "convention, e.g. '12' or '8:16' [default: the direction's layer; a per-layer set: "
                                  "all its layers]")
    scale: FiniteFloat = Field(1.0, description="coefficient baked into the vectors (non-zero)")
    unit: bool = Field(False, description="normalise each vector to unit norm before scaling")
    model_hint: Optional[str] = Field(None, description="controlvector.model_hint [default: the model_type recorded "
                                      "by the run, else the direction's model id]")
    n_layers: Optional[int] = Field(None, ge=1, description="the model's number of layers [default: from the run; "
                                    "a direction file records none]; written as llama.cpp's layer_count")
    per_layer: bool = Field(False, description="for an extract run: export its per-layer candidates at the chosen "
                            "position instead of the chosen direction")
    force: bool = Field(False, description="overwrite an existing --out file")


@command(ExportConfig)
def export(cfg: ExportConfig):
    """Export a refusal direction for other tools, with --scale baked in.

    gguf-control-vector: a llama.cpp control vector (GGUF, one F32 tensor direction.N per layer, added to the output
    of block N: a resid_pre L direction becomes direction.(L-1), resid_post L direction.L; load with
    --control-vector-scaled FILE S). repeng: the same container as repeng's ControlVector.export_gguf writes
    (index 0 allowed). safetensors: this toolkit's per-layer direction file (layers in the direction's own site
    convention). The file is written atomically; an existing file is replaced only with --force.
    """
    spec = LayerSpec.parse(cfg.layers)
    source, model = resolve_source(cfg.direction, cfg.per_layer)
    n_layers = cfg.n_layers if cfg.n_layers is not None else model.get("n_layers")
    cv = control_vectors(source, spec, scale=cfg.scale, unit=cfg.unit, n_layers=n_layers,
                         model_type=model.get("model_type"))
    info = write_control_vectors(cv, cfg.format, cfg.out, model_hint=cfg.model_hint, force=cfg.force)
    pairs = (", ".join(f"{cv.site} L{k} -> direction.{n}" for k, n in info["index"].items())
             if cfg.format != "safetensors" else f"{cv.site} layers {list(cv.layers)}")
    out.print(f"wrote {info['out']} ({cfg.format}, scale {cv.scale:g}{', unit' if cv.unit else ''}): {pairs}",
              highlight=False)
    if cfg.format == "gguf-control-vector":
        n = list(info["index"].values())
        console.print(f"llama.cpp: --control-vector-scaled {info['out']} 1.0 "
                      f"--control-vector-layer-range {min(n)} {max(n)}", highlight=False)
