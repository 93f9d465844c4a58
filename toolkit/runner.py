"""Batched, prefix-sharing forward passes over chat prompts: logits, activations, greedy generation.

Every prompt formatted with one chat template starts with the same tokens (system prompt, user-turn opener).
The :class:`Runner` computes that shared prefix once per call, under whatever hooks are active, keeps its
key/value cache, and runs only the remaining tokens of each prompt in left-padded batches sorted by length.
Causal attention makes this exact: the prefix's keys and values do not depend on what follows (tested against
plain forward passes and HF ``generate`` in ``tests/test_engine.py``). Measured on the default model here
(``scripts/bench.py``): last-position logits at 224 instead of 132 prompt tokens/s.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .batching import Batch, make_batches
from .errors import ToolkitError
from .hooks import (SITES, PassState, Reach, StopForward, active_hooks, check_layer, decoder_layers, hooked,
                    running)
from .models import LoadedModel
from .templates import ChatFormat


@dataclass
class Encoded:
    """Token ids of formatted prompts split into a shared prefix and per-prompt suffixes.

    Attributes:
        ids: full token ids per prompt (list of ``[pos]``).
        prefix_len: number of leading tokens shared by all prompts that are computed once.
    """

    ids: list[list[int]]
    prefix_len: int

    @property
    def prefix(self) -> list[int]:
        """The shared prefix ``[prefix_len]``."""
        return self.ids[0][: self.prefix_len] if self.ids else []

    @property
    def suffixes(self) -> list[list[int]]:
        """Per-prompt tokens after the prefix."""
        return [x[self.prefix_len :] for x in self.ids]

    @property
    def n_tokens(self) -> int:
        """Total prompt tokens (prefix counted once per prompt)."""
        return sum(len(x) for x in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ContextPart:
    """One batch of a :class:`Context`.

    Attributes:
        batch: the batch (its ``index`` maps rows to the caller's prompts).
        cache: key/value cache of everything before the trailing ``k`` tokens (a ``transformers`` cache).
        ids: trailing token ids ``[batch, k]`` long.
        positions: their position ids ``[batch, k]`` long.
        mask: attention mask over the cache and the trailing tokens ``[batch, prefix + pos]`` long.
        resid: ``resid_pre`` of block ``start_layer`` at the trailing tokens ``[batch, k, d_model]``, or None when
            the context starts at block 0.
    """

    batch: Batch
    cache: object
    ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    resid: torch.Tensor | None = None


@dataclass
class Context:
    """Key/value caches of every prompt except its last ``k`` tokens, computed once without interventions.

    Made by :meth:`Runner.context`; passed to :meth:`Runner.logits` so that repeated passes under interventions
    that act only on the last ``k`` prompt positions (activation addition at post-instruction positions, for
    instance) compute just those ``k`` tokens: everything before them is unchanged by such an intervention, so
    the result is exact (tested against full passes).

    With ``start_layer = L > 0`` the trailing tokens' residual stream at ``resid_pre`` of block ``L`` is kept
    too, and later passes run those tokens through blocks ``L..n_layers-1`` only (blocks before ``L`` are
    skipped; hooks on them are refused), which is exact when every intervention acts at block ``L`` or later.

    Attributes:
        enc: the encoded prompts it belongs to.
        k: number of trailing tokens per prompt left to compute.
        parts: one :class:`ContextPart` per batch.
        start_layer: first block computed for those tokens.
        tuple_out: whether the model's blocks return tuples (so skipped blocks can mimic them).
        head_once: whether the LM head applied to the decoder's final hidden states reproduces the model's logits
            (checked on the first batch); then later passes apply it once to all prompts instead of per batch.
    """

    enc: Encoded
    k: int
    parts: list[ContextPart]
    start_layer: int = 0
    tuple_out: bool = False
    head_once: bool = False

    def derive(self, parts: list[ContextPart], *, k: int | None = None, enc: Encoded | None = None,
               start_layer: int | None = None) -> Context:
        """A context of the same model and kind with other parts (and optionally another ``k``, encoding or start
        layer): used to crop a context to fewer trailing tokens or to stack prompts (activation patching)."""
        return dataclasses.replace(self, parts=parts, k=self.k if k is None else k,
                                   enc=self.enc if enc is None else enc,
                                   start_layer=self.start_layer if start_layer is None else start_layer)

    def check_serves(self, model, enc: Encoded | None = None) -> None:
        """Refuse to serve a pass that this context would compute wrongly.

        Args:
            model: the model whose active hooks (:func:`toolkit.hooks.active_hooks`) the pass runs under.
            enc: the prompts of the pass (must be the context's own), or None to skip that check.

        Raises:
            ToolkitError: other prompts; an active intervention at every position; one reaching deeper than ``k``;
                a hook on a block before ``start_layer``.
        """
        if enc is not None and enc is not self.enc:
            raise ToolkitError("the context cache was computed for other prompts")
        act = active_hooks(model)
        if act.every:
            raise ToolkitError("an intervention at every position cannot reuse a context cache")
        if act.depth > self.k:
            raise ToolkitError(f"an intervention reaches position {-act.depth}, beyond the context's last "
                               f"{self.k} tokens")
        if act.layers and act.layers[0] < self.start_layer:
            raise ToolkitError(f"a hook at layer {act.layers[0]} is before the context's start layer "
                               f"{self.start_layer}")


def shared_prefix_len(ids: Sequence[Sequence[int]], keep: int) -> int:
    """Length of the longest common token prefix, leaving at least ``keep`` tokens in every prompt."""
    if not ids:
        return 0
    limit = min(len(x) for x in ids) - keep
    p = 0
    first = ids[0]
    while p < limit and all(x[p] == first[p] for x in ids):
        p += 1
    return max(p, 0)


class Runner:
    """Runs a chat model over instructions: last-position logits, activations, greedy completions.

    Args:
        lm: a :class:`~toolkit.models.LoadedModel`.
        fmt: the chat format (template, system prompt, post-instruction positions).
        batch_size: prompts per forward pass (16 was fastest on two CPU cores for the default model).
        progress: show tqdm bars (token counts).
        share_prefix: compute the template prefix once per call (exact; off for debugging).
    """

    def __init__(self, lm: LoadedModel, fmt: ChatFormat, batch_size: int = 16, progress: bool = True,
                 share_prefix: bool = True):
        if batch_size < 1:
            raise ToolkitError(f"batch size must be >= 1, got {batch_size}")
        self.lm, self.model, self.fmt = lm, lm.model, fmt
        self.batch_size, self.progress, self.share_prefix = batch_size, progress, share_prefix
        self.pad_id = lm.tokenizer.pad_token_id

    # ----------------------------------------------------------------------------------------- encoding
    def encode(self, instructions: Sequence[str], keep: int | None = None) -> Encoded:
        """Format and tokenize instructions; choose the shared prefix leaving ``keep`` tokens per prompt.

        ``keep`` defaults to the post-instruction length + 1, so every post-instruction position is in the
        per-prompt part.

        Raises:
            ToolkitError: no instructions, or an instruction is empty.
        """
        if not instructions:
            raise ToolkitError("no prompts to run")
        if any(not str(s).strip() for s in instructions):
            raise ToolkitError("a prompt is empty")
        ids = self.fmt.encode(list(instructions))
        keep = max(keep or 0, self.fmt.n_post + 1)
        p = shared_prefix_len(ids, keep) if self._can_share(ids) else 0
        return Encoded(ids, p)

    def encode_continued(self, instructions: Sequence[str], continuation: str) -> Encoded:
        """Format and tokenize instructions, then append the same assistant-turn text to each (e.g. an answer
        opener for contrastive activation addition): ``[template(instruction)] + tokens(continuation)``, the
        continuation tokenized without special tokens. Position ``-1`` is then the continuation's last token.

        Raises:
            ToolkitError: no instructions, an empty instruction, or an empty continuation.
        """
        enc = self.encode(instructions)
        extra = self.lm.tokenizer(continuation, add_special_tokens=False).input_ids if continuation.strip() else []
        if not extra:
            raise ToolkitError("the continuation is empty", param="continuation")
        ids = [list(x) + list(extra) for x in enc.ids]
        keep = self.fmt.n_post + 1 + len(extra)
        return Encoded(ids, shared_prefix_len(ids, keep) if self._can_share(ids) else 0)

    def _can_share(self, ids: Sequence[Sequence[int]]) -> bool:
        """Prefix sharing puts left padding between the prefix and the rest; with sliding-window attention
        (Gemma 2/3, Mistral) that padding could push prefix tokens out of the window, so sharing is used only
        when the longest prompt plus 512 generated tokens stays inside the window."""
        if not self.share_prefix:
            return False
        cfg = self.model.config.get_text_config()
        types = getattr(cfg, "layer_types", None) or []
        window = getattr(cfg, "sliding_window", None)
        sliding = any("sliding" in str(t) for t in types) if types else \
            (window is not None and getattr(cfg, "use_sliding_window", True))
        return not sliding or (window is not None and max(map(len, ids)) + 512 < window)

    def _ensure_depth(self, enc: Encoded, depth: int) -> Encoded:
        if all(len(s) >= depth for s in enc.suffixes):
            return enc
        p = shared_prefix_len(enc.ids, depth) if enc.prefix_len else 0
        if any(len(x) < depth for x in enc.ids):
            raise ToolkitError(f"position {-depth} is beyond the shortest prompt ({min(map(len, enc.ids))} tokens)")
        return Encoded(enc.ids, p)

    # ---------------------------------------------------------------------------------------- internals
    def _prefix_cache(self, enc: Encoded, state: PassState):
        """Compute the shared prefix's KV cache (batch 1) under the active hooks, phase ``prefix``; the decoder
        only (no LM head: no logits are wanted)."""
        if enc.prefix_len == 0:
            return None
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([enc.prefix], device=self.lm.device)
        phase, state.phase = state.phase, "prefix"
        try:
            self.model.get_decoder()(input_ids=ids, past_key_values=cache, use_cache=True)
        except StopForward:
            pass
        finally:
            state.phase = phase
        return cache

    def _batches(self, enc: Encoded) -> list[Batch]:
        return make_batches(enc.suffixes, self.batch_size, self.pad_id, self.lm.device)

    def _inputs(self, enc: Encoded, b: Batch, cache) -> dict:
        """Model kwargs for one batch: suffix ids, full attention mask and positions, expanded prefix cache."""
        n = b.input_ids.shape[0]
        p = enc.prefix_len
        mask = b.attention_mask
        pos = (mask.cumsum(1) - 1).clamp(min=0) + p
        kw = {"input_ids": b.input_ids, "position_ids": pos}
        if cache is not None:
            c = copy.deepcopy(cache)
            c.batch_repeat_interleave(n)
            kw["past_key_values"] = c
            mask = torch.cat([torch.ones(n, p, dtype=mask.dtype, device=mask.device), mask], 1)
        kw["attention_mask"] = mask
        return kw

    @contextlib.contextmanager
    def _pass(self, phase: str = "prompt") -> Iterator[PassState]:
        """Inference mode for one call, with a fresh :class:`toolkit.hooks.PassState` that every hook receives
        while the call runs (and no longer: nothing outlives the call, errors included)."""
        with torch.inference_mode(), running(PassState(phase)) as state:
            yield state

    def _iterate(self, enc: Encoded, desc: str, phase: str = "prompt"
                 ) -> Iterator[tuple[Batch, object, PassState]]:
        """Yield ``(batch, prefix cache, pass state)`` for each batch, in inference mode, with a progress bar.

        The prefix cache is computed once per call under the hooks active now (None without sharing).
        """
        with self._pass(phase) as state:
            cache = self._prefix_cache(enc, state)
            bar = self._bar(enc, desc)
            try:
                for b in self._batches(enc):
                    self._start(b, state)
                    yield b, cache, state
                    bar.update(sum(len(enc.ids[i]) for i in b.index))
            finally:
                bar.close()

    @staticmethod
    def _start(b: Batch, state: PassState) -> None:
        """Record the batch's rows (for captures) and its shortest real length (for position checks)."""
        state.rows = torch.tensor(b.index)
        state.min_len = int(b.attention_mask.sum(1).min())

    def _bar(self, enc: Encoded, desc: str):
        return tqdm(total=enc.n_tokens, desc=desc, unit="tok", disable=not self.progress, leave=False,
                    dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------ passes
    def context(self, enc: Encoded, k: int, desc: str = "context", start_layer: int = 0) -> Context:
        """Compute and keep the key/value caches of all but the last ``k`` tokens of every prompt.

        Costs about one forward pass; afterwards ``logits(enc, context=ctx)`` computes only ``k`` tokens per
        prompt, through blocks ``start_layer`` onwards (see :class:`Context`). Memory:
        ``2 * n_layers * n_kv_heads * head_dim * prompt_len`` floats per prompt (about 1 MB per 45-token prompt
        for the default model).

        Raises:
            ToolkitError: ``k < 1``, ``start_layer`` out of range, a prompt with too few tokens, or an
                intervention is active (the cache must describe the unmodified model).
        """
        if k < 1:
            raise ToolkitError(f"context needs k >= 1 trailing tokens, got {k}")
        act = active_hooks(self.model)
        if act.every or act.depth:
            raise ToolkitError("compute a context cache without interventions active")
        start_layer = check_layer(self.model, start_layer)
        from transformers import DynamicCache

        blocks = decoder_layers(self.model)
        if any(len(x) < k + 1 for x in enc.ids):
            raise ToolkitError(f"a context cache of the last {k} tokens needs prompts of at least {k + 1} tokens; "
                               f"the shortest has {min(map(len, enc.ids))}")
        work = self._ensure_depth(enc, k + 1)
        parts, tuple_out = [], [False]

        def grab(mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            grab.value = h.detach().clone()
            raise StopForward

        def kind(mod, args, out):
            tuple_out[0] = isinstance(out, tuple)

        head_once = None
        for b, cache, _ in self._iterate(work, desc):
            kw = self._inputs(work, b, cache)
            c = kw.get("past_key_values") or DynamicCache(config=self.model.config)
            mask = kw["attention_mask"]
            h = blocks[0].register_forward_hook(kind)
            rest = {"input_ids": kw["input_ids"][:, :-k], "position_ids": kw["position_ids"][:, :-k],
                    "attention_mask": mask[:, :-k], "past_key_values": c, "use_cache": True}
            try:
                if head_once is None:  # can the LM head be applied to final hidden states on its own? check once
                    res = self.model(**rest, logits_to_keep=1, output_hidden_states=True)
                    mine = self._head(res.hidden_states[-1][:, -1]).float()
                    ref = res.logits[:, -1].float()
                    head_once = bool(torch.allclose(mine, ref, atol=1e-3 * (1 + float(ref.abs().max())), rtol=1e-3))
                else:  # only the caches are wanted: the decoder, no LM head
                    self.model.get_decoder()(**rest)
            finally:
                h.remove()
            resid = None
            if start_layer > 0:
                h = blocks[start_layer].register_forward_pre_hook(grab, with_kwargs=True)
                try:
                    self.model(input_ids=kw["input_ids"][:, -k:], position_ids=kw["position_ids"][:, -k:],
                               attention_mask=mask, past_key_values=copy.deepcopy(c), use_cache=True)
                except StopForward:
                    resid = grab.value
                finally:
                    h.remove()
            parts.append(ContextPart(b, c, kw["input_ids"][:, -k:], kw["position_ids"][:, -k:], mask, resid))
        return Context(enc, k, parts, start_layer, tuple_out[0], bool(head_once))

    @contextlib.contextmanager
    def _skip_blocks(self, ctx: Context, current: list) -> Iterator[None]:
        """Run blocks before ``ctx.start_layer`` as identities and feed block ``start_layer`` the stored residual
        of the current batch (``current[0]``), ahead of any other hook on it.

        The skipped blocks' slots in the decoder's layer list hold a stand-in (:class:`_Skipped`) while the block
        runs; the blocks themselves are not touched (their ``forward``, hooks and devices stay as they are, e.g.
        accelerate's device-placement hooks), and the original blocks are put back in their slots on exit, errors
        included. The list keeps its length, so per-layer settings indexed by position (``layer_types``) still
        line up."""
        if ctx.start_layer == 0:
            yield
            return
        blocks = decoder_layers(self.model)
        originals = [blocks[i] for i in range(ctx.start_layer)]

        def feed(mod, args, kwargs):
            if args:
                return (current[0],) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=current[0])

        h = blocks[ctx.start_layer].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
        try:
            for i in range(ctx.start_layer):
                blocks[i] = _Skipped(ctx.tuple_out)
            yield
        finally:
            h.remove()
            for i, blk in enumerate(originals):
                blocks[i] = blk

    def _logits_from_context(self, ctx: Context, desc: str) -> torch.Tensor:
        """:meth:`logits` over a context that :meth:`Context.check_serves` has accepted."""
        out = None
        current: list = [None]
        hidden = None
        decoder = self.model.get_decoder() if ctx.head_once else None
        with self._pass() as state, self._skip_blocks(ctx, current):
            bar = tqdm(total=len(ctx.enc) * ctx.k, desc=desc, unit="tok", disable=not self.progress, leave=False,
                       dynamic_ncols=True)
            try:
                for part in ctx.parts:
                    b = part.batch
                    self._start(b, state)
                    current[0] = part.resid
                    kw = {"input_ids": part.ids, "position_ids": part.positions, "attention_mask": part.mask,
                          "past_key_values": copy.deepcopy(part.cache), "use_cache": True}
                    rows = torch.tensor(b.index)
                    if decoder is not None:  # final hidden state now, the LM head once for all prompts below
                        h = decoder(**kw).last_hidden_state[:, -1]
                        if hidden is None:
                            hidden = torch.empty((len(ctx.enc), h.shape[-1]), dtype=h.dtype, device=h.device)
                        hidden[rows.to(h.device)] = h
                    else:
                        logits = self.model(**kw, logits_to_keep=1).logits[:, -1].float().cpu()
                        if out is None:
                            out = torch.empty((len(ctx.enc), logits.shape[-1]), dtype=torch.float32)
                        out[rows] = logits
                    bar.update(len(b.index) * ctx.k)
                if hidden is not None:
                    out = self._head(hidden).float().cpu()
            finally:
                bar.close()
        return out

    def _head(self, hidden: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Logits from final (normed) hidden states ``[n, d_model]`` -> ``[n, vocab]``: the LM head applied once to
        many rows (it is memory-bound: one read of its weights serves every row), with Gemma 2's final logit
        soft-capping where configured."""
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        parts = []
        for i in range(0, hidden.shape[0], chunk):
            z = head(hidden[i : i + chunk])
            if cap:
                z = torch.tanh(z / cap) * cap
            parts.append(z)
        return torch.cat(parts)

    def _columns(self, hidden: torch.Tensor, head, cols: torch.Tensor) -> torch.Tensor:
        """``head`` applied to ``hidden`` ``[n, d_model]`` for the vocabulary rows ``cols`` only -> ``[n, k]``
        (bias and Gemma 2's final logit soft-capping included)."""
        z = torch.nn.functional.linear(hidden, head.weight[cols],
                                       None if getattr(head, "bias", None) is None else head.bias[cols])
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(z / cap) * cap if cap else z

    def logits(self, enc: Encoded, desc: str = "forward", context: Context | None = None,
               columns: Sequence[int] | None = None) -> torch.Tensor:
        """Next-token logits at the last prompt position, ``[n_prompts, vocab]`` float32, caller's order.

        Active hooks (interventions) apply to the prefix and the prompt. Only the last position reaches the
        LM head (``logits_to_keep=1``). With ``context`` (from :meth:`context` on the same ``enc``) only the
        last ``context.k`` tokens of each prompt are computed. With ``columns`` (token ids) only those rows of
        the LM head are applied (a judge reading a few option tokens): ``[n_prompts, len(columns)]``, equal to
        the same columns of the full logits.

        Raises:
            ToolkitError: ``context`` made for other prompts, or an active intervention it cannot serve (one at
                every position, or one deeper than ``context.k``); ``columns`` with a ``context`` or out of range.
        """
        if context is not None:
            if columns is not None:
                raise ToolkitError("logits over a context give every column")
            context.check_serves(self.model, enc)
            return self._logits_from_context(context, desc)
        out = None
        enc = self._ensure_depth(enc, active_hooks(self.model).depth)
        sub = None
        if columns is not None:
            head = self.model.get_output_embeddings()
            cols = torch.as_tensor(list(columns), dtype=torch.long)
            if not len(cols) or cols.min() < 0 or cols.max() >= head.weight.shape[0]:
                raise ToolkitError(f"logit columns must be token ids in [0, {head.weight.shape[0]})")
            sub = (head, cols.to(head.weight.device))
        for b, cache, _ in self._iterate(enc, desc):
            if sub is not None:
                h = self.model.get_decoder()(**self._inputs(enc, b, cache), use_cache=cache is not None
                                             ).last_hidden_state[:, -1]
                logits = self._columns(h, *sub).float().cpu()
            else:
                logits = self.model(**self._inputs(enc, b, cache), use_cache=cache is not None,
                                    logits_to_keep=1).logits[:, -1].float().cpu()
            if out is None:
                out = torch.empty((len(enc), logits.shape[-1]), dtype=torch.float32)
            out[torch.tensor(b.index)] = logits
        return out

    @contextlib.contextmanager
    def capture(self, n_prompts: int, layers: Sequence[int], sites: Sequence[str] = ("resid_pre",),
                positions: Sequence[int] = (-1,), *, reduce: str = "none", stop: bool = False
                ) -> Iterator[dict[str, torch.Tensor]]:
        """Context manager that records activations during this Runner's passes (prompt phase only).

        Yields the output dict, filled as passes run: ``{site: [n_prompts, n_layers, n_pos, d_model]}``
        float32, or with ``reduce="sum"`` ``{site: [n_layers, n_pos, d_model]}`` float64 sums over prompts.
        With ``stop=True`` the forward pass ends after the last needed activation (:class:`StopForward`).
        Use it around :meth:`generate` to read the prompt's activations in the same pass as the completion.

        Raises:
            ToolkitError: unknown site, layer out of range, non-negative position, bad ``reduce``.
        """
        if reduce not in ("none", "sum"):
            raise ToolkitError(f"reduce must be 'none' or 'sum', got {reduce!r}")
        for s in sites:
            if s not in SITES:
                raise ToolkitError(f"unknown hook site {s!r}; choose one of {', '.join(SITES)}")
        layers = [check_layer(self.model, l) for l in layers]
        positions = list(positions)
        if not positions or any(p >= 0 for p in positions):
            raise ToolkitError("positions must be negative indices from the end of the prompt, e.g. -1")
        pos_t = torch.tensor(positions, device=self.lm.device)
        shape = (len(layers), len(positions), self.lm.d_model)
        if reduce == "sum":
            out = {s: torch.zeros(shape, dtype=torch.float64) for s in sites}
        else:
            out = {s: torch.zeros((n_prompts,) + shape, dtype=torch.float32) for s in sites}
        depth = -min(positions)
        fire = {"resid_pre": 0, "attn_out": 1, "resid_mid": 2, "mlp_out": 3, "resid_post": 4}
        last = max((l, fire[s]) for l in layers for s in sites)

        def make(site: str, li: int, layer: int):
            is_last = stop and (layer, fire[site]) == last

            def fn(x: torch.Tensor, ctx):
                if not ctx.in_prompt:
                    return None
                if x.shape[1] < len(positions) or x.shape[1] < depth:
                    raise ToolkitError(f"position {min(positions)} is beyond a prompt of {x.shape[1]} tokens")
                sel = x[:, pos_t.to(x.device)].float().cpu()  # [batch, n_pos, d]
                if reduce == "sum":
                    out[site][li] += sel.sum(0, dtype=torch.float64)
                else:
                    out[site][ctx.state.rows, li] = sel
                if is_last:
                    raise StopForward
                return None

            return fn

        specs = [(s, l, make(s, li, l)) for li, l in enumerate(layers) for s in sites]
        with hooked(self.model, specs, write=False, reach=Reach(depth=depth, read=True)):
            yield out

    def collect(self, enc: Encoded, layers: Sequence[int], sites: Sequence[str] = ("resid_pre",),
                positions: Sequence[int] = (-1,), *, reduce: str = "none", desc: str = "activations"
                ) -> dict[str, torch.Tensor]:
        """Collect activations at ``sites`` x ``layers`` x ``positions`` for every prompt.

        Reads only what is asked and stops the forward pass after the last needed activation (no later
        blocks, no LM head).

        Args:
            enc: from :meth:`encode`.
            layers: block indices.
            sites: hook site names (:data:`toolkit.hooks.SITES`).
            positions: negative indices from the end of each prompt, e.g. ``fmt.post_positions()``.
            reduce: ``"none"`` keeps every prompt; ``"sum"`` sums over prompts in float64 (for means).

        Returns:
            ``{site: [n_prompts, n_layers, n_pos, d_model] float32}`` or, with ``reduce="sum"``,
            ``{site: [n_layers, n_pos, d_model] float64}``; layers in the order given.

        Raises:
            ToolkitError: unknown site, layer out of range, position not negative or beyond a prompt.
        """
        positions = list(positions)
        if positions and all(p < 0 for p in positions):
            enc = self._ensure_depth(enc, max(-min(positions), active_hooks(self.model).depth))
        with self.capture(len(enc), layers, sites, positions, reduce=reduce, stop=True) as out:
            for b, cache, _ in self._iterate(enc, desc):
                try:
                    self.model(**self._inputs(enc, b, cache), use_cache=cache is not None)
                except StopForward:
                    pass
        return out

    def generate(self, enc: Encoded, max_new_tokens: int, desc: str = "generate", with_tokens: bool = False):
        """Greedy completions and the first step's logits.

        Active hooks apply to the prefix, the prompt and every generated token (phase ``generate``).

        Returns:
            (completions as decoded text without special tokens, logits ``[n_prompts, vocab]`` float32 at the
            last prompt position, i.e. the same as :meth:`logits`); with ``with_tokens=True`` also the generated
            token ids per prompt, cut before the first end-of-sequence or padding token (list of ``[new]``).

        Raises:
            ToolkitError: ``max_new_tokens`` < 1.
        """
        if max_new_tokens < 1:
            raise ToolkitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        texts: list[str] = [""] * len(enc)
        tokens: list[list[int]] = [[] for _ in range(len(enc))]
        first = None
        tok = self.lm.tokenizer
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {self.pad_id}
        enc = self._ensure_depth(enc, active_hooks(self.model).depth)
        for b, cache, state in self._iterate(enc, desc):
            kw = self._inputs(enc, b, cache)
            n = b.input_ids.shape[0]
            if cache is not None:
                pre = torch.tensor([enc.prefix] * n, device=self.lm.device)
                kw["input_ids"] = torch.cat([pre, kw["input_ids"]], 1)
            kw.pop("position_ids")
            calls = {"n": 0}

            def set_phase(mod, args, kwargs, state=state):
                state.phase = "prompt" if calls["n"] == 0 else "generate"
                calls["n"] += 1

            h = self.model.register_forward_pre_hook(set_phase, with_kwargs=True)
            try:
                res = self.model.generate(
                    **kw, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                    top_k=None, output_logits=True, return_dict_in_generate=True, pad_token_id=self.pad_id,
                    eos_token_id=eos,
                )
            finally:
                h.remove()
                state.phase = "prompt"
            width = kw["input_ids"].shape[1]
            new = res.sequences[:, width:]
            for r, i in enumerate(b.index):
                texts[i] = tok.decode(new[r], skip_special_tokens=True)
                row = new[r].tolist()
                cut = next((j for j, t in enumerate(row) if t in stop), len(row))
                tokens[i] = row[:cut]
            lg = res.logits[0].float().cpu()
            if first is None:
                first = torch.empty((len(enc), lg.shape[-1]), dtype=torch.float32)
            first[torch.tensor(b.index)] = lg
        return (texts, first, tokens) if with_tokens else (texts, first)

    def forced(self, enc: Encoded, continuations: Sequence[Sequence[int]], fn, desc: str = "teacher-forced") -> None:
        """Teacher-forced pass: the prompt, then the given continuation tokens, with the active hooks acting exactly
        as during :meth:`generate` (prompt phase for the prompt, ``generate`` phase for the continuation, so
        prompt-position interventions act on the prompt only and every-position ones everywhere).

        For each batch, calls ``fn(rows, logp, targets, lens)`` with ``rows`` the caller-order prompt indices
        ``[b]``, ``logp`` ``[b, m, vocab]`` float32 log-probabilities where ``logp[r, j]`` is the distribution that
        predicts continuation token ``j`` (position ``j = 0``: the last prompt position), ``targets`` ``[b, m]``
        long (the continuation tokens, padded) and ``lens`` the real continuation lengths (positions ``>= lens[r]``
        are padding). Prompts with an empty continuation are skipped. Used by :mod:`toolkit.damage`
        (multi-token KL, cross-entropy).

        Raises:
            ToolkitError: the number of continuations differs from the number of prompts.
        """
        from transformers import DynamicCache

        if len(continuations) != len(enc):
            raise ToolkitError(f"{len(continuations)} continuations for {len(enc)} prompts")
        conts = [list(map(int, c)) for c in continuations]
        keep = [i for i, c in enumerate(conts) if c]
        if not keep:
            return
        sub = Encoded([enc.ids[i] for i in keep], enc.prefix_len)
        sub = self._ensure_depth(sub, active_hooks(self.model).depth)
        for b, cache, state in self._iterate(sub, desc):
            state.rows = torch.tensor([keep[i] for i in b.index])  # caller-order rows, not indices into ``sub``
            kw = self._inputs(sub, b, cache)
            kw.setdefault("past_key_values", DynamicCache(config=self.model.config))
            out = self.model(**kw, use_cache=True, logits_to_keep=1)
            rows = [keep[i] for i in b.index]
            lens = [len(conts[i]) for i in rows]
            m, n = max(lens), len(rows)
            dev = b.input_ids.device
            targets = torch.full((n, m), self.pad_id, dtype=torch.long, device=dev)
            for r, i in enumerate(rows):
                targets[r, : lens[r]] = torch.tensor(conts[i], device=dev)
            logits = [out.logits[:, -1:].float()]
            if m > 1:
                tmask = (torch.arange(m - 1, device=dev) < torch.tensor(lens, device=dev).unsqueeze(1) - 1)
                tmask = tmask.to(kw["attention_mask"].dtype)
                step = torch.arange(1, m, device=kw["position_ids"].device)
                state.phase = "generate"
                try:
                    more = self.model(input_ids=targets[:, : m - 1], position_ids=kw["position_ids"][:, -1:] + step,
                                      attention_mask=torch.cat([kw["attention_mask"], tmask], 1),
                                      past_key_values=out.past_key_values, use_cache=True).logits.float()
                finally:
                    state.phase = "prompt"
                logits.append(more)
            fn(rows, torch.log_softmax(torch.cat(logits, 1), -1).cpu(), targets.cpu(), lens)

    def _continuation_from_context(self, ctx: Context, conts: list[list[int]], out: np.ndarray,
                                   desc: str) -> np.ndarray:
        """Continuations right-padded after each prompt's last token, over the cached keys/values of the rest."""
        with self._pass("continuation") as state:
            for part in tqdm(ctx.parts, desc=desc, disable=not self.progress, leave=False):
                b, ids, pos, mask = part.batch, part.ids, part.positions, part.mask
                self._start(b, state)
                lens = [len(conts[i]) for i in b.index]
                m = max(lens)
                if m == 0:
                    continue
                n = len(b.index)
                tail = torch.full((n, m), self.pad_id, dtype=torch.long, device=ids.device)
                tmask = torch.zeros((n, m), dtype=mask.dtype, device=mask.device)
                for r, i in enumerate(b.index):
                    if lens[r]:
                        tail[r, : lens[r]] = torch.tensor(conts[i], device=ids.device)
                        tmask[r, : lens[r]] = 1
                step = torch.arange(1, m + 1, device=pos.device)
                logits = self.model(input_ids=torch.cat([ids, tail], 1),
                                    position_ids=torch.cat([pos, pos[:, -1:] + step], 1),
                                    attention_mask=torch.cat([mask, tmask], 1),
                                    past_key_values=copy.deepcopy(part.cache), use_cache=True).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1)  # position j predicts tail token j
                for r, i in enumerate(b.index):
                    if lens[r]:
                        lp = logp[r, : lens[r]].gather(-1, tail[r, : lens[r]].unsqueeze(-1)).squeeze(-1)
                        out[i] = float(lp.double().mean())
        return out

    def continuation_logprob(self, enc: Encoded, continuations: Sequence[Sequence[int]],
                             desc: str = "log-likelihood", context: Context | None = None) -> np.ndarray:
        """Mean per-token log-likelihood of each continuation given its prompt, in nats per token, ``[n_prompts]``.

        ``log p(c_1..c_m | prompt) / m`` under the hooks active at every position (normally none: the base model
        judging steered text, a coherence measure that does not depend on refusal). The pass runs in the
        ``"continuation"`` phase (:class:`toolkit.hooks.PassState`), so hooks addressed to prompt positions and
        activation captures do not act on it: positions counted from the end of prompt + continuation are not
        the prompt's. NaN for an empty continuation.
        One forward pass over prompt + continuation; the LM head sees only the last ``max m + 1`` positions.
        With ``context`` (from :meth:`context` on ``enc`` with ``k = 1`` and ``start_layer = 0``, computed once
        for many calls) only the last prompt token and the continuation are computed.

        Raises:
            ToolkitError: the number of continuations differs from the number of prompts, or a context that is
                not for ``enc`` with ``k = 1`` and ``start_layer = 0``, or used while an intervention (a hook that
                is not read-only, :attr:`toolkit.hooks.ActiveHooks.writes`) is active.
        """
        if len(continuations) != len(enc):
            raise ToolkitError(f"{len(continuations)} continuations for {len(enc)} prompts")
        conts = [list(map(int, c)) for c in continuations]
        out = np.full(len(enc), np.nan)
        keep = [i for i, c in enumerate(conts) if c]
        if not keep:
            return out
        if context is not None:
            if context.enc is not enc or context.k != 1 or context.start_layer != 0:
                raise ToolkitError("continuation_logprob needs a context for these prompts with k = 1, start layer 0")
            if active_hooks(self.model).writes:  # captures are allowed: they read, and only in the prompt phase
                raise ToolkitError("a context cache describes the unmodified model; remove interventions first")
            return self._continuation_from_context(context, conts, out, desc)
        full = Encoded([list(enc.ids[i]) + conts[i] for i in keep], enc.prefix_len)
        for b, cache, state in self._iterate(full, desc, phase="continuation"):
            state.rows = torch.tensor([keep[i] for i in b.index])  # caller-order rows, not indices into ``full``
            lens = [len(conts[keep[i]]) for i in b.index]
            m = max(lens)
            logits = self.model(**self._inputs(full, b, cache), use_cache=cache is not None,
                                logits_to_keep=m + 1).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1)  # position j predicts the token at j + 1
            for r, i in enumerate(b.index):
                n = lens[r]
                target = b.input_ids[r, -n:]
                lp = logp[r, m - n :].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                out[keep[i]] = float(lp.double().mean())
        return out


class _Skipped(torch.nn.Module):
    """Stands in for a decoder block that a context-cached pass skips: returns its input hidden states
    unchanged (as a 1-tuple when the real blocks return tuples)."""

    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.tuple_out else hidden_states
