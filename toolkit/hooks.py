"""Hook sites named as in TransformerLens, mapped onto Hugging Face decoder modules.

Sites for block ``l`` (TransformerLens names ``blocks.{l}.hook_<site>``):

* ``resid_pre``  -- input of block ``l`` (the residual stream before it); forward pre-hook on the block.
* ``resid_mid``  -- residual stream after attention, before the MLP: ``resid_pre + attn_out``; read from the
  input of the pre-MLP norm. Writes go through ``attn_out`` (adding ``v`` to ``attn_out`` adds ``v`` to
  ``resid_mid`` and to everything downstream), so a write hook here is installed on ``attn_out``.
* ``attn_out``   -- what the attention sub-block adds to the residual stream: the attention module's output,
  or, for Gemma 2/3, the output of the norm that follows it (``post_attention_layernorm``).
* ``mlp_out``    -- what the MLP sub-block adds: the MLP output, or for Gemma 2/3 ``post_feedforward_layernorm``'s.
* ``resid_post`` -- output of block ``l`` (= ``resid_pre`` of block ``l + 1``).
* ``z``          -- the attention heads' outputs before they are mixed (TransformerLens ``blocks.{l}.attn.hook_z``):
  the input of ``o_proj``, ``[batch, pos, n_heads * head_dim]`` with query head ``h`` in the slice
  ``h * head_dim:(h + 1) * head_dim``; forward pre-hook on ``o_proj``. Not in :data:`SITES` (its width is not
  ``d_model``); used by per-head patching.

Supported: any decoder whose blocks expose ``self_attn`` and ``mlp`` with Llama-style norms, which covers
Qwen2/Qwen2.5/Qwen3, Llama 2/3, Mistral and Gemma 1/2/3 (text). All tensors except ``z`` are
``[batch, pos, d_model]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import ToolkitError

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITE = "z"

HookFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, as a ``ModuleList`` of length ``n_layers``.

    Raises:
        ToolkitError: the architecture has no recognisable block list.
    """
    candidates = []
    inner = getattr(model, "model", None)
    if inner is not None:
        candidates += [getattr(inner, "layers", None), getattr(getattr(inner, "language_model", None), "layers", None)]
    with contextlib.suppress(Exception):
        candidates.append(getattr(model.get_decoder(), "layers", None))
    for c in candidates:
        if isinstance(c, nn.ModuleList) and len(c) and hasattr(c[0], "self_attn") and hasattr(c[0], "mlp"):
            return c
    raise ToolkitError(
        f"unsupported architecture {type(model).__name__}: expected Llama-style decoder blocks with self_attn and mlp"
    )


def embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding module (writes the first residual stream), ``weight: [vocab, d_model]``."""
    return model.get_input_embeddings()


def _sandwich(block: nn.Module) -> bool:
    """True for Gemma 2/3 style blocks, where a norm follows attention and the MLP before the residual add."""
    return hasattr(block, "pre_feedforward_layernorm") and hasattr(block, "post_feedforward_layernorm")


def attn_out_module(block: nn.Module) -> nn.Module:
    """The module whose output is what attention adds to the residual stream."""
    return block.post_attention_layernorm if _sandwich(block) else block.self_attn


def mlp_out_module(block: nn.Module) -> nn.Module:
    """The module whose output is what the MLP adds to the residual stream."""
    return block.post_feedforward_layernorm if _sandwich(block) else block.mlp


def pre_mlp_norm(block: nn.Module) -> nn.Module:
    """The norm that reads ``resid_mid`` (its input is the residual stream between attention and MLP)."""
    return block.pre_feedforward_layernorm if _sandwich(block) else block.post_attention_layernorm


def has_post_norms(model: nn.Module) -> bool:
    """True if norms follow ``o_proj``/``down_proj`` (Gemma 2/3): weight orthogonalization is then inexact."""
    return _sandwich(decoder_layers(model)[0])


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index (negative counts from the end) and return it as non-negative.

    Raises:
        ToolkitError: out of range.
    """
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise ToolkitError(f"layer {layer} is out of range: this model has {n} layers (0..{n - 1})")
    return layer % n


def add_hook(model: nn.Module, site: str, layer: int, fn: HookFn, *, write: bool = False):
    """Register ``fn`` on ``blocks.{layer}.hook_{site}``; return the handle (call ``.remove()``).

    ``fn`` receives the activation ``[batch, pos, d_model]`` (``z``: ``[batch, pos, n_heads * head_dim]``) and
    returns a replacement tensor or ``None``. With ``write=True`` a ``resid_mid`` hook is placed on ``attn_out``
    (see module docstring) so that its change propagates; reading ``resid_mid`` uses the pre-MLP norm's input.

    Raises:
        ToolkitError: unknown site or layer out of range.
    """
    if site not in SITES and site != HEAD_SITE:
        raise ToolkitError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}")
    layer = check_layer(model, layer)
    block = decoder_layers(model)[layer]

    if site == HEAD_SITE:
        def z_hook(mod, args):
            new = fn(args[0])
            return None if new is None else (new,) + tuple(args[1:])

        return block.self_attn.o_proj.register_forward_pre_hook(z_hook)

    if site == "resid_pre" or (site == "resid_mid" and not write):
        module = block if site == "resid_pre" else pre_mlp_norm(block)

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                if new is not None:
                    return (new,) + tuple(args[1:]), kwargs
            else:
                new = fn(kwargs["hidden_states"])
                if new is not None:
                    kwargs = dict(kwargs, hidden_states=new)
                    return args, kwargs
            return None

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    module = {"resid_post": block, "attn_out": attn_out_module(block), "mlp_out": mlp_out_module(block),
              "resid_mid": attn_out_module(block)}[site]

    def fwd_hook(mod, args, out):
        new = fn(_first(out))
        if new is not None:
            return _replace_first(out, new)
        return None

    return module.register_forward_hook(fwd_hook)


@contextlib.contextmanager
def hooked(model: nn.Module, specs: list[tuple], *, write: bool = True) -> Iterator[None]:
    """Context manager: register ``(site, layer, fn)`` or ``(site, layer, fn, write)`` hooks (the fourth item
    overrides ``write`` for that hook) and always remove them on exit (even on error). Every hook's layer is
    listed in ``PHASE.layers`` while registered, so a cached context that skips early blocks can refuse hooks
    it would skip.

    Raises:
        ToolkitError: unknown site or layer out of range (nothing is left registered).
    """
    handles, layers = [], []
    try:
        for site, layer, fn, *own in specs:
            handles.append(add_hook(model, site, layer, fn, write=own[0] if own else write))
            layers.append(check_layer(model, layer))
            PHASE.layers.append(layers[-1])
        yield
    finally:
        for h in handles:
            h.remove()
        for l in layers:
            PHASE.layers.remove(l)


class _Phase:
    """Which part of a prompt the current forward pass computes (set by :class:`toolkit.runner.Runner`).

    ``"prefix"``: the template prefix shared by every prompt (computed once, then cached);
    ``"prompt"``: the rest of the prompt, which holds every addressed position; ``"generate"``: decode steps.
    Interventions addressed to prompt positions act only in the ``"prompt"`` phase; those at all
    positions act in every phase. Outside a Runner the phase is ``"prompt"``.

    ``min_len``: during a Runner's prompt pass, the shortest real (unpadded) length in the batch, so that
    position-addressed hooks can refuse positions that would land on left padding; None elsewhere.
    ``depths``: how deep (``-min(positions)``) each active position-addressed intervention reaches; the Runner
    keeps at least that many tokens of every prompt out of the shared prefix.
    ``unbounded``: how many active interventions write at every position (directional ablation, activation
    addition without positions); a Runner context cache (computed without interventions) cannot be reused then.
    ``layers``: the block index of every hook registered through :func:`hooked` (reads and writes), so that a
    pass that skips early blocks can refuse hooks it would skip.
    """

    value = "prompt"
    min_len: int | None = None
    depths: list = []
    unbounded: int = 0
    layers: list = []


PHASE = _Phase()
PHASE.depths = []
PHASE.layers = []


@contextlib.contextmanager
def unbounded_intervention() -> Iterator[None]:
    """Mark an intervention that writes at every position (see :attr:`_Phase.unbounded`) while the block runs."""
    PHASE.unbounded += 1
    try:
        yield
    finally:
        PHASE.unbounded -= 1


def required_depth() -> int:
    """Deepest prompt position addressed by an active intervention (0 if none)."""
    return max(PHASE.depths, default=0)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Set :data:`PHASE` for the duration of the block."""
    old, PHASE.value = PHASE.value, name
    try:
        yield
    finally:
        PHASE.value = old


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed activation is read."""
