"""Refusal directions written for other tools: llama.cpp control vectors (GGUF), repeng ``ControlVector`` files and
plain safetensors, with the scale baked in.

Layer conventions. This toolkit names sites as TransformerLens does: ``resid_pre`` of block ``L`` is the input of
block ``L`` (= ``resid_post`` of block ``L - 1``), ``resid_post`` of block ``L`` its output. Both other tools add
their vector to the OUTPUT of a decoder block, so a vector made at ``resid_post L`` goes to their index ``L`` and
one made at ``resid_pre L`` to index ``L - 1`` (:func:`block_output_index`); other sites (``resid_mid``,
``attn_out``, ``mlp_out``) have no place in either format and are refused. Evidence, from the sources:

* llama.cpp (ggml-org/llama.cpp): ``common/common.cpp`` ``common_control_vector_load_one`` reads each tensor
  ``direction.N`` (``N`` parsed after the dot; ``N == 0`` is rejected: "invalid (zero) direction tensor layer
  index"; non-F32 and non-1-D tensors are rejected) into ``data[n_embd * (N - 1) ...]`` ("layer 1 at [0]"),
  multiplied by the ``--control-vector-scaled`` strength; it reads neither ``controlvector.model_hint`` nor
  ``controlvector.layer_count``. ``src/llama-adapter.cpp`` ``llama_adapter_cvec::apply`` copies
  ``data + n_embd * (il - 1)`` into ``tensors[il]`` for ``il = 1 .. n_layer - 1`` ("there's never a tensor for
  layer 0"; ``tensor_for(il)`` also honours ``--control-vector-layer-range A B``, inclusive), and
  ``llama_adapter_cvec::apply_to`` adds ``tensors[il]`` to the tensor it is given. That tensor is, in every graph
  builder (e.g. ``src/models/qwen2.cpp``; ``llm_graph_context::build_cvec`` in ``src/llama-graph.cpp`` calls
  ``cvec->apply_to``), ``cur = build_cvec(cur, il)`` right after the feed-forward residual add and before
  ``cb(cur, "l_out", il)`` / ``inpL = cur``: the output of block ``il`` (0-based). So ``direction.N`` is added to
  our ``resid_post N`` = ``resid_pre N + 1``, and ``N >= 1``: ``resid_post 0`` and ``resid_pre 0``/``1`` cannot be
  expressed.
* repeng (vgel/repeng): ``repeng/control.py`` ``ControlModel`` wraps ``model.layers[i]`` in a ``ControlModule``
  whose ``forward`` adds ``directions[i]`` (times ``coeff``) to the block's output (``output[0]``), and
  ``repeng/extract.py`` ``batched_get_hiddens`` reads ``hidden_states[i + 1]`` (the output of block ``i``) for
  ``directions[i]``: the same block-output convention, so the same mapping. ``ControlVector.export_gguf`` writes
  ``general.architecture = controlvector``, ``controlvector.model_hint`` (the Hugging Face ``model_type``),
  ``controlvector.layer_count`` (uint32, ``len(directions)``) and a tensor ``direction.{i}`` per key;
  ``ControlVector.import_gguf`` warns on another architecture, raises without ``controlvector.model_hint``, ignores
  ``layer_count`` and reads every ``direction.N`` into ``directions[N]``. repeng has a slot for block 0's output,
  so ``--format repeng`` accepts index 0 (``resid_post 0`` / ``resid_pre 1``), which llama.cpp rejects. To steer
  with it in repeng: ``ControlModel(model, list(cv.directions))`` then ``set_control(cv, coeff)``
  (``set_control`` reads ``directions[i]`` for every controlled layer ``i``).

Files written (:func:`write_control_vectors`):

* ``gguf-control-vector``: GGUF, architecture ``controlvector``; ``controlvector.model_hint`` (string),
  ``controlvector.layer_count`` (uint32: the model's number of layers when known, else the highest index + 1;
  llama.cpp does not read it), one F32 ``[d_model]`` tensor ``direction.N`` (``N >= 1``) per layer, in increasing
  ``N``, plus ``refusal_toolkit.provenance`` (a JSON string: site, our layers, scale, source, model).
* ``repeng``: the same container with repeng's own choices: ``layer_count = len(directions)`` as
  ``export_gguf`` writes, index 0 allowed; ``ControlVector.import_gguf(path)`` reads it.
* ``safetensors``: a per-layer direction file of this toolkit's schema (:meth:`DirectionSet.save`): ``directions``
  ``[n, d_model]`` float32 (scale baked in), ``layers`` ``[n]`` int64 (OUR layer indices at ``site``, no remapping;
  any site), metadata ``meta`` JSON with ``site``, ``position``, ``model_hash``, ``model_id``, ``d_model``,
  ``method`` and ``scale``, ``unit``, ``exported_from``, ``layer_convention`` (and ``model_hint`` when given). It
  loads back with :meth:`DirectionSet.load`.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .directions import Direction, DirectionSet
from .errors import ToolkitError
from .fileio import atomic_write_bytes
from .index_spec import LayerSpec

#: the formats :func:`write_control_vectors` writes
FORMATS = ("gguf-control-vector", "repeng", "safetensors")
#: sites a block-output format (llama.cpp, repeng) can hold
BLOCK_OUTPUT_SITES = ("resid_pre", "resid_post")
#: GGUF architecture and keys of a control vector (llama.cpp, repeng)
ARCH = "controlvector"
KEY_MODEL_HINT = f"{ARCH}.model_hint"
KEY_LAYER_COUNT = f"{ARCH}.layer_count"
KEY_PROVENANCE = "refusal_toolkit.provenance"
#: lowest ``direction.N`` index each GGUF format accepts (llama.cpp rejects ``direction.0``; repeng does not)
MIN_INDEX = {"gguf-control-vector": 1, "repeng": 0}

LAYER_CONVENTION = ("layers are refusal-toolkit block indices at `site` (TransformerLens names: resid_pre of L = "
                    "input of block L = resid_post of L-1); vectors have the scale baked in")


def block_output_index(layer: int, site: str) -> int:
    """The index of the block whose OUTPUT receives a vector made at ``site`` of ``layer`` (llama.cpp's
    ``direction.N``, repeng's ``directions[N]``; module docstring for the evidence).

    Args:
        layer: this toolkit's block index (non-negative).
        site: ``resid_post`` (-> ``layer``) or ``resid_pre`` (-> ``layer - 1``; ``-1`` for ``resid_pre 0``, the
            embeddings, which no block output holds).

    Raises:
        ToolkitError: another site (``resid_mid``, ``attn_out``, ``mlp_out``: not a block output).
    """
    if site == "resid_post":
        return int(layer)
    if site == "resid_pre":
        return int(layer) - 1
    raise ToolkitError(f"the direction's site is {site}, which has no place in a control vector file (it adds to "
                       "block outputs: resid_post of L = resid_pre of L+1); export a resid_pre or resid_post "
                       "direction, or use the safetensors format")


@dataclass(frozen=True)
class ControlVectors:
    """Per-layer vectors ready to add to the residual stream, in this toolkit's layer convention.

    Attributes:
        vectors: ``[n, d_model]`` float32 on the CPU: the direction (unit-normalised when ``unit``) times ``scale``.
        layers: this toolkit's block index of each row (non-negative, distinct), ``len == n``.
        site: the hook site the layers refer to (``resid_pre``, ``resid_post``, ...).
        scale: the coefficient baked in.
        unit: whether each direction was normalised to unit L2 norm before scaling.
        n_layers: the model's number of decoder blocks, or None when not known.
        model_id, model_hash, model_type: the model the directions come from (None: not recorded); ``model_type``
            is the Hugging Face ``config.model_type`` (e.g. ``qwen2``).
        source: where the directions were read from.
        method, position: the directions' provenance (:class:`~toolkit.directions.Direction`).
    """

    vectors: torch.Tensor
    layers: tuple[int, ...]
    site: str
    scale: float = 1.0
    unit: bool = False
    n_layers: int | None = None
    model_id: str | None = None
    model_hash: str | None = None
    model_type: str | None = None
    source: str | None = None
    method: str | None = None
    position: int | None = None

    @property
    def d_model(self) -> int:
        """The vectors' width."""
        return int(self.vectors.shape[1])

    def block_outputs(self, min_index: int = 1) -> dict[int, torch.Tensor]:
        """The vectors keyed by the block whose output receives them (:func:`block_output_index`), in increasing
        order: ``{N: [d_model] float32}``.

        Args:
            min_index: the lowest index the target accepts (1 for llama.cpp, 0 for repeng).

        Raises:
            ToolkitError: a site that is not a block output (:func:`block_output_index`), or (``layers``) a layer
                whose index falls below ``min_index`` (or reaches ``n_layers`` when that is known).
        """
        out = {}
        for layer, v in zip(self.layers, self.vectors):
            n = block_output_index(layer, self.site)
            if n < min_index:
                lowest = min_index + (1 if self.site == "resid_pre" else 0)
                raise ToolkitError(
                    f"{self.site} of layer {layer} is {'the embeddings' if n < 0 else f'the output of block {n}'}, "
                    f"which this format cannot hold (its lowest slot is the output of block {min_index}, i.e. "
                    f"{self.site} layer {lowest}); choose other layers", param="layers")
            if self.n_layers is not None and n >= self.n_layers:
                raise ToolkitError(f"{self.site} of layer {layer} is past the last block of a {self.n_layers}-layer "
                                   "model", param="layers")
            out[n] = v
        return dict(sorted(out.items()))

    def provenance(self) -> dict:
        """JSON-safe provenance written into every file: site, layers, scale, unit, source and model."""
        return {"layer_convention": LAYER_CONVENTION, "site": self.site, "layers": list(self.layers),
                "scale": self.scale, "unit": self.unit, "source": self.source, "model_id": self.model_id,
                "model_hash": self.model_hash, "model_type": self.model_type, "n_layers": self.n_layers,
                "method": self.method, "position": self.position}


def _resolve_layers(spec: LayerSpec, n_layers: int | None) -> tuple[int, ...]:
    """A given layer selection -> non-negative distinct layers (negative indices need ``n_layers``)."""
    if n_layers is not None:
        return spec.resolve(n_layers)
    if any(i < 0 for i in spec.indices):
        raise ToolkitError("negative layers count from the end, but the model's depth is not known here; give "
                           "non-negative layers or `n_layers`", param=spec.param)
    return tuple(dict.fromkeys(int(i) for i in spec.indices))


def control_vectors(source: Direction | DirectionSet, layers: LayerSpec | None = None, *, scale: float = 1.0,
                    unit: bool = False, n_layers: int | None = None, model_type: str | None = None) -> ControlVectors:
    """The vectors to export from a direction or a per-layer set, with the scale baked in.

    Args:
        source: a :class:`Direction` (its vector goes to every selected layer; default: its own ``layer``) or a
            :class:`DirectionSet` ``[n_layers, d_model]`` stack (each selected layer gets its own row; default:
            all its layers). A missing ``site`` is read as ``resid_pre`` (as ``refusal steer`` does).
        layers: the layers that get a vector (this toolkit's indices at the direction's site) [default: above].
        scale: coefficient multiplied in (finite, non-zero).
        unit: normalise each vector to unit L2 norm (float64) before scaling.
        n_layers: the model's number of decoder blocks, when known (checks layers, resolves negative ones).
        model_type: the model's Hugging Face ``model_type``, when known (a default model hint).

    Returns:
        :class:`ControlVectors` with ``vectors`` ``[n, d_model]`` float32.

    Raises:
        ToolkitError: a scale that is not finite or is zero (``scale``); a direction that records no layer and no
            ``layers`` given; a layer not in the set, negative without ``n_layers`` or out of range (``layers``);
            a grid set (pick a position first); ``unit`` with a zero vector (``unit``).
    """
    if not math.isfinite(scale) or scale == 0:
        raise ToolkitError(f"must be a finite non-zero number, got {scale!r}", param="scale")
    if n_layers is not None and n_layers < 1:
        raise ToolkitError(f"must be >= 1, got {n_layers}", param="n_layers")
    where = source.source or "direction"
    if isinstance(source, Direction):
        if layers is not None and layers.given:
            chosen = _resolve_layers(layers, n_layers)
        elif source.layer is None:
            raise ToolkitError(f"{where} records no layer; give the layers that get the vector", param="layers")
        else:
            chosen = (int(source.layer),)
        rows = source.vector.unsqueeze(0).expand(len(chosen), -1)
    else:
        if source.positions is not None:
            raise ToolkitError(f"{where} holds a grid of positions; pick one position first")
        if layers is not None and layers.given:
            chosen = _resolve_layers(layers, n_layers)
            missing = [i for i in chosen if i not in source.layers]
            if missing:
                raise ToolkitError(f"{where} has no direction at layer {missing[0]} (layers "
                                   f"{list(source.layers)})", param="layers")
        else:
            chosen = tuple(source.layers)
        rows = source.vectors[[source.layers.index(i) for i in chosen]]
    if n_layers is not None:
        bad = [i for i in chosen if i >= n_layers]
        if bad:
            raise ToolkitError(f"layer {bad[0]} is out of range: the model has {n_layers} layers", param="layers")
    v = rows.double()
    if unit:
        norms = v.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise ToolkitError(f"{where}: a zero vector has no direction to normalise", param="unit")
        v = v / norms
    vectors = (v * scale).float().contiguous()
    return ControlVectors(vectors, chosen, source.site or "resid_pre", float(scale), bool(unit), n_layers,
                          source.model_id, source.model_hash, model_type, source.source, source.method,
                          source.position)


def resolve_source(spec: str, per_layer: bool = False) -> tuple[Direction | DirectionSet, dict]:
    """What ``DIRECTION`` names, as other commands read it, and the model it came from.

    Args:
        spec: a direction file (tensor ``direction``) or per-layer file (``directions`` + ``layers``), an extract
            run (folder or name: its chosen direction, :meth:`Direction.resolve`), or a cones/geometry run (its
            per-layer directions, :meth:`DirectionSet.resolve`).
        per_layer: for an extract run, its per-layer candidates at the chosen position instead of the chosen one.

    Returns:
        (the direction or set, the run's ``model`` record from run.json: ``n_layers``, ``model_type``, ... or ``{}``
        for a file).

    Raises:
        ToolkitError: no such file or run, an unreadable file, a run of another command, ``per_layer`` with a
            single-direction file.
    """
    from safetensors import safe_open

    from .runs import load_run

    p = Path(spec)
    if p.is_file():
        try:
            with safe_open(str(p), "pt") as f:
                keys = set(f.keys())
        except Exception:
            keys = set()  # Direction.load says what is wrong with it
        if "direction" not in keys and "directions" in keys:
            s = DirectionSet.load(p)
            if s.positions is not None:
                if s.position is None:
                    raise ToolkitError(f"{p} holds a grid of positions and records no chosen position")
                s = s.at(s.position)
            return s, {}
        if per_layer:
            raise ToolkitError(f"{p} is a single-direction file; per-layer export needs a cones, geometry or "
                               "extract run, or a per-layer file", param="per_layer")
        return Direction.load(p), {}
    if p.suffix == ".safetensors" and not p.exists():
        raise ToolkitError(f"no direction file at {p}")
    folder, meta = load_run(spec) if p.exists() else load_run(spec, "extract")
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    if meta.get("command") == "extract" and not per_layer:
        return Direction.resolve(str(folder)), model
    return DirectionSet.resolve(str(folder)), model


def _gguf_bytes(outputs: dict[int, torch.Tensor], model_hint: str, layer_count: int, provenance: dict) -> bytes:
    """A control-vector GGUF written by ``gguf.GGUFWriter`` -> its bytes."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.gguf"
        w = gguf.GGUFWriter(str(path), ARCH)
        w.add_string(KEY_MODEL_HINT, model_hint)
        w.add_uint32(KEY_LAYER_COUNT, layer_count)
        w.add_string(KEY_PROVENANCE, json.dumps(provenance, sort_keys=True))
        for n, v in outputs.items():
            w.add_tensor(f"direction.{n}", np.ascontiguousarray(v.numpy(), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def _safetensors_bytes(cv: ControlVectors, model_hint: str | None) -> bytes:
    """A per-layer direction file of this toolkit's schema (:meth:`DirectionSet.save`) -> its bytes."""
    extra = {"scale": cv.scale, "unit": cv.unit, "exported_from": cv.source, "layer_convention": LAYER_CONVENTION}
    if model_hint is not None:
        extra["model_hint"] = model_hint
    s = DirectionSet(cv.vectors, cv.layers, site=cv.site, position=cv.position, model_hash=cv.model_hash,
                     model_id=cv.model_id, method=cv.method, extra=extra)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cv.safetensors"
        s.save(path)
        return path.read_bytes()


def default_model_hint(cv: ControlVectors) -> str | None:
    """The model hint written when none is given: the model's Hugging Face ``model_type`` (what repeng writes,
    e.g. ``qwen2``), else its id, else None."""
    return cv.model_type or cv.model_id


def write_control_vectors(cv: ControlVectors, fmt: str, out: Path, *, model_hint: str | None = None,
                          force: bool = False) -> dict:
    """Write ``cv`` as a file of format ``fmt`` at ``out``, atomically (:func:`toolkit.fileio.atomic_write_bytes`).

    Args:
        cv: the vectors (:func:`control_vectors`).
        fmt: one of :data:`FORMATS` (module docstring for each layout).
        out: the file to write; its folder must exist.
        model_hint: ``controlvector.model_hint`` [default: :func:`default_model_hint`].
        force: replace an existing file (never done silently).

    Returns:
        What was written: ``format``, ``out``, ``tensors`` (names), ``index`` (``{our layer: file index}``; the file
        index is the block-output index for the GGUF formats, our layer for safetensors), ``model_hint``,
        ``layer_count`` (GGUF formats).

    Raises:
        ToolkitError: an unknown format (``format``); ``out`` exists without ``force``, is a folder, or its folder is
            missing (``out``); no model hint known for a GGUF format (``model_hint``); a site or layer the format
            cannot hold (:meth:`ControlVectors.block_outputs`).
    """
    if fmt not in FORMATS:
        raise ToolkitError(f"must be one of {', '.join(FORMATS)}, got {fmt!r}", param="format")
    out = Path(out)
    if out.is_dir():
        raise ToolkitError(f"{out} is a folder; give a file name", param="out")
    if not out.parent.is_dir():
        raise ToolkitError(f"folder {out.parent} does not exist", param="out")
    if out.exists() and not force:
        raise ToolkitError(f"{out} already exists; choose another name or pass `force` to overwrite", param="out")
    hint = model_hint if model_hint is not None else (default_model_hint(cv) if fmt != "safetensors" else None)
    if hint is not None and not hint.strip():
        raise ToolkitError("must not be empty", param="model_hint")
    info = {"format": fmt, "out": str(out), "model_hint": hint}
    if fmt == "safetensors":
        data = _safetensors_bytes(cv, hint)
        info |= {"tensors": ["directions", "layers"], "index": {layer: layer for layer in cv.layers}}
    else:
        outputs = cv.block_outputs(MIN_INDEX[fmt])
        if hint is None:
            raise ToolkitError("the direction records no model; give the model hint (e.g. the model_type, qwen2)",
                               param="model_hint")
        count = len(outputs) if fmt == "repeng" else (cv.n_layers if cv.n_layers is not None else max(outputs) + 1)
        data = _gguf_bytes(outputs, hint, count, cv.provenance())
        info |= {"tensors": [f"direction.{n}" for n in outputs], "layer_count": count,
                 "index": {layer: block_output_index(layer, cv.site) for layer in cv.layers}}
    try:
        atomic_write_bytes(out, data)
    except OSError as e:
        raise ToolkitError(f"cannot write {out}: {e.strerror or e}", param="out") from None
    return info
