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
* ``o_proj`` / ``down_proj`` -- the outputs of the two linear maps that write into the residual stream (attention's
  output projection and the MLP's down projection), before any norm that follows them (Gemma 2/3); forward hooks on
  those modules. Not in :data:`SITES`: they are :data:`WRITER_SITES`, where a hook is exactly equivalent to an edit
  of that module's weight and bias (:mod:`toolkit.abliteration`).

Supported: any decoder whose blocks expose ``self_attn`` and ``mlp`` with Llama-style norms, which covers
Qwen2/Qwen2.5/Qwen3, Llama 2/3, Mistral and Gemma 1/2/3 (text). All tensors except ``z`` are
``[batch, pos, d_model]``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ToolkitError

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HEAD_SITE = "z"
WRITER_SITES = ("o_proj", "down_proj")

HookFn = Callable[[torch.Tensor, "HookContext"], "torch.Tensor | None"]


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


def writer_module(block: nn.Module, site: str) -> nn.Linear:
    """The linear map of a block that writes into the residual stream: ``site`` ``"o_proj"`` (attention output
    projection, ``weight: [d_model, n_heads * head_dim]``) or ``"down_proj"`` (MLP down projection, ``weight:
    [d_model, d_mlp]``).

    Raises:
        ToolkitError: unknown site, or a block without that module.
    """
    if site not in WRITER_SITES:
        raise ToolkitError(f"unknown writer site {site!r}; choose one of {', '.join(WRITER_SITES)}")
    mod = getattr(block.self_attn if site == "o_proj" else block.mlp, site, None)
    if not isinstance(mod, nn.Linear):
        raise ToolkitError(f"this architecture has no linear {site} in its decoder blocks")
    return mod


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

    ``fn(x, ctx)`` receives the activation ``x`` ``[batch, pos, d_model]`` (``z``: ``[batch, pos, n_heads *
    head_dim]``) and a :class:`HookContext` (site, layer and the state of the pass now running, handed over
    explicitly as TransformerLens hands ``hook=`` to its hook functions), and returns a replacement tensor or
    ``None``. With ``write=True`` a ``resid_mid`` hook is placed on ``attn_out`` (see module docstring) so that
    its change propagates; reading ``resid_mid`` uses the pre-MLP norm's input.

    Raises:
        ToolkitError: unknown site or layer out of range.
    """
    if site not in SITES and site != HEAD_SITE and site not in WRITER_SITES:
        raise ToolkitError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}")
    layer = check_layer(model, layer)
    block = decoder_layers(model)[layer]

    def call(x: torch.Tensor):
        return fn(x, HookContext(site, layer, current_pass()))

    if site == HEAD_SITE:
        def z_hook(mod, args):
            new = call(args[0])
            return None if new is None else (new,) + tuple(args[1:])

        return block.self_attn.o_proj.register_forward_pre_hook(z_hook)

    if site == "resid_pre" or (site == "resid_mid" and not write):
        module = block if site == "resid_pre" else pre_mlp_norm(block)

        def pre_hook(mod, args, kwargs):
            if args:
                new = call(args[0])
                if new is not None:
                    return (new,) + tuple(args[1:]), kwargs
            else:
                new = call(kwargs["hidden_states"])
                if new is not None:
                    kwargs = dict(kwargs, hidden_states=new)
                    return args, kwargs
            return None

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    if site in WRITER_SITES:
        module = writer_module(block, site)
    else:
        module = {"resid_post": block, "attn_out": attn_out_module(block), "mlp_out": mlp_out_module(block),
                  "resid_mid": attn_out_module(block)}[site]

    def fwd_hook(mod, args, out):
        new = call(_first(out))
        if new is not None:
            return _replace_first(out, new)
        return None

    return module.register_forward_hook(fwd_hook)


# ----------------------------------------------------------------------------------------------- pass state


@dataclass
class PassState:
    """What the forward pass now running computes; owned by the :class:`toolkit.runner.Runner` that runs it and
    handed to every hook (:attr:`HookContext.state`).

    Attributes:
        phase: ``"prefix"``: the template prefix shared by every prompt (computed once, then cached);
            ``"prompt"``: the rest of the prompt, which holds every addressed position; ``"generate"``: decode
            steps; ``"continuation"``: prompt plus a given continuation (:meth:`Runner.continuation_logprob`),
            where positions counted from the end are not the prompt's. Interventions and captures addressed to
            prompt positions act only in ``"prompt"``; those at every position act in every phase. Outside a
            Runner the phase is ``"prompt"``.
        rows: caller-order indices ``[batch]`` (long, CPU) of the prompts in the batch now running: row ``r`` of
            an activation is prompt ``rows[r]`` (batches are sorted by length, so not in caller order); None
            outside a Runner's batches.
        min_len: the shortest real (unpadded) length in the batch now running, so that position-addressed hooks
            can refuse positions that would land on left padding; None outside a Runner's batches.
    """

    phase: str = "prompt"
    rows: torch.Tensor | None = None
    min_len: int | None = None


@dataclass(frozen=True)
class HookContext:
    """Handed to every hook function with its activation: where it fires and the pass it fires in.

    Attributes:
        site: hook site name (:data:`SITES` or ``"z"``).
        layer: block index (non-negative).
        state: the :class:`PassState` of the pass now running.
    """

    site: str
    layer: int
    state: PassState

    @property
    def in_prompt(self) -> bool:
        """True in the prompt phase, the only one in which prompt positions (negative indices) are addressed."""
        return self.state.phase == "prompt"

    def check_span(self, x: torch.Tensor, depth: int) -> None:
        """Refuse a position ``-depth`` that lies beyond the shortest real prompt of the batch (it would land on
        left padding).

        Args:
            x: the activation ``[batch, pos, width]``.
            depth: how many trailing positions are addressed.

        Raises:
            ToolkitError: position beyond the shortest prompt.
        """
        n = x.shape[1] if self.state.min_len is None else min(self.state.min_len, x.shape[1])
        if n < depth:
            raise ToolkitError(f"position {-depth} is beyond a prompt of {n} tokens")


# The runner's pass state and the hooks registered through :func:`hooked`, as context variables: each thread
# (and each asyncio task) sees its own, nothing is shared between threads, and every value is replaced, never
# mutated in place, by the context manager that owns it.
_PASS: contextvars.ContextVar[PassState | None] = contextvars.ContextVar("refusal_toolkit_pass", default=None)
_ACTIVE: contextvars.ContextVar[tuple] = contextvars.ContextVar("refusal_toolkit_hooks", default=())


def current_pass() -> PassState:
    """The :class:`PassState` of the Runner pass now running, or a fresh prompt-phase state outside one."""
    return _PASS.get() or PassState()


@contextlib.contextmanager
def running(state: PassState) -> Iterator[PassState]:
    """Make ``state`` the pass state every hook receives while the block runs (used by the Runner)."""
    token = _PASS.set(state)
    try:
        yield state
    finally:
        _PASS.reset(token)


@dataclass(frozen=True)
class Reach:
    """Which positions a group of hooks addresses, declared to :func:`hooked` so that a Runner can serve it.

    Attributes:
        depth: the hooks address the last ``depth`` prompt positions (negative indices ``-depth..-1``) in the
            prompt phase; the Runner keeps that many tokens of every prompt out of the shared prefix.
        every: the hooks write at every position of every pass (directional ablation, activation addition
            without positions); a context cache (computed without interventions) cannot serve them.
        read: the hooks only read activations (captures); they change nothing, so a cache of the unmodified
            model still describes a pass that runs them.
    """

    depth: int = 0
    every: bool = False
    read: bool = False


@dataclass(frozen=True)
class _Registration:
    model: int  # id() of the model the hooks sit on
    layers: tuple[int, ...]
    reach: Reach


@dataclass(frozen=True)
class ActiveHooks:
    """What the hooks registered on one model through :func:`hooked` (now, in this context) address.

    Attributes:
        layers: sorted block indices of every registered hook, reads included.
        depth: the deepest prompt position addressed (0 if none).
        every: whether any registered hook writes at every position.
        writes: whether any registered group of hooks is not declared read-only (``Reach.read``).
    """

    layers: tuple[int, ...] = ()
    depth: int = 0
    every: bool = False
    writes: bool = False


def active_hooks(model: nn.Module) -> ActiveHooks:
    """The :class:`ActiveHooks` of ``model`` in the current context."""
    regs = [r for r in _ACTIVE.get() if r.model == id(model)]
    return ActiveHooks(tuple(sorted(l for r in regs for l in r.layers)), max((r.reach.depth for r in regs), default=0),
                       any(r.reach.every for r in regs), any(not r.reach.read for r in regs))


@contextlib.contextmanager
def hooked(model: nn.Module, specs: list[tuple], *, write: bool = True, reach: Reach = Reach()) -> Iterator[None]:
    """Context manager: register ``(site, layer, fn)`` or ``(site, layer, fn, write)`` hooks (the fourth item
    overrides ``write`` for that hook; ``fn(x, ctx)`` as in :func:`add_hook`) and always remove them on exit (even
    on error). While open, the hooks' layers and ``reach`` are visible through :func:`active_hooks`, so that a
    Runner keeps addressed positions out of the shared prefix and a cached context refuses hooks it would skip.

    Raises:
        ToolkitError: unknown site or layer out of range (nothing is left registered).
    """
    handles, layers = [], []
    reg = None
    try:
        for site, layer, fn, *own in specs:
            handles.append(add_hook(model, site, layer, fn, write=own[0] if own else write))
            layers.append(layer % len(decoder_layers(model)))  # add_hook checked it
        reg = _Registration(id(model), tuple(layers), reach)
        _ACTIVE.set(_ACTIVE.get() + (reg,))
        yield
    finally:
        for h in handles:
            h.remove()
        if reg is not None:
            _ACTIVE.set(tuple(r for r in _ACTIVE.get() if r is not reg))


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed activation is read."""
