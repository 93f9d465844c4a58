"""Interventions on the residual stream: directional ablation, activation addition, weight orthogonalization.

All hook-based interventions are context managers that remove their hooks on exit, errors included.
Methods follow Arditi et al. 2024 ("Refusal in Language Models Is Mediated by a Single Direction").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .directions import Direction
from .errors import ToolkitError
from .hooks import Reach, decoder_layers, embedding, has_post_norms, hooked


def project_out(x: torch.Tensor, r_hat: torch.Tensor) -> torch.Tensor:
    """``x - (x . r_hat) r_hat`` along the last axis, computed in float32 (or wider), returned in x's dtype.

    Args:
        x: ``[..., d_model]``.
        r_hat: unit direction ``[d_model]``.
    """
    work = torch.promote_types(x.dtype, torch.float32)
    r = r_hat.to(device=x.device, dtype=work)
    xf = x.to(work)
    return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)


def _check_direction(model: nn.Module, direction: torch.Tensor | Direction) -> torch.Tensor:
    """The vector of a direction (a :class:`toolkit.directions.Direction` or a tensor), checked against the model's
    width, non-zero and finite."""
    if isinstance(direction, Direction):
        direction = direction.vector
    d = model.config.get_text_config().hidden_size
    if direction.ndim != 1 or direction.shape[0] != d:
        raise ToolkitError(f"direction has shape {tuple(direction.shape)}, but the model's d_model is {d}")
    n = direction.double().norm()
    if not torch.isfinite(n) or n == 0:
        raise ToolkitError("direction is zero or not finite")
    return direction


@contextlib.contextmanager
def directional_ablation(model: nn.Module, direction: torch.Tensor | Direction, layers: Sequence[int] | None = None
                         ) -> Iterator[None]:
    """Ablate ``direction`` from the residual stream: ``x <- x - (x . r_hat) r_hat``.

    Applied (Arditi et al. 2024) at every block input (``resid_pre``), attention output (``attn_out``) and MLP
    output (``mlp_out``) of the chosen layers (default all), at every position, in every forward pass
    while the context is open: template prefix, prompt and generated tokens.

    Args:
        model: ``transformers`` causal LM.
        direction: ``[d_model]`` or a :class:`toolkit.directions.Direction`, any norm (normalised here).
        layers: block indices, default all.

    Raises:
        ToolkitError: direction of the wrong width, zero, or not finite; layer out of range.
    """
    r_hat = _check_direction(model, direction).double()
    r_hat = (r_hat / r_hat.norm()).float()

    def fn(x, ctx):
        return project_out(x, r_hat)

    with _everywhere(model, fn, layers):
        yield


@contextlib.contextmanager
def _everywhere(model: nn.Module, fn, layers: Sequence[int] | None) -> Iterator[None]:
    """Apply ``fn(x, ctx)`` at ``resid_pre``, ``attn_out`` and ``mlp_out`` of ``layers`` (default all), every
    position of every pass."""
    n = len(decoder_layers(model))
    layers = list(range(n)) if layers is None else list(layers)
    specs = [(site, l, fn) for l in layers for site in ("resid_pre", "attn_out", "mlp_out")]
    with hooked(model, specs, reach=Reach(every=True)):
        yield


def orthonormal_basis(vectors: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """An orthonormal basis ``[k', d]`` (float64, Gram-Schmidt order: the first row is ``vectors[0]`` normalised)
    of the span of the rows of ``vectors`` ``[k, d]``, from a QR decomposition; rows that add less than ``tol``
    (relative) to the span are dropped, so ``k' <= k``.

    Raises:
        ToolkitError: not a ``[k, d]`` matrix, non-finite, or all zero.
    """
    v = vectors.detach().to("cpu", torch.float64)
    if v.ndim != 2 or v.shape[0] == 0 or not torch.isfinite(v).all():
        raise ToolkitError(f"a subspace needs a finite [k, d] matrix, got shape {tuple(v.shape)}")
    q, r = torch.linalg.qr(v.T)  # v.T = q r; columns of q span the rows of v in order
    diag = r.diagonal().abs()
    if float(diag.max()) == 0.0:
        raise ToolkitError("cannot build a subspace from zero vectors")
    keep = diag > tol * diag.max()
    q = q[:, keep] * torch.sign(r.diagonal()[keep])  # sign so the first row points like vectors[0]
    return q.T.contiguous()


@contextlib.contextmanager
def subspace_ablation(model: nn.Module, vectors: torch.Tensor, layers: Sequence[int] | None = None
                      ) -> Iterator[None]:
    """Ablate the span of several directions: ``x <- x - Q^T Q x`` with ``Q`` an orthonormal basis of the rows of
    ``vectors`` (:func:`orthonormal_basis`), at the same sites, layers and positions as
    :func:`directional_ablation` (which it equals for one direction). Used to test whether several refusal
    directions (e.g. per-category concept-cone directions) matter beyond one.

    Args:
        vectors: ``[k, d_model]``, any norms; need not be orthogonal.
        layers: block indices, default all.

    Raises:
        ToolkitError: wrong width, zero or non-finite vectors, layer out of range.
    """
    d = model.config.get_text_config().hidden_size
    if vectors.ndim != 2 or vectors.shape[1] != d:
        raise ToolkitError(f"vectors have shape {tuple(vectors.shape)}, but the model's d_model is {d}")
    q = orthonormal_basis(vectors).float()

    def fn(x, ctx):
        work = torch.promote_types(x.dtype, torch.float32)
        qq = q.to(device=x.device, dtype=work)
        xf = x.to(work)
        return (xf - (xf @ qq.T) @ qq).to(x.dtype)

    with _everywhere(model, fn, layers):
        yield


def addition_args(model: nn.Module, vector: torch.Tensor | Direction, layers: Sequence[int] | None,
                  positions: Sequence[int] | None, site: str | None, what: str
                  ) -> tuple[list[int], str, torch.Tensor, torch.Tensor | None, int]:
    """The resolved arguments of an activation addition (:func:`activation_addition` and CAST's
    :func:`toolkit.cast.conditional_addition`): ``(layers, site, vector [d_model] float32, positions [k] or None,
    depth)``; ``layers`` and ``site`` default to a :class:`Direction`'s own (``site`` else ``resid_pre``), ``depth`` is
    how far from the end of the prompt the positions reach (0 for every position).

    Raises:
        ToolkitError: vector of the wrong width, positions that are empty or not negative, no layers given for a
            tensor or a direction that records none (``what`` names the intervention in that message).
    """
    own = vector if isinstance(vector, Direction) else None
    if layers is None:
        if own is None or own.layer is None:
            raise ToolkitError(f"{what} needs layers (the direction records none)", param="layers")
        layers = [own.layer]
    site = site or (own.site if own is not None and own.site else "resid_pre")
    v = _check_direction(model, vector).float()
    if positions is not None:
        positions = list(positions)
        if not positions or any(p >= 0 for p in positions):
            raise ToolkitError("positions must be negative indices from the end of the prompt, e.g. -1")
    pos_t = torch.tensor(positions) if positions is not None else None
    depth = -min(positions) if positions is not None else 0
    return list(layers), site, v, pos_t, depth


@contextlib.contextmanager
def activation_addition(model: nn.Module, vector: torch.Tensor | Direction, layers: Sequence[int] | None = None, *,
                        alpha: float = 1.0, positions: Sequence[int] | None = None, site: str | None = None
                        ) -> Iterator[None]:
    """Activation addition: ``x <- x + alpha * vector`` at ``site`` of each layer in ``layers``.

    ``vector`` is used as given (Arditi et al. add the raw, unnormalised difference-in-means with
    ``alpha = 1`` for *induce*, and subtract it with ``alpha = -1``). With ``positions=None`` the vector is added
    at every position in every pass (prefix, prompt, generated tokens); with negative indices it is added at
    those prompt positions only, in the prompt pass. ``site="resid_mid"`` adds to ``attn_out`` (same effect).

    Args:
        vector: ``[d_model]``, or a :class:`toolkit.directions.Direction`, whose recorded layer and site are then the
            defaults of ``layers`` and ``site``.
        layers: block indices [default: the direction's layer].
        alpha: coefficient.
        positions: negative indices from the end of the prompt, or None for all positions.
        site: hook site [default: the direction's site, else ``resid_pre``].

    Raises:
        ToolkitError: vector of the wrong width, bad positions, unknown site, layer out of range, no layers given
            for a tensor or a direction that records none.
    """
    layers, site, v, pos_t, depth = addition_args(model, vector, layers, positions, site, "activation addition")

    def fn(x, ctx):
        delta = (alpha * v).to(device=x.device, dtype=x.dtype)
        if pos_t is None:
            return x + delta
        if not ctx.in_prompt:
            return None
        ctx.check_span(x, depth)
        x = x.clone()
        x[:, pos_t.to(x.device)] += delta
        return x

    reach = Reach(every=True) if pos_t is None else Reach(depth=depth)
    with hooked(model, [(site, l, fn) for l in layers], reach=reach):
        yield


@torch.no_grad()
def orthogonalize_weights(model: nn.Module, direction: torch.Tensor | Direction) -> dict:
    """Weight orthogonalization (Arditi et al. 2024): remove ``r_hat`` from every matrix writing to the residual.

    ``W <- W - r_hat r_hat^T W`` for each attention output projection (``o_proj``) and MLP output projection
    (``down_proj``) (``weight: [d_model, d_in]``), the same on their biases, and on the token embedding
    (``weight: [vocab, d_model]``, rows edited: ``E <- E - (E r_hat) r_hat^T``). Computed in float64, stored in
    the weights' dtype. A tied LM head is untied first (given its own copy of the unedited embedding) so
    the unembedding is not silently changed; the config is updated (``tie_word_embeddings=False``).

    On models without norms after ``o_proj``/``down_proj`` this is equivalent to :func:`directional_ablation`
    at every layer; on Gemma 2/3 those norms make it only approximate (reported in the result).

    Returns:
        ``{"edited": [parameter names], "untied_lm_head": bool, "exact_equivalent": bool}``.

    Raises:
        ToolkitError: direction of the wrong width, zero or not finite.
    """
    r = _check_direction(model, direction).double()
    r = r / r.norm()
    edited = []
    untied = False
    emb = embedding(model)
    head = model.get_output_embeddings()
    if head is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=False)
        untied = True
        for cfg in {id(model.config): model.config, id(model.config.get_text_config()): model.config.get_text_config()}.values():
            cfg.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            with contextlib.suppress(Exception):
                model._tied_weights_keys = {} if isinstance(model._tied_weights_keys, dict) else []

    def edit_rows(w: torch.Tensor) -> None:  # [n, d_model]: rows are residual-stream vectors
        wd = w.double()
        rr = r.to(w.device)
        w.copy_((wd - (wd @ rr).unsqueeze(-1) * rr).to(w.dtype))

    def edit_out(w: torch.Tensor) -> None:  # [d_model, d_in]: columns are residual-stream vectors
        wd = w.double()
        rr = r.to(w.device)
        w.copy_((wd - torch.outer(rr, rr @ wd)).to(w.dtype))

    edit_rows(emb.weight.data)
    edited.append("embed_tokens.weight")
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in (("self_attn.o_proj", block.self_attn.o_proj), ("mlp.down_proj", block.mlp.down_proj)):
            edit_out(lin.weight.data)
            edited.append(f"layers.{i}.{name}.weight")
            if lin.bias is not None:
                b = lin.bias.data
                bd = b.double()
                b.copy_((bd - (bd @ r.to(b.device)) * r.to(b.device)).to(b.dtype))
                edited.append(f"layers.{i}.{name}.bias")
    return {"edited": edited, "untied_lm_head": untied, "exact_equivalent": not has_post_norms(model)}
