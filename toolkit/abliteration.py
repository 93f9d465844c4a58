"""Abliteration as a parametrised weight edit of the residual writers, applied as hooks or merged into weights.

An edit removes, at each layer ``l``, a unit direction ``r_l`` from the outputs of the two linear maps that write into
the residual stream, attention's ``o_proj`` (component ``"attn"``) and the MLP's ``down_proj`` (component ``"mlp"``),
with a strength ``w`` per layer and component:

* ``projection`` (Arditi et al. 2024 at ``w = 1``; Heretic's rank-1 ``W <- W - w r r^T W`` with a per-layer ``w``):
  ``W' = (I - w r r^T) W``, ``b' = (I - w r r^T) b``.
* ``norm_preserving`` (Heretic >= 1.2, ``row_normalization = "full"``, after grimjim 2025, "norm-preserving
  biprojected abliteration"): the rows of ``W`` (one per residual coordinate) are normalised, the projection is applied
  to the normalised matrix, and each edited row is rescaled to its original norm:
  ``W' = diag(|W_i|) normalize_rows(Wn - w r (r^T Wn))`` with ``Wn = diag(1/|W_i|) W``; ``b' = (I - w r r^T) b``.
  Heretic stores this as a rank-3 SVD approximation of ``W' - W``; here it is applied exactly.
* ``affine`` (Marshall et al. 2024, "Refusal in LLMs: an affine function"): the component along ``r`` is moved towards
  a reference level ``c`` (the module's mean output along ``r`` on harmless prompts) instead of towards 0:
  ``y' = y - w r (r . y - c)``, i.e. ``W' = (I - w r r^T) W`` and ``b' = (I - w r r^T) b + w c r``.

Every form is a function of the module's output alone, ``y' = s * (z - a (g . z)) + b'`` with ``z = y - b``, so
:func:`edit_hooks` applies it exactly as forward hooks on the modules' outputs (no weight is copied), and
:func:`apply_weight_edit` writes the same map into the weights (export, and the equivalence tests). The per-layer
strengths come from Heretic's kernel (:class:`Kernel`); directions from a per-layer set, optionally interpolated at a
fractional layer index (:func:`direction_at`, Heretic) and made orthogonal to the harmless mean
(:func:`orthogonalize_to`, grimjim 2025, "projected abliteration").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ToolkitError
from .hooks import Reach, decoder_layers, hooked, writer_module

COMPONENTS = {"attn": "o_proj", "mlp": "down_proj"}  # component (Heretic's "attn.o_proj", "mlp.down_proj") -> site
FORMS = ("projection", "norm_preserving", "affine")


@dataclass(frozen=True)
class Kernel:
    """Heretic's per-layer weight kernel for one component (p-e-w/heretic, ``AbliterationParameters``).

    The strength at layer ``l`` is ``max_weight + (d / min_weight_distance) * (min_weight - max_weight)`` with
    ``d = |l - max_weight_position|``, and 0 (layer untouched) where ``d > min_weight_distance``: a tent that peaks at
    ``max_weight_position`` and falls linearly to ``min_weight`` at distance ``min_weight_distance``.

    Attributes:
        max_weight: strength at the peak (dimensionless; 1 removes the direction entirely; 0 switches the component
            off).
        max_weight_position: the peak, a fractional layer index in ``[0, n_layers - 1]``.
        min_weight: strength at the edge of the tent.
        min_weight_distance: half-width of the tent in layers, ``> 0``.

    Raises (on construction):
        ToolkitError: a value that is not finite, or ``min_weight_distance <= 0``.
    """

    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def __post_init__(self):
        vals = (self.max_weight, self.max_weight_position, self.min_weight, self.min_weight_distance)
        if not all(math.isfinite(float(v)) for v in vals):
            raise ToolkitError(f"kernel parameters must be finite, got {vals}")
        if self.min_weight_distance <= 0:
            raise ToolkitError(f"min_weight_distance must be > 0, got {self.min_weight_distance}")

    def weights(self, n_layers: int) -> torch.Tensor:
        """The strength of every layer, ``[n_layers]`` float64 (0 where the layer is untouched)."""
        layers = torch.arange(n_layers, dtype=torch.float64)
        d = (layers - self.max_weight_position).abs()
        w = self.max_weight + (d / self.min_weight_distance) * (self.min_weight - self.max_weight)
        return torch.where(d > self.min_weight_distance, torch.zeros_like(w), w)


def unit_rows(v: torch.Tensor, what: str = "direction") -> torch.Tensor:
    """Rows of ``v`` ``[..., d]`` scaled to unit norm, float64.

    Raises:
        ToolkitError: a zero or non-finite row.
    """
    v = v.detach().to("cpu", torch.float64)
    n = v.norm(dim=-1, keepdim=True)
    if not bool(torch.isfinite(v).all()) or bool((n == 0).any()):
        raise ToolkitError(f"{what} is zero or not finite")
    return v / n


def orthogonalize_to(directions: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Projected abliteration (grimjim 2025; Heretic's ``orthogonalize_direction``): each row of ``directions`` made
    orthogonal to the matching row of ``reference`` (the harmless mean), then normalised.

    Args:
        directions: ``[n, d_model]`` refusal directions, any norm.
        reference: ``[n, d_model]`` harmless means (same layers).

    Returns:
        ``[n, d_model]`` float64 unit rows ``r' / |r'|`` with ``r' = r - (r . g_hat) g_hat``.

    Raises:
        ToolkitError: shapes differ, or a zero/non-finite row (before or after the projection).
    """
    if directions.shape != reference.shape:
        raise ToolkitError(f"directions {tuple(directions.shape)} and reference means {tuple(reference.shape)} differ")
    r, g = unit_rows(directions), unit_rows(reference, "harmless mean")
    return unit_rows(r - (r * g).sum(-1, keepdim=True) * g, "direction orthogonal to the harmless mean")


def direction_at(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The direction at a fractional layer index (Heretic's ``direction_index``): rows ``floor(index)`` and
    ``floor(index) + 1`` of ``directions`` linearly interpolated (``lerp``) by the fractional part, then normalised.

    Args:
        directions: ``[n_layers, d_model]`` unit directions (row ``l``: layer ``l``).
        index: in ``[0, n_layers - 1]``.

    Returns:
        ``[d_model]`` float64, unit norm.

    Raises:
        ToolkitError: index out of range or not finite; a zero interpolated direction.
    """
    n = directions.shape[0]
    if not math.isfinite(index) or not 0 <= index <= n - 1:
        raise ToolkitError(f"direction index {index} is outside [0, {n - 1}]")
    lo = min(int(math.floor(index)), n - 1)
    frac = index - lo
    v = directions[lo].double()
    if frac > 0:
        v = torch.lerp(v, directions[lo + 1].double(), frac)
    return unit_rows(v, f"the direction interpolated at index {index}")


@dataclass(frozen=True)
class WeightEdit:
    """One abliteration edit of a model's residual writers (see the module docstring for the three forms).

    Attributes:
        directions: ``[n_layers, d_model]`` float64 unit rows: the direction removed at each layer (the same row
            repeated for a single global direction).
        strengths: ``{"attn": [n_layers], "mlp": [n_layers]}`` float64 strengths ``w`` (0: module untouched); a
            missing component is untouched.
        form: ``"projection"``, ``"norm_preserving"`` or ``"affine"``.
        references: for ``"affine"`` only: ``{"attn": [n_layers], "mlp": [n_layers]}`` float64 reference levels
            ``c`` (the module's mean output projected on ``directions[l]``, residual-stream units).
        meta: free description carried into run records (e.g. the trial's parameters).

    Raises (on construction):
        ToolkitError: unknown form or component, shapes that disagree, non-finite values, or references missing for
            ``"affine"``.
    """

    directions: torch.Tensor
    strengths: dict
    form: str = "projection"
    references: dict | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.form not in FORMS:
            raise ToolkitError(f"unknown edit form {self.form!r}; choose one of {', '.join(FORMS)}")
        d = self.directions
        if d.ndim != 2:
            raise ToolkitError(f"edit directions must be [n_layers, d_model], got {tuple(d.shape)}")
        object.__setattr__(self, "directions", unit_rows(d, "edit direction"))
        n = d.shape[0]
        def per_layer(values, what: str) -> torch.Tensor:  # n finite values as float64 on the CPU
            v = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
            if v.shape != (n,) or not bool(torch.isfinite(v).all()):
                raise ToolkitError(f"{what} must be {n} finite values, got shape {tuple(v.shape)}")
            return v

        for comp in self.strengths:
            if comp not in COMPONENTS:
                raise ToolkitError(f"unknown component {comp!r}; choose from {', '.join(COMPONENTS)}")
        st = {comp: per_layer(w, f"strengths of {comp}") for comp, w in self.strengths.items()}
        object.__setattr__(self, "strengths", st)
        if self.form == "affine":
            refs = self.references or {}
            missing = [comp for comp in st if refs.get(comp) is None]
            if missing:
                raise ToolkitError(f"an affine edit needs reference levels for {missing[0]}")
            object.__setattr__(self, "references",
                               {comp: per_layer(refs[comp], f"reference levels of {comp}") for comp in st})

    @property
    def n_layers(self) -> int:
        """Number of layers the edit describes."""
        return int(self.directions.shape[0])

    def active(self) -> list[tuple[int, str]]:
        """``(layer, component)`` pairs with a non-zero strength, in layer order."""
        return [(l, c) for l in range(self.n_layers) for c, w in self.strengths.items() if float(w[l]) != 0.0]

    def terms(self, layer: int, component: str, weight: torch.Tensor, bias: torch.Tensor | None) -> dict:
        """The output map of one module, ``y' = s * (z - a (g . z)) + b'`` with ``z = y - b`` (float64).

        Args:
            weight: the module's ``[d_model, d_in]`` weight (any dtype; read in float64).
            bias: its ``[d_model]`` bias or None.

        Returns:
            ``{"s": [d_model] or None, "a": [d_model], "g": [d_model], "b": [d_model] or None}`` float64 (``b``: the
            edited bias, None when the module has none and the edit adds none).
        """
        r = self.directions[layer]
        w = float(self.strengths[component][layer])
        if self.form == "norm_preserving":
            W = weight.detach().to("cpu", torch.float64)
            rn = W.norm(dim=1)
            live = rn > 0
            g = torch.where(live, r / torch.where(live, rn, torch.ones_like(rn)), torch.zeros_like(r))
            u = W.T @ g  # r^T Wn  [d_in]
            wu = W @ u
            n2 = 1 - 2 * w * r * torch.where(live, wu / torch.where(live, rn, torch.ones_like(rn)), torch.zeros_like(r)) \
                + (w * r) ** 2 * (u @ u)
            if bool((n2[live] <= 0).any()):
                raise ToolkitError(f"norm-preserving edit at layer {layer} ({component}) zeroes a weight row")
            s = torch.where(live, n2.clamp(min=1e-300).rsqrt(), torch.ones_like(rn))
            a = w * r * rn
        else:
            s, a, g = None, w * r, r
        b = None
        if bias is not None:
            b0 = bias.detach().to("cpu", torch.float64)
            b = b0 - w * r * (r @ b0)
        if self.form == "affine":
            c = float(self.references[component][layer])
            if w * c != 0.0:
                b = (b if b is not None else torch.zeros_like(r)) + w * c * r
        return {"s": s, "a": a, "g": g, "b": b}

    def describe(self) -> dict:
        """JSON-ready summary: form, layers touched per component, strength range, and ``meta``."""
        out = {"form": self.form, "n_layers": self.n_layers, "meta": dict(self.meta)}
        for c, w in self.strengths.items():
            on = [l for l in range(self.n_layers) if float(w[l]) != 0.0]
            out[c] = {"layers": on, "max": float(w.max()) if len(w) else 0.0, "min": float(w.min()) if len(w) else 0.0}
        return out


def _module(model: nn.Module, layer: int, component: str) -> nn.Linear:
    return writer_module(decoder_layers(model)[layer], COMPONENTS[component])


def _check_fits(model: nn.Module, edit: WeightEdit) -> None:
    n = len(decoder_layers(model))
    d = model.config.get_text_config().hidden_size
    if edit.n_layers != n or edit.directions.shape[1] != d:
        raise ToolkitError(f"the edit describes {edit.n_layers} layers of width {edit.directions.shape[1]}; the model "
                           f"has {n} layers of width {d}")


@contextlib.contextmanager
def edit_hooks(model: nn.Module, edit: WeightEdit) -> Iterator[None]:
    """Apply ``edit`` as forward hooks on the edited ``o_proj``/``down_proj`` outputs, at every position of every pass
    while the context is open; exactly the map :func:`apply_weight_edit` writes into the weights (computed in float32
    or wider, returned in the activation's dtype). Nothing is copied: a trial of a search costs its hooks only.

    Raises:
        ToolkitError: the edit does not fit the model (layers, width), or a module that is not a linear map.
    """
    _check_fits(model, edit)
    specs = []
    for layer, comp in edit.active():
        mod = _module(model, layer, comp)
        t = edit.terms(layer, comp, mod.weight, mod.bias)
        b0 = None if mod.bias is None else mod.bias.detach().float()
        cast = {k: (None if v is None else v.float()) for k, v in t.items()}

        def fn(y, ctx, t=cast, b0=b0):
            work = torch.promote_types(y.dtype, torch.float32)
            z = y.to(work)
            if b0 is not None:
                z = z - b0.to(z.device, work)
            a, g = t["a"].to(z.device, work), t["g"].to(z.device, work)
            z = z - (z @ g).unsqueeze(-1) * a
            if t["s"] is not None:
                z = z * t["s"].to(z.device, work)
            if t["b"] is not None:
                z = z + t["b"].to(z.device, work)
            return z.to(y.dtype)

        specs.append((COMPONENTS[comp], layer, fn))
    with hooked(model, specs, reach=Reach(every=True)):
        yield


@torch.no_grad()
def apply_weight_edit(model: nn.Module, edit: WeightEdit) -> dict:
    """Write ``edit`` into the model's ``o_proj``/``down_proj`` weights and biases, in place (float64 arithmetic, stored
    in the parameters' dtype): ``W' = diag(s) (W - a g^T W)``, ``b'`` as in :meth:`WeightEdit.terms`. An affine edit of a
    module without a bias adds a bias parameter (so it is exact in memory; a checkpoint of an architecture whose
    modules have no bias cannot hold it, see :func:`toolkit.checkpoints.export_weight_edit`).

    Returns:
        ``{"edited": [module names], "added_bias": [module names]}``.

    Raises:
        ToolkitError: the edit does not fit the model.
    """
    _check_fits(model, edit)
    edited, added = [], []
    for layer, comp in edit.active():
        mod = _module(model, layer, comp)
        t = edit.terms(layer, comp, mod.weight, mod.bias)
        W = mod.weight.data
        Wd = W.to(torch.float64)
        Wn = Wd - torch.outer(t["a"].to(W.device), t["g"].to(W.device) @ Wd)
        if t["s"] is not None:
            Wn = Wn * t["s"].to(W.device).unsqueeze(1)
        W.copy_(Wn.to(W.dtype))
        name = f"layers.{layer}.{'self_attn' if comp == 'attn' else 'mlp'}.{COMPONENTS[comp]}"
        edited.append(name)
        if t["b"] is not None:
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(W.shape[0], dtype=W.dtype, device=W.device), requires_grad=False)
                added.append(name)
            mod.bias.data.copy_(t["b"].to(mod.bias.dtype))
    return {"edited": edited, "added_bias": added}


def affine_ablate(x: torch.Tensor, r_hat: torch.Tensor, mean: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Affine (mean-projection) ablation of residual-stream activations (Marshall et al. 2024):
    ``x <- x - w ((x - mu) . r_hat) r_hat``, computed in float32 or wider and returned in ``x``'s dtype. With ``w = 1``
    every activation's component along ``r_hat`` becomes the reference mean's.

    Args:
        x: ``[..., d_model]``.
        r_hat: ``[d_model]`` (normalised here).
        mean: ``[d_model]`` reference mean (e.g. the harmless mean).
        weight: strength ``w``.

    Raises:
        ToolkitError: zero or non-finite direction.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    r = unit_rows(r_hat).to(x.device, work)
    xf = x.to(work)
    return (xf - weight * ((xf - mean.to(x.device, work)) @ r).unsqueeze(-1) * r).to(x.dtype)
