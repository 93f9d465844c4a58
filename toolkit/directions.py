"""Directions in the residual stream: difference-in-means, the :class:`Direction` and :class:`DirectionSet` values
and their one artifact schema.

Difference-in-means (Arditi et al. 2024): ``r[l, i] = mean_harmful(x[l, i]) - mean_harmless(x[l, i])`` for
layer ``l`` and post-instruction position ``i``, accumulated in float64.

Artifact schema (version :data:`SCHEMA`): a safetensors file whose ``meta`` metadata entry is a JSON object with
``schema``, ``layer``, ``site``, ``position``, ``model_hash``, ``model_id``, ``d_model``, ``method`` and ``norm``
(derived, informative), plus any command-specific keys (a value's ``extra``, e.g. the Refusal Dial's
``learned_on``), at the top level. A single direction stores tensor ``direction`` ``[d_model]``; a per-layer stack
stores ``directions`` ``[n_layers, d_model]`` (or a grid ``[n_layers, n_positions, d_model]`` with ``positions``
``[n_positions]``), ``layers`` ``[n_layers]`` and auxiliary tensors (``resid_norm``, means, ...). Files without
``schema`` (version 1: extract and steer wrote ``pos`` for the position; extract's candidates file had no metadata)
still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ToolkitError


def diff_in_means(sum_a: torch.Tensor, n_a: int, sum_b: torch.Tensor, n_b: int) -> torch.Tensor:
    """``sum_a / n_a - sum_b / n_b`` in float64.

    Args:
        sum_a, sum_b: activation sums ``[..., d_model]`` (e.g. ``[n_layers, n_pos, d_model]``).
        n_a, n_b: prompt counts.

    Raises:
        ToolkitError: a count is zero (e.g. the training filter removed every prompt).
    """
    if n_a == 0 or n_b == 0:
        raise ToolkitError(f"difference-in-means needs prompts on both sides (got {n_a} and {n_b})")
    return sum_a.double() / n_a - sum_b.double() / n_b


def save_direction(path: Path, direction: torch.Tensor, meta: dict) -> None:
    """Write a direction ``[d_model]`` (float32, raw norm kept) with metadata as given to a safetensors file: the
    file layer under :meth:`Direction.save` (which commands use), also for hand-made or old-schema files."""
    save_file({"direction": direction.float().contiguous()}, str(path),
              metadata={"meta": json.dumps(meta, sort_keys=True)})


def read_tensors(path: Path, keys: tuple[str, ...], what: str = "tensor file") -> tuple[dict, dict]:
    """Read a safetensors file and its ``meta`` metadata (a JSON object) -> (``{name: tensor}``, metadata dict).

    Args:
        path: the ``.safetensors`` file.
        keys: tensor names that must be present.
        what: what the file is, for messages (e.g. ``"direction file"``).

    Raises:
        ToolkitError: missing, truncated or otherwise unreadable file; metadata that is not a JSON object; a
            required tensor missing.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"no {what} at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("meta", "{}")
        tensors = load_file(str(path))
    except Exception as e:
        raise ToolkitError(f"cannot read {what} {path} (truncated or not a safetensors file: "
                           f"{type(e).__name__})") from None
    try:
        meta = json.loads(raw)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ToolkitError(f"{what} {path}: its 'meta' metadata is not a JSON object")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ToolkitError(f"{what} {path} has no tensor {missing[0]!r} (it holds {', '.join(sorted(tensors))})")
    return tensors, meta


#: version of the direction artifact schema written here (files without ``schema`` are version 1)
SCHEMA = 2

# metadata keys of a direction file that are read, with their types (None allowed: "not recorded"); ``pos`` is
# version 1's name for ``position``
DIRECTION_META = {"schema": int, "model_hash": str, "model_id": str, "d_model": int, "layer": int, "position": int,
                  "pos": int, "site": str, "norm": float, "method": str}


def check_direction_meta(meta: dict, where) -> dict:
    """The metadata of a direction file, checked: each key of :data:`DIRECTION_META` that is present is None or of
    its type (an int is accepted for a float).

    Raises:
        ToolkitError: naming the file and the first key of the wrong type.
    """
    for key, typ in DIRECTION_META.items():
        v = meta.get(key)
        ok = v is None or (isinstance(v, typ) and not isinstance(v, bool)) or (typ is float and isinstance(v, int)
                                                                              and not isinstance(v, bool))
        if not ok:
            raise ToolkitError(f"direction file {where}: metadata {key!r} should be {typ.__name__}, got {v!r}")
    return meta


def load_direction(path: Path) -> tuple[torch.Tensor, dict]:
    """Read a direction file of any schema version -> (``[d_model]`` float32, its metadata as stored): the file
    layer under :meth:`Direction.load` (which commands use).

    Raises:
        ToolkitError: missing, truncated or unreadable file, metadata that is not a JSON object or has a known key
            of the wrong type (:func:`check_direction_meta`), no ``direction`` tensor, or one that is not a finite
            ``[d_model]`` float vector (checked as :class:`Direction` checks it).
    """
    path = Path(path)
    tensors, meta = read_tensors(path, ("direction",), "direction file")
    vector = Direction(tensors["direction"], source=str(path)).vector
    return vector, check_direction_meta(meta, path)


# ------------------------------------------------------------------------------------------------ values
#: the typed fields shared by :class:`Direction` and :class:`DirectionSet` metadata (everything else is ``extra``)
_FIELDS = ("layer", "site", "position", "model_hash", "model_id", "d_model", "method", "source")
#: metadata keys that are not ``extra``: the fields, the schema version, version 1's ``pos`` and the derived norm
_RESERVED = set(_FIELDS) | {"schema", "pos", "norm", "layers", "positions"}


def _split_meta(meta: dict, where) -> tuple[dict, dict]:
    """Raw file metadata (any schema version) -> (typed fields, extra). ``pos`` (version 1) becomes ``position``.

    Raises:
        ToolkitError: a schema newer than :data:`SCHEMA` or a known key of the wrong type.
    """
    check_direction_meta(meta, where)
    version = meta.get("schema") or 1
    if version > SCHEMA:
        raise ToolkitError(f"direction file {where}: schema version {version} is newer than this toolkit's ({SCHEMA})")
    fields = {k: meta.get(k) for k in _FIELDS if k != "source"}
    if fields["position"] is None:
        fields["position"] = meta.get("pos")
    extra = {k: v for k, v in meta.items() if k not in _RESERVED}
    return fields, extra


def _check_extra(extra: dict) -> None:
    clash = sorted(set(extra) & _RESERVED)
    if clash:
        raise ToolkitError(f"extra metadata must not reuse the field name {clash[0]!r}")


def _metadata(obj, norm: float | None) -> dict:
    """Schema-:data:`SCHEMA` metadata of a Direction or DirectionSet (``source`` is where it is read from, so it
    is not written)."""
    meta = {"schema": SCHEMA, **{k: getattr(obj, k) for k in _FIELDS if k != "source" and hasattr(obj, k)},
            **obj.extra}
    if norm is not None:
        meta["norm"] = norm
    return meta


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where directions come from: the keyword-only fields shared by :class:`Direction` and :class:`DirectionSet`
    (each documents them)."""

    site: str | None = None
    position: int | None = None
    model_hash: str | None = None
    model_id: str | None = None
    d_model: int | None = None
    method: str | None = None
    source: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Direction(Provenance):
    """One direction in the residual stream with its provenance: the value every command reads and writes
    (extract's difference-in-means, Arditi et al. 2024; steer's Refusal Dial top-k minus bottom-k; any file).

    Attributes:
        vector: ``[d_model]`` float32 on the CPU, its raw norm kept (difference-in-means is not normalised).
        layer: the layer it was taken at (non-negative), or None when not recorded.
        site: the hook site (``resid_pre``, ...), or None when not recorded.
        position: the prompt position (a negative index), or None.
        model_hash, model_id: the model it was taken from (:class:`toolkit.models.LoadedModel`), or None.
        d_model: the vector's width (filled in from ``vector``).
        method: how it was computed, e.g. ``"difference-in-means (Arditi et al. 2024)"``.
        source: where it was read from (a file or an extract run folder); None for a new one.
        extra: command-specific metadata saved with it (e.g. the Refusal Dial's ``learned_on``); its keys must not
            be field names.

    Raises (on construction):
        ToolkitError: a vector that is not a finite floating-point ``[d_model]`` tensor, a ``d_model`` that differs
            from its width, or extra keys that reuse a field name.
    """

    vector: torch.Tensor
    layer: int | None = None

    def __post_init__(self):
        v = self.vector
        where = f" in {self.source}" if self.source else ""
        if not isinstance(v, torch.Tensor) or v.ndim != 1:
            raise ToolkitError(f"direction{where} has shape {tuple(getattr(v, 'shape', ()))}, expected [d_model]")
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ToolkitError(f"direction{where} is not a finite floating-point vector")
        object.__setattr__(self, "vector", v.detach().to("cpu", torch.float32).contiguous())
        if self.d_model is None:
            object.__setattr__(self, "d_model", int(v.shape[0]))
        elif self.d_model != v.shape[0]:
            raise ToolkitError(f"direction{where}: metadata d_model {self.d_model} but the vector has {v.shape[0]} "
                               "values")
        _check_extra(self.extra)

    @property
    def norm(self) -> float:
        """The raw vector's L2 norm (float64 sum)."""
        return float(self.vector.double().norm())

    def metadata(self) -> dict:
        """The schema-:data:`SCHEMA` metadata written by :meth:`save` (fields, derived ``norm``, ``extra``)."""
        return _metadata(self, self.norm)

    def describe(self) -> dict:
        """Provenance for run.json: ``source`` and the metadata (without ``schema``)."""
        return {"source": self.source, **{k: v for k, v in self.metadata().items() if k != "schema"}}

    def save(self, path: Path) -> None:
        """Write the direction file: tensor ``direction`` ``[d_model]`` float32 and :meth:`metadata`."""
        save_direction(Path(path), self.vector, self.metadata())

    @classmethod
    def load(cls, path: Path, source: str | None = None) -> "Direction":
        """Read a direction file of any schema version (:func:`load_direction`); ``source`` defaults to ``path``.

        Raises:
            ToolkitError: as :func:`load_direction`; a schema newer than :data:`SCHEMA`; a recorded ``d_model``
                that differs from the vector's width.
        """
        vec, meta = load_direction(path)
        fields, extra = _split_meta(meta, path)
        return cls(vec, source=str(source if source is not None else path), extra=extra, **fields)

    @classmethod
    def resolve(cls, spec: str) -> "Direction":
        """A direction from a ``.safetensors`` file, an extract run folder (``runs/extract/NAME``) or an extract
        run's name: the run's ``direction.safetensors``, with ``source`` the run folder.

        Raises:
            ToolkitError: no such file or run, a run of another command, or an unreadable direction file.
        """
        from .runs import load_run

        p = Path(spec)
        if p.is_file():
            return cls.load(p)
        folder, _ = load_run(spec, "extract")
        return cls.load(folder / "direction.safetensors", source=str(folder))

    def check(self, lm) -> "Direction":
        """Refuse to use this direction with a model it was not made for; returns ``self``.

        Args:
            lm: a :class:`toolkit.models.LoadedModel` (``d_model``, ``model_hash``, ``model_id``).

        Raises:
            ToolkitError: another width, or a recorded model hash that differs from the model's (an unrecorded
                hash is accepted).
        """
        if self.d_model != lm.d_model:
            raise ToolkitError(f"direction has d_model {self.d_model} but model {lm.model_id} has d_model "
                               f"{lm.d_model}")
        if self.model_hash and self.model_hash != lm.model_hash:
            raise ToolkitError(f"direction was extracted from model {self.model_id} (hash {self.model_hash[:12]}), "
                               f"not {lm.model_id} (hash {lm.model_hash[:12]})")
        return self


@dataclass(frozen=True)
class DirectionSet(Provenance):
    """Per-layer directions of one run with one provenance: difference-in-means per layer from cones (OBLITERATUS's
    concept cones, pooled direction) and geometry (Heretic's residual geometry), or extract's candidate grid
    (Arditi et al. 2024); the input of ``refusal imprint``.

    Attributes:
        vectors: ``[n_layers, d_model]`` float32, or a grid ``[n_layers, n_positions, d_model]`` when ``positions``
            is given (extract's candidates; :meth:`at` picks one position).
        layers: the layer of each row, ``len == n_layers``.
        positions: the (negative) position of each grid column, or None for a ``[n_layers, d_model]`` stack.
        site, position, model_hash, model_id, d_model, method, source, extra: as :class:`Direction` (``position``:
            the stack's position; for a grid, the chosen one or None).
        tensors: auxiliary tensors saved alongside, e.g. ``resid_norm`` ``[n_layers]`` (mean residual norm per
            layer), ``mean_harmful``/``mean_harmless`` or ``category_directions`` ``[k, n_layers, d_model]``.

    Raises (on construction):
        ToolkitError: shapes that disagree (``vectors`` against ``layers``, ``positions`` and ``resid_norm``),
            values that are not finite, or extra keys that reuse a field name.
    """

    vectors: torch.Tensor
    layers: tuple[int, ...]
    positions: tuple[int, ...] | None = None
    tensors: dict = field(default_factory=dict)

    def __post_init__(self):
        v, where = self.vectors, self.source or "direction set"
        layers = tuple(int(x) for x in self.layers)
        object.__setattr__(self, "layers", layers)
        if self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(x) for x in self.positions))
        rn = self.tensors.get("resid_norm")
        want = 2 if self.positions is None else 3
        n = v.shape[0] if isinstance(v, torch.Tensor) and v.ndim == want else -1
        if n < 0 or len(layers) != n or (rn is not None and tuple(rn.shape) != (n,)):
            raise ToolkitError(f"{where} holds directions {tuple(getattr(v, 'shape', ()))} for {len(layers)} layers; "
                               "expected [n_layers, d_model] and [n_layers]")
        if self.positions is not None and v.shape[1] != len(self.positions):
            raise ToolkitError(f"{where} has directions {tuple(v.shape)} for {len(self.positions)} positions")
        if not v.is_floating_point() or not bool(torch.isfinite(v).all()):
            raise ToolkitError(f"{where} holds direction values that are not finite")
        object.__setattr__(self, "vectors", v.detach().to("cpu", torch.float32).contiguous())
        if self.d_model is None:
            object.__setattr__(self, "d_model", int(v.shape[-1]))
        _check_extra(self.extra)

    @property
    def resid_norm(self) -> torch.Tensor | None:
        """Mean residual norm per layer ``[n_layers]`` float32, or None when the run did not record it."""
        return self.tensors.get("resid_norm")

    def at(self, position: int) -> "DirectionSet":
        """The ``[n_layers, d_model]`` stack at one position of a grid (a stack: itself, if ``position`` is its own).

        Raises:
            ToolkitError: the set has no directions at that position.
        """
        if self.positions is None:
            if self.position is not None and position != self.position:
                raise ToolkitError(f"{self.source} holds directions at position {self.position} only, not {position}")
            return self
        if position not in self.positions:
            raise ToolkitError(f"{self.source} has candidates at positions {list(self.positions)}, not {position}")
        pi = self.positions.index(position)
        return replace(self, vectors=self.vectors[:, pi], positions=None, position=position,
                       tensors={"resid_norm": self.resid_norm} if self.resid_norm is not None else {})

    def direction(self, layer: int, position: int | None = None) -> Direction:
        """One row (and, for a grid, one column) as a :class:`Direction` with this set's provenance.

        Raises:
            ToolkitError: no such layer or position.
        """
        s = self if position is None and self.positions is None else self.at(position)
        if layer not in s.layers:
            raise ToolkitError(f"{self.source} has no direction at layer {layer} (layers {list(s.layers)})")
        return Direction(s.vectors[s.layers.index(layer)], extra=dict(s.extra), layer=layer,
                         **{k: getattr(s, k) for k in _FIELDS if k != "layer"})

    def save(self, path: Path) -> None:
        """Write the set: ``directions``, ``layers`` (int64), ``positions`` for a grid, the auxiliary ``tensors``
        (float tensors as float32) and schema-:data:`SCHEMA` metadata."""
        t = {"directions": self.vectors, "layers": torch.tensor(self.layers, dtype=torch.int64)}
        if self.positions is not None:
            t["positions"] = torch.tensor(self.positions, dtype=torch.int64)
        for k, x in self.tensors.items():
            t[k] = (x.float() if x.is_floating_point() else x).contiguous()
        save_file(t, str(path), metadata={"meta": json.dumps(_metadata(self, None), sort_keys=True)})

    @classmethod
    def load(cls, path: Path, what: str = "direction set file", require: tuple[str, ...] = (),
             source: str | None = None) -> "DirectionSet":
        """Read a per-layer direction file of any schema version.

        Args:
            path: the ``.safetensors`` file.
            what: what the file is, for messages.
            require: auxiliary tensors that must be present (e.g. ``("resid_norm",)``).
            source: recorded as ``source`` [default: ``path``].

        Raises:
            ToolkitError: unreadable file (:func:`read_tensors`), a required tensor missing, metadata of the wrong
                type or a newer schema, or shapes that disagree.
        """
        tensors, meta = read_tensors(path, ("directions", "layers") + tuple(require), what)
        fields, extra = _split_meta(meta, path)
        t = tensors.pop("directions")
        layers, positions = tensors.pop("layers"), tensors.pop("positions", None)
        if layers.ndim != 1 or (positions is not None and positions.ndim != 1):
            raise ToolkitError(f"{path} holds directions {tuple(t.shape)} for {tuple(layers.shape)} layers; "
                               "expected [n_layers, d_model] and [n_layers]")
        fields["d_model"] = None  # from the tensor
        fields.pop("layer")  # a set's layers are its ``layers`` tensor
        s = cls(t, tuple(layers.tolist()), None if positions is None else tuple(positions.tolist()),
                source=str(path), extra=extra, tensors=tensors, **fields)  # shape errors name the file
        return s if source is None else replace(s, source=str(source))

    @classmethod
    def resolve(cls, spec: str, position: int | None = None) -> "DirectionSet":
        """The per-layer directions of a run: a cones or geometry run (``directions.safetensors``) or an extract
        run (``candidates.safetensors`` at its chosen position, or ``position``). ``source`` is
        ``"<command>/<run name>"``, ``extra["command"]`` the command; the model id and hash are the run's.

        Raises:
            ToolkitError: no such run, a run of another command, a missing or malformed file, or no directions at
                ``position``.
        """
        from .runs import load_run

        folder, meta = load_run(spec)
        cmd = meta.get("command")
        name = f"{cmd}/{folder.name}"
        if cmd in ("cones", "geometry"):
            s = cls.load(folder / "directions.safetensors", f"{cmd} run's directions file", ("resid_norm",), name)
            if s.positions is not None:
                raise ToolkitError(f"{folder}: directions.safetensors holds a grid, expected [n_layers, d_model]")
            if position is not None:
                s.at(position)  # refuses another position
        elif cmd == "extract":
            s = cls.load(folder / "candidates.safetensors", "extract run's candidates file", ("positions",), name)
            chosen = s.position  # version 1 files record none: the run's chosen position
            if chosen is None:
                chosen = (meta.get("results") or {}).get("chosen", {}).get("pos", -1)
            s = s.at(position if position is not None else chosen)
            s = replace(s, site=s.site or "resid_pre")  # version 1 files record none: extract reads resid_pre
        else:
            raise ToolkitError(f"{spec} is a '{cmd}' run; per-layer directions come from cones, geometry or "
                               "extract runs")
        model = meta.get("model") or {}
        return replace(s, model_hash=model.get("hash") or s.model_hash, model_id=model.get("id") or s.model_id,
                       extra={**s.extra, "command": cmd})
