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

:func:`fixed_edit` is the fixed recipe of ``refusal ablate --form``: one direction at every layer, strength 1 on both
writers, optionally activation-scaled by :func:`layer_separation` (the search's per-layer Cohen's d).
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


def layer_separation(harmful: torch.Tensor, harmless: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Per-layer separation of harmful from harmless prompts along a direction: Cohen's d of the projections,
    ``(mean_h - mean_b) / sqrt((var_h + var_b) / 2)`` (variances ``ddof=1``, 0 for a single prompt; the denominator
    floored at ``1e-6``), the activation-scaled strengths of the abliteration search (seed proposal 3; project).

    Args:
        harmful, harmless: ``[n_h, n_layers, d_model]`` and ``[n_b, n_layers, d_model]`` residuals (e.g.
            ``resid_pre`` at prompt position -1), any float dtype.
        directions: ``[n_layers, d_model]`` unit directions (one per layer; used as given, a zero row gives 0), or
            ``[d_model]`` (the same at every layer; normalised here).

    Returns:
        ``[n_layers]`` float64 (dimensionless; positive where harmful prompts project further along the direction).

    Raises:
        ToolkitError: shapes that disagree, no prompt on a side, or a zero/non-finite direction.
    """
    if harmful.ndim != 3 or harmless.ndim != 3 or harmful.shape[1:] != harmless.shape[1:]:
        raise ToolkitError(f"residuals must be [n, n_layers, d_model] on both sides, got {tuple(harmful.shape)} and "
                           f"{tuple(harmless.shape)}")
    if len(harmful) < 1 or len(harmless) < 1:
        raise ToolkitError("the separation needs at least one harmful and one harmless prompt")
    L, d = harmful.shape[1:]
    if directions.ndim == 2:  # used as given (the search leaves an all-zero row 0 at zero: separation 0 there)
        dirs = directions.detach().to("cpu", torch.float64)
    else:
        dirs = unit_rows(directions).expand(L, -1)
    if dirs.shape != (L, d):
        raise ToolkitError(f"directions {tuple(directions.shape)} do not fit residuals of {L} layers x width {d}")
    ph = torch.einsum("nld,ld->nl", harmful.double().cpu(), dirs)
    pb = torch.einsum("nld,ld->nl", harmless.double().cpu(), dirs)
    zero = torch.zeros(L, dtype=torch.float64)
    pooled = ((ph.var(0, unbiased=True) if len(ph) > 1 else zero)
              + (pb.var(0, unbiased=True) if len(pb) > 1 else zero)) / 2
    return (ph.mean(0) - pb.mean(0)) / pooled.clamp(min=1e-12).sqrt()


def separation_scale(separation: torch.Tensor) -> torch.Tensor:
    """Activation-scaled strength factors from a per-layer separation ``[n_layers]``: ``max(s, 0) / max_l max(s_l, 0)``
    (as :meth:`toolkit.optimize.SearchState.edit`), ``[n_layers]`` float64 in ``[0, 1]``.

    Raises:
        ToolkitError: non-finite values, or no layer with a positive separation (the edit would do nothing).
    """
    s = torch.as_tensor(separation, dtype=torch.float64).detach().cpu().reshape(-1)
    if not bool(torch.isfinite(s).all()):
        raise ToolkitError("the per-layer separation is not finite")
    s = s.clamp(min=0)
    if len(s) == 0 or float(s.max()) <= 0:
        raise ToolkitError("no layer separates harmful from harmless prompts along the direction (every "
                           "separation <= 0): an activation-scaled edit would change nothing")
    return s / s.max()


def fixed_edit(direction: torch.Tensor, n_layers: int, form: str = "projection", module_means: dict | None = None,
               separation: torch.Tensor | None = None) -> WeightEdit:
    """The fixed-recipe edit of ``refusal ablate --form``: one unit direction at every layer, strength 1 on both
    residual writers (``o_proj`` and ``down_proj``) of every layer, in ``form``; with ``separation`` the strengths
    of layer ``l`` are multiplied by :func:`separation_scale` (activation-scaled, as the abliteration search).

    Unlike directional ablation (:func:`toolkit.interventions.directional_ablation`, Arditi et al. 2024), which
    projects the direction out of the residual stream at every block's input and output (the embedding included),
    ``projection`` here removes it only from what the writers add: the embedding's component along ``r`` survives,
    so the two differ (Arditi et al.'s weight orthogonalization edits the embedding too).

    Args:
        direction: ``[d_model]`` any norm (normalised here; float64 in the edit).
        n_layers: the model's number of decoder layers.
        form: ``"projection"``, ``"norm_preserving"`` or ``"affine"`` (``-`` accepted for ``_``).
        module_means: for ``"affine"``: ``{"attn": [n_layers, d_model], "mlp": [n_layers, d_model]}`` mean writer
            outputs on harmless prompts (:func:`toolkit.optimize.module_means`); the reference level of each module
            is its mean projected on the direction, ``c = mean . r_hat`` (Marshall et al. 2024).
        separation: ``[n_layers]`` per-layer separation (:func:`layer_separation`), or None for strength 1.

    Returns:
        A :class:`WeightEdit` whose ``meta`` records ``recipe``, ``activation_scaled`` and ``scale``.

    Raises:
        ToolkitError: unknown form (param ``form``), ``n_layers < 1``, a zero/non-finite direction, affine without
            (or with misshapen) ``module_means`` (param ``module_means``), a separation of the wrong length or with
            no positive layer (param ``separation``).
    """
    form = str(form).replace("-", "_")
    if form not in FORMS:
        raise ToolkitError(f"unknown edit form {form!r}; choose one of {', '.join(FORMS)}", param="form")
    if n_layers < 1:
        raise ToolkitError(f"n_layers must be >= 1, got {n_layers}", param="n_layers")
    r = unit_rows(direction.reshape(-1))
    rows = r.expand(n_layers, -1).clone()
    scale = torch.ones(n_layers, dtype=torch.float64)
    if separation is not None:
        sep = torch.as_tensor(separation, dtype=torch.float64).reshape(-1)
        if sep.shape != (n_layers,):
            raise ToolkitError(f"separation must have {n_layers} values, got {tuple(sep.shape)}", param="separation")
        try:
            scale = separation_scale(sep)
        except ToolkitError as e:
            raise ToolkitError(e.message, param="separation") from None
    strengths = {c: scale.clone() for c in COMPONENTS}
    refs = None
    if form == "affine":
        if module_means is None:
            raise ToolkitError("an affine edit needs the writers' harmless mean outputs", param="module_means")
        refs = {}
        for c in COMPONENTS:
            m = module_means.get(c)
            if m is None or tuple(m.shape) != (n_layers, r.shape[0]):
                raise ToolkitError(f"module means of {c} must be [{n_layers}, {r.shape[0]}], got "
                                   f"{None if m is None else tuple(m.shape)}", param="module_means")
            refs[c] = m.detach().to("cpu", torch.float64) @ r
    meta = {"recipe": "fixed", "activation_scaled": separation is not None, "scale": scale.tolist()}
    return WeightEdit(rows, strengths, form, refs, meta=meta)


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
