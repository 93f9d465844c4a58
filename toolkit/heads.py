"""Head-level directional ablation: remove a refusal direction from chosen attention heads' outputs only.

Method. Attention's output projection mixes the query heads: ``o_proj(z) = sum_h W_O^h z_h + b`` with ``z`` the
input of ``o_proj`` (``[batch, pos, n_heads * head_dim]``, hook site ``z`` of :mod:`toolkit.hooks`), ``z_h`` its
slice :meth:`toolkit.patching.HeadLayout.head_slice` and ``W_O^h = W_O[:, h * head_dim:(h + 1) * head_dim]``
(``[d_model, head_dim]``). Ablating the unit direction ``r`` from the heads ``H`` of a layer replaces the
projection's output by::

    o_proj(z)' = o_proj(z) - r r^T sum_{h in H} W_O^h z_h        (the bias is untouched)

so that every chosen head writes nothing along ``r`` and every other head, the bias and every other layer are left
as they are. :func:`head_ablation` does it with hooks; :func:`orthogonalize_heads` does the same as a weight edit,
``W_O^h <- (I - r r^T) W_O^h`` on the chosen column slices of ``o_proj.weight``. Both act on the output of
``o_proj``, before the norm that follows it on Gemma 2/3, so the two forms are equal on every architecture.

This restricts the directional ablation / weight orthogonalization of Arditi et al. 2024 ("Refusal in Language
Models Is Mediated by a Single Direction") to chosen heads (this project's seed proposal 6: which heads write the
refusal direction). Heads are query heads (``num_attention_heads``; with grouped-query attention several query
heads share one key/value head, :class:`~toolkit.patching.HeadLayout`). Heads can be chosen by hand
(:func:`parse_heads`) or taken from the per-head results of a ``refusal patch`` run (:func:`heads_from_patch`).

Selection syntax (:func:`parse_heads`): comma-separated ``LAYER.HEAD`` items; each part is an index (negative counts
from the end, as layers elsewhere in the toolkit), a half-open range ``a:b`` (as :mod:`toolkit.index_spec`) or
``*`` (all), e.g. ``"12.3,12.7,14.*"`` or ``"10:12.0:2"`` (heads 0 and 1 of layers 10 and 11).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .directions import Direction
from .errors import ToolkitError
from .hooks import Reach, decoder_layers, hooked
from .interventions import _check_direction
from .patching import HeadLayout, head_layout

PARAM = "heads"


# ------------------------------------------------------------------------------------------------ selection
@dataclass(frozen=True)
class HeadSelection:
    """A set of attention (query) heads, with where it came from; recorded in ``run.json`` by :meth:`describe`.

    Attributes:
        heads: ``(layer, head)`` pairs, non-negative, sorted, distinct.
        source: ``"list"`` (written by hand, :func:`parse_heads`) or ``"patch"`` (:func:`heads_from_patch`).
        spec: the text parsed (``"list"``), or None.
        run: the patch run folder (``"patch"``), or None.
        top_k: how many heads were taken from the patch run (``"patch"``), or None.
        patch_direction: the patching direction whose effects ranked the heads (``"noise"``/``"denoise"``), or None.
        effects: the ranked heads' effects, in the order of ``ranked`` (``"patch"``), else ``()``.
        ranked: the heads from the patch run in rank order (best first), else ``()``.
        model_hash: the hash of the model the patch run used (None if not recorded or hand-written).
    """

    heads: tuple[tuple[int, int], ...]
    source: str = "list"
    spec: str | None = None
    run: str | None = None
    top_k: int | None = None
    patch_direction: str | None = None
    effects: tuple[float, ...] = ()
    ranked: tuple[tuple[int, int], ...] = ()
    model_hash: str | None = None

    @property
    def labels(self) -> list[str]:
        """``["12.3", "12.7", ...]`` in the order of :attr:`heads`."""
        return [f"{l}.{h}" for l, h in self.heads]

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers holding at least one chosen head, sorted."""
        return tuple(sorted({l for l, _ in self.heads}))

    def by_layer(self) -> dict[int, tuple[int, ...]]:
        """``{layer: (head, ...)}`` for the layers with chosen heads."""
        out: dict[int, list[int]] = {}
        for l, h in self.heads:
            out.setdefault(l, []).append(h)
        return {l: tuple(hs) for l, hs in out.items()}

    def check(self, n_layers: int, layout: HeadLayout) -> "HeadSelection":
        """Refuse heads this model does not have; returns ``self``.

        Raises:
            ToolkitError (``heads``, or ``heads_from`` for heads from a patch run): a layer ``>= n_layers`` or a
                head ``>= layout.n_heads``.
        """
        param = PARAM if self.source == "list" else "heads_from"
        for l, h in self.heads:
            if not 0 <= l < n_layers:
                raise ToolkitError(f"layer {l} is out of range: this model has {n_layers} layers (0..{n_layers - 1})",
                                   param=param)
            if not 0 <= h < layout.n_heads:
                raise ToolkitError(f"head {h} (layer {l}) is out of range: this model has {layout.n_heads} query "
                                   f"heads per layer (0..{layout.n_heads - 1})", param=param)
        return self

    def describe(self) -> dict:
        """A JSON-safe record for ``run.json``: the heads as ``"layer.head"`` labels and the source."""
        out = {"source": self.source, "heads": self.labels, "n_heads": len(self.heads), "layers": list(self.layers)}
        if self.source == "list":
            out["spec"] = self.spec
        else:
            out.update(run=self.run, top_k=self.top_k, patch_direction=self.patch_direction,
                       ranked=[{"head": f"{l}.{h}", "effect": e} for (l, h), e in zip(self.ranked, self.effects)],
                       model_hash=self.model_hash)
        return out


def _part(text: str, n: int, what: str, item: str) -> list[int]:
    """One side of ``LAYER.HEAD``: ``*``, an index or a half-open range ``a:b``, resolved against ``n``."""
    t = text.strip()
    if t == "*":
        return list(range(n))
    try:
        if ":" in t:
            a, b = t.split(":", 1)
            values = list(range(int(a), int(b)))
            if not values:
                raise ToolkitError(f"{what} range {t!r} in {item!r} names nothing (a:b is half-open: it needs a < b)",
                                   param=PARAM)
        else:
            values = [int(t)]
    except ValueError:
        raise ToolkitError(f"{what} {t!r} in {item!r} is not an index, a range a:b or *", param=PARAM) from None
    for v in values:
        if not -n <= v < n:
            raise ToolkitError(f"{what} {v} in {item!r} is out of range: this model has {n} "
                               f"{'layers' if what == 'layer' else 'query heads per layer'} (0..{n - 1})", param=PARAM)
    return [v % n for v in values]


def parse_heads(spec: str, n_layers: int, layout: HeadLayout) -> HeadSelection:
    """Parse a head selection such as ``"12.3,12.7,14.*"`` (module docstring for the syntax) and check it against the
    model.

    Args:
        spec: comma-separated ``LAYER.HEAD`` items; each side an index (negative from the end), ``a:b`` or ``*``.
        n_layers: the model's number of decoder blocks.
        layout: its head layout (:func:`toolkit.patching.head_layout`); heads are query heads.

    Returns:
        A ``"list"`` :class:`HeadSelection` (sorted, distinct).

    Raises:
        ToolkitError (``heads``): an item without exactly one ``.``, a side that is not an index, range or ``*``, an
            empty range, an index out of range, or no item at all.
    """
    items = [s.strip() for s in str(spec or "").split(",") if s.strip()]
    if not items:
        raise ToolkitError(f"{spec!r} names no head: write LAYER.HEAD items such as '12.3,14.*'", param=PARAM)
    heads = set()
    for item in items:
        parts = item.split(".")
        if len(parts) != 2:
            raise ToolkitError(f"{item!r} is not LAYER.HEAD (e.g. '12.3', '12.*', '10:12.0:2')", param=PARAM)
        for l in _part(parts[0], n_layers, "layer", item):
            for h in _part(parts[1], layout.n_heads, "head", item):
                heads.add((l, h))
    return HeadSelection(tuple(sorted(heads)), "list", spec=str(spec))


def heads_from_patch(run_folder: str | Path, top_k: int, direction: str | None = None) -> HeadSelection:
    """The ``top_k`` heads of a ``refusal patch`` run by their effect.

    Reads the run's ``summary.csv`` (one row per patching direction and component; head components have ``site``
    ``z`` and a ``head``; ``effect`` is the normalised effect for denoising and 1 - it for noising, so larger is
    more important in both, :mod:`toolkit.patching`). Heads are ranked by effect, highest first (ties: lower layer,
    then lower head); rows without an effect (NaN) are skipped.

    Args:
        run_folder: ``runs/patch/NAME``, its ``run.json``, or ``NAME``.
        top_k: how many heads to take (>= 1, at most the heads the run patched).
        direction: ``"noise"`` (heads whose corruption removes refusal: necessity, what ablation tests) or
            ``"denoise"`` (sufficiency) [default: ``noise`` if the run has it, else the run's only direction].

    Returns:
        A ``"patch"`` :class:`HeadSelection` (heads sorted; ``ranked``/``effects`` in rank order).

    Raises:
        ToolkitError: ``top_k`` < 1 (``top_k``); without ``param`` (the caller names its own option): not a
            finished patch run, a summary without head rows (a run made without heads), a direction the run does
            not have, or ``top_k`` above the heads the run ranks.
    """
    from .runs import load_run, read_run_table

    if top_k < 1:
        raise ToolkitError(f"must be >= 1, got {top_k}", param="top_k")
    folder, meta = load_run(run_folder, "patch")
    df = read_run_table(folder / "summary.csv", "patch summary")
    missing = [c for c in ("direction", "site", "layer", "head", "effect") if c not in df.columns]
    if missing:
        raise ToolkitError(f"{folder / 'summary.csv'}: not a patch summary (no column {missing[0]!r})")
    zs = df[(df.site == "z") & df["head"].notna()]
    if zs.empty:
        raise ToolkitError(f"patch run {folder} has no per-head results (it was run without heads)")
    present = sorted(set(zs.direction))
    if direction is None:
        direction = "noise" if "noise" in present else present[0]
    if direction not in present:
        raise ToolkitError(f"patch run {folder} has no {direction!r} head results (it has {', '.join(present)})")
    zs = zs[(zs.direction == direction) & zs.effect.notna()]
    rows = sorted(((float(e), int(l), int(h)) for e, l, h in zip(zs.effect, zs.layer, zs["head"])),
                  key=lambda t: (-t[0], t[1], t[2]))
    if top_k > len(rows):
        raise ToolkitError(f"patch run {folder} ranks only {len(rows)} head(s), fewer than the {top_k} asked for")
    ranked = rows[:top_k]
    return HeadSelection(tuple(sorted((l, h) for _, l, h in ranked)), "patch", run=str(folder), top_k=top_k,
                         patch_direction=direction, effects=tuple(e for e, _, _ in ranked),
                         ranked=tuple((l, h) for _, l, h in ranked), model_hash=(meta.get("model") or {}).get("hash"))


# ------------------------------------------------------------------------------------------------ maths
def _unit(model: nn.Module, direction: torch.Tensor | Direction) -> torch.Tensor:
    """``r_hat`` ``[d_model]`` float64 on the CPU, checked (width, non-zero, finite)."""
    r = _check_direction(model, direction).detach().to("cpu", torch.float64)
    return r / r.norm()


def _readouts(model: nn.Module, r: torch.Tensor, heads: HeadSelection) -> dict[int, torch.Tensor]:
    """``{layer: U}`` with ``U = W_O^T r_hat`` ``[n_heads * head_dim]`` (float64, CPU) on the chosen heads' columns and
    0 elsewhere, so that ``z @ U = r_hat^T sum_{h in H} W_O^h z_h``."""
    lay = head_layout(model)
    blocks = decoder_layers(model)
    heads.check(len(blocks), lay)
    out = {}
    for layer, hs in heads.by_layer().items():
        w = blocks[layer].self_attn.o_proj.weight.detach().to("cpu", torch.float64)  # [d_model, n_heads * head_dim]
        full = r @ w
        u = torch.zeros_like(full)
        for h in hs:
            s = lay.head_slice(h)
            u[s] = full[s]
        out[layer] = u
    return out


@contextlib.contextmanager
def head_ablation(model: nn.Module, direction: torch.Tensor | Direction, heads: HeadSelection) -> Iterator[None]:
    """Ablate ``direction`` from the chosen heads' contributions (module docstring), with hooks, at every position
    of every pass while the context is open (template prefix, prompt and generated tokens).

    At each layer with chosen heads, a hook on ``z`` (the input of ``o_proj``, ``[batch, pos, n_heads *
    head_dim]``) computes ``c = r_hat^T sum_{h in H} W_O^h z_h`` ``[batch, pos]`` and a hook on ``o_proj``'s output
    (``[batch, pos, d_model]``) subtracts ``c r_hat``. The read-outs ``W_O^T r_hat`` are computed once on entry in
    float64 (from the weights as they are then) and applied in float32 or wider, returned in the activation's dtype.
    The value ``c`` travels from one hook to the other in a holder owned by this context (one slot per layer,
    emptied when read). With no heads chosen nothing is hooked. Source: Arditi et al. 2024's directional ablation,
    restricted to heads (project seed proposal 6).

    Args:
        model: ``transformers`` causal LM (Llama-style blocks, :func:`toolkit.patching.head_layout`).
        direction: ``[d_model]`` or a :class:`toolkit.directions.Direction`, any norm (normalised here).
        heads: the heads (:func:`parse_heads`, :func:`heads_from_patch`).

    Raises:
        ToolkitError: direction of the wrong width, zero or not finite; a head or layer the model does not have;
            an architecture whose ``o_proj`` is not ``n_heads * head_dim`` wide.
    """
    r = _unit(model, direction)
    readouts = _readouts(model, r, heads)
    r32 = r.float()
    held: dict[int, torch.Tensor] = {}

    def read_z(z, ctx):
        work = torch.promote_types(z.dtype, torch.float32)
        held[ctx.layer] = z.to(work) @ readouts[ctx.layer].to(device=z.device, dtype=work)
        return None

    def write_out(x, ctx):
        c = held.pop(ctx.layer)
        work = torch.promote_types(x.dtype, torch.float32)
        rr = r32.to(device=x.device, dtype=work)
        return (x.to(work) - c.to(work).unsqueeze(-1) * rr).to(x.dtype)

    specs = [spec for l in readouts for spec in (("z", l, read_z), ("o_proj", l, write_out))]
    if not specs:
        yield
        return
    with hooked(model, specs, reach=Reach(every=True)):
        yield


@torch.no_grad()
def orthogonalize_heads(model: nn.Module, direction: torch.Tensor | Direction, heads: HeadSelection) -> dict:
    """Head-level weight orthogonalization: ``W_O^h <- (I - r_hat r_hat^T) W_O^h`` on the column slices
    ``h * head_dim:(h + 1) * head_dim`` of ``o_proj.weight`` (``[d_model, n_heads * head_dim]``) of each chosen head,
    in place; computed in float64, stored in the weight's dtype. Biases, embeddings, the LM head and unchosen heads
    are untouched. Equal to :func:`head_ablation` on every architecture (both act on ``o_proj``'s output, before any
    norm that follows it). Source: Arditi et al. 2024's weight orthogonalization, restricted to heads.

    Returns:
        ``{"edited": [parameter names], "heads": ["layer.head", ...], "untied_lm_head": False,
        "exact_equivalent": True}`` (the last two as :func:`toolkit.interventions.orthogonalize_weights` reports).

    Raises:
        ToolkitError: as :func:`head_ablation`.
    """
    r = _unit(model, direction)
    lay = head_layout(model)
    blocks = decoder_layers(model)
    heads.check(len(blocks), lay)
    edited = []
    for layer, hs in heads.by_layer().items():
        w = blocks[layer].self_attn.o_proj.weight.data
        rr = r.to(w.device)
        for h in hs:
            s = lay.head_slice(h)
            wd = w[:, s].double()
            w[:, s] = (wd - torch.outer(rr, rr @ wd)).to(w.dtype)
        edited.append(f"layers.{layer}.self_attn.o_proj.weight")
    return {"edited": edited, "heads": heads.labels, "untied_lm_head": False, "exact_equivalent": True}


def head_projection(model: nn.Module, layer: int, z: torch.Tensor, direction: torch.Tensor | Direction
                    ) -> torch.Tensor:
    """Each query head's contribution to ``o_proj``'s output projected on ``r_hat``: ``r_hat^T W_O^h z_h``.

    Args:
        layer: block index.
        z: ``[..., n_heads * head_dim]``, the input of ``o_proj`` (hook site ``z``).
        direction: ``[d_model]`` or a :class:`~toolkit.directions.Direction`, any norm.

    Returns:
        ``[..., n_heads]`` float32 or wider (float64 maths is not needed: a diagnostic).

    Raises:
        ToolkitError: as :func:`toolkit.patching.head_outputs`, or a bad direction.
    """
    from .patching import head_outputs

    r = _unit(model, direction)
    out = head_outputs(model, layer, z)
    return out @ r.to(device=out.device, dtype=out.dtype)


__all__ = ["HeadSelection", "parse_heads", "heads_from_patch", "head_ablation", "orthogonalize_heads",
           "head_projection"]
