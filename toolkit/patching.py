"""Activation patching between harmful (clean) and harmless (corrupted) prompts, per site and per attention head.

Method (causal tracing / activation patching: Meng et al. 2022, Wang et al. 2022; conventions of Heimersheim &
Nanda 2024, "How to use and interpret activation patching"):

* The *clean* run is a harmful prompt (the model tends to refuse), the *corrupted* run a harmless prompt of
  matching token length. The metric is the logit refusal score of Arditi et al. 2024
  (:func:`toolkit.scoring.refusal_score`) at the last prompt position.
* **Denoising**: run the corrupted prompt and copy in the clean activation at one component (site, layer,
  positions, optionally one head); **noising**: run the clean prompt and copy in the corrupted activation.
* Both are normalised the same way, from means over pairs: ``(mean patched - mean corrupt) / (mean clean -
  mean corrupt)`` with the unpatched scores as clean and corrupt baselines, so 0 is the corrupted (harmless)
  baseline and 1 the clean (harmful) one. A denoising value near 1 means the component alone restores refusal
  (sufficient); a noising value near 0 means corrupting it alone removes refusal (necessary). ``effect`` is the
  normalised value for denoising and ``1 - normalised`` for noising, so that for both a larger effect means a
  more important component. A percentile bootstrap over pairs gives a 95 % interval (:func:`normalised_effect`).

Components. ``site`` is one of :data:`toolkit.hooks.SITES` (``resid_pre``, ``resid_mid``, ``resid_post``,
``attn_out``, ``mlp_out``; TransformerLens names) or ``z``: the input of the attention output projection
``o_proj``, ``[batch, pos, n_heads * head_dim]``, whose slice ``h * head_dim:(h + 1) * head_dim`` is query head
``h``'s output before ``o_proj`` (TransformerLens ``hook_z``). Heads are *query* heads (``n_heads =
num_attention_heads``); with grouped-query attention head ``h`` reads key/value head ``h // (n_heads //
n_kv_heads)`` (:class:`HeadLayout`). Positions are negative indices from the end of the prompt; one component may
cover several positions, patched together. A ``resid_mid`` patch sets the residual stream after attention (it
writes ``target - resid_pre`` into ``attn_out``, so everything downstream sees the patched value).

Pairing (:func:`pair_by_length`). Positions are aligned from the END of the prompt: the post-instruction tokens
(chat-template tokens after the user's text) are identical in both prompts, so they align exactly, and with
prompts of equal token length every position aligns. Each formatted prompt (chat template applied) is measured
in tokens; harmful prompts are taken in file order and each is paired with the unused harmless prompt whose
token length is nearest (ties: the earlier harmless prompt in file order), only if the lengths differ by at
most ``max_len_diff`` tokens (0: exact match); a harmful prompt without such a partner is dropped (counted).
Pairing stops after ``max_pairs`` pairs. Taking harmful prompts in file order rather than by length keeps a
limited number of pairs from favouring short prompts. No padding is inserted: with ``max_len_diff > 0`` each
prompt keeps its own length and positions still count from the end.

Speed and exactness. A patch at position ``-p`` of block ``L`` changes nothing before position ``-p`` and
nothing before block ``L``, so each patched pass reuses cached keys/values of all but the last ``p`` tokens and
the unpatched residual stream at block ``L`` (a :class:`toolkit.runner.Context` with ``k = p`` and
``start_layer = L``), and computes only ``p`` tokens through blocks ``L..n_layers-1``. Components sharing
``(layer, depth)`` are stacked into one forward pass (each prompt repeated once per component; the hook reads
each row's component and prompt from the runner's caller-order rows), which keeps the matrices large enough for
the CPU to run near its arithmetic peak. Per prompt set the cost before the sweep is one context pass, one
capture pass over the last ``K`` tokens, and one pass over those ``K`` tokens completing the key/value caches,
which are then cropped for every shallower depth. Context-cached passes equal plain full passes to float
tolerance (``tests/test_patching.py``). Measured on the default model (2 CPU cores, float32, 10 pairs): about
1.3 s per stacked pass at about 52 GFLOP/s, a fifth to a third of it in the LM head, which every patched row
needs. The contexts are derived here with :meth:`toolkit.runner.Context.derive`.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .batching import Batch
from .errors import ToolkitError
from .hooks import HEAD_SITE, SITES, Reach, check_layer, decoder_layers, hooked
from .runner import Context, ContextPart, Encoded, Runner
from .scoring import refusal_score
from .stats.resampling import averaging_weights, bootstrap

PATCH_SITES = SITES + (HEAD_SITE,)
DIRECTIONS = ("denoise", "noise")


# ------------------------------------------------------------------------------------------------ heads
@dataclass(frozen=True)
class HeadLayout:
    """Attention head layout of a decoder.

    Attributes:
        n_heads: query heads (``num_attention_heads``): the heads patched and reported.
        n_kv_heads: key/value heads (``num_key_value_heads``; fewer than ``n_heads`` with grouped-query attention).
        head_dim: width of one head's output (``z`` slice), so ``z`` is ``[batch, pos, n_heads * head_dim]``.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int

    def kv_group(self, head: int) -> int:
        """The key/value head that query head ``head`` reads: ``head // (n_heads // n_kv_heads)``."""
        return head // (self.n_heads // self.n_kv_heads)

    def head_slice(self, head: int) -> slice:
        """Columns of ``z`` belonging to query head ``head``."""
        return slice(head * self.head_dim, (head + 1) * self.head_dim)


def head_layout(model: nn.Module) -> HeadLayout:
    """Read the head layout from the config and check it against the first block's ``o_proj``.

    Raises:
        ToolkitError: heads that do not divide evenly, or an ``o_proj`` whose input width is not
            ``n_heads * head_dim`` (an architecture this module does not understand).
    """
    cfg = model.config.get_text_config()
    n = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or n)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n)
    if kv < 1 or n % kv:
        raise ToolkitError(f"{n} query heads do not split into {kv} key/value groups")
    width = decoder_layers(model)[0].self_attn.o_proj.in_features
    if width != n * hd:
        raise ToolkitError(f"o_proj takes {width} inputs, not n_heads * head_dim = {n} * {hd}: per-head patching "
                           "is not supported for this architecture")
    return HeadLayout(n, kv, hd)


def head_outputs(model: nn.Module, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Each query head's contribution to ``o_proj``'s output: ``z_h @ W_O[:, h-slice].T``.

    ``sum_h head_outputs(...)[..., h, :] + o_proj.bias`` equals ``o_proj(z)`` (the attention output before any
    post-attention norm; on Gemma 2/3 ``attn_out`` is that norm's output). Computed in float32 or wider.

    Args:
        layer: block index.
        z: ``[..., n_heads * head_dim]``, the input of ``o_proj``.

    Returns:
        ``[..., n_heads, d_model]``.

    Raises:
        ToolkitError: layer out of range, or ``z`` of the wrong width.
    """
    lay = head_layout(model)
    w = decoder_layers(model)[check_layer(model, layer)].self_attn.o_proj.weight  # [d_model, n_heads * head_dim]
    if z.shape[-1] != w.shape[1]:
        raise ToolkitError(f"z has width {z.shape[-1]}, but o_proj takes {w.shape[1]}")
    work = torch.promote_types(z.dtype, torch.float32)
    zh = z.to(work).reshape(*z.shape[:-1], lay.n_heads, lay.head_dim)
    wh = w.to(device=z.device, dtype=work).reshape(w.shape[0], lay.n_heads, lay.head_dim)
    return torch.einsum("...hk,dhk->...hd", zh, wh)


# ---------------------------------------------------------------------------------------------- pairing
@dataclass(frozen=True)
class Pair:
    """A harmful (clean) prompt and a harmless (corrupted) prompt, by index in their sets, with token lengths."""

    harmful: int
    harmless: int
    harmful_len: int
    harmless_len: int


def pair_by_length(harmful_lens: Sequence[int], harmless_lens: Sequence[int], max_len_diff: int = 0,
                   max_pairs: int | None = None) -> tuple[list[Pair], int]:
    """Pair prompts by token length (the rule in the module docstring).

    Harmful prompts in order; each takes the unused harmless prompt of nearest length (ties: the earlier one)
    if ``|difference| <= max_len_diff``; otherwise it is dropped. Stops after ``max_pairs`` pairs.

    Args:
        harmful_lens, harmless_lens: token lengths of the formatted prompts, in file order.
        max_len_diff: largest allowed length difference in tokens (0 = exact match).
        max_pairs: at most this many pairs (None: as many as can be formed).

    Returns:
        ``(pairs, dropped)``: the pairs in harmful-file order, and how many harmful prompts examined found no
        partner.

    Raises:
        ToolkitError: an empty set, ``max_len_diff < 0``, ``max_pairs < 1``, or no pair can be formed.
    """
    if not harmful_lens or not harmless_lens:
        raise ToolkitError("cannot pair prompts: the harmful or the harmless set is empty")
    if max_len_diff < 0:
        raise ToolkitError(f"must be >= 0, got {max_len_diff}", param="max_len_diff")
    if max_pairs is not None and max_pairs < 1:
        raise ToolkitError(f"must be >= 1, got {max_pairs}", param="max_pairs")
    free = {j: int(n) for j, n in enumerate(harmless_lens)}
    pairs, dropped = [], 0
    for i, n in enumerate(harmful_lens):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        best = min(free, key=lambda j: (abs(free[j] - n), j), default=None)
        if best is None or abs(free[best] - n) > max_len_diff:
            dropped += 1
            continue
        pairs.append(Pair(i, best, int(n), free.pop(best)))
    if not pairs:
        raise ToolkitError(
            f"no harmful prompt has a harmless partner within {max_len_diff} token(s) of its length (harmful "
            f"{min(harmful_lens)}-{max(harmful_lens)} tokens, harmless {min(harmless_lens)}-{max(harmless_lens)}); "
            "raise `max_len_diff` or use other prompts")
    return pairs, dropped


# ------------------------------------------------------------------------------------------- components
@dataclass(frozen=True)
class Component:
    """What one patch replaces: ``site`` of block ``layer`` at ``positions`` (negative indices, patched
    together), and for ``site == "z"`` query head ``head`` (``None``: every head, i.e. all of ``z``)."""

    site: str
    layer: int
    positions: tuple[int, ...]
    head: int | None = None

    @property
    def depth(self) -> int:
        """How many trailing tokens the patch reaches: ``-min(positions)``."""
        return -min(self.positions)

    @property
    def label(self) -> str:
        """Short name such as ``L12 attn_out p-1`` or ``L14 z head 3 p-5..-1``."""
        pos = self.positions
        p = f"p{pos[0]}" if len(pos) == 1 else (f"p{pos[0]}..{pos[-1]}" if list(pos) == list(range(pos[0], pos[-1] + 1))
                                               else "p" + ",".join(map(str, pos)))
        head = f" head {self.head}" if self.head is not None else ""
        return f"L{self.layer} {self.site}{head} {p}"


def parse_sites(text: str) -> list[str]:
    """``'resid_pre,attn_out,mlp_out'`` -> a list of distinct patchable sites (:data:`toolkit.hooks.SITES`).

    Raises:
        ToolkitError: an unknown site or none.
    """
    sites = list(dict.fromkeys(s.strip() for s in (text or "").split(",") if s.strip()))
    if not sites:
        raise ToolkitError("names no site", param="sites")
    for s in sites:
        if s not in SITES:
            raise ToolkitError(f"unknown hook site {s!r}; choose from {', '.join(SITES)} (heads: `heads`)")
    return sites


def check_positions(positions: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct negative positions.

    Raises:
        ToolkitError: none, or a non-negative index.
    """
    pos = sorted(set(int(p) for p in positions))
    if not pos or any(p >= 0 for p in pos):
        raise ToolkitError("must be negative indices from the end of the prompt, e.g. -1", param="positions")
    return tuple(pos)


def site_components(sites: Sequence[str], layers: Sequence[int], positions: Sequence[int]) -> list[Component]:
    """One component per site x layer x single position, in that order."""
    return [Component(s, l, (p,)) for s in sites for l in layers for p in check_positions(positions)]


def head_components(layers: Sequence[int], n_heads: int, positions: Sequence[int]) -> list[Component]:
    """One ``z`` component per layer x query head, each covering all ``positions`` together."""
    pos = check_positions(positions)
    return [Component(HEAD_SITE, l, pos, h) for l in layers for h in range(n_heads)]


# ------------------------------------------------------------------------------------------------ hooks
@dataclass
class Activations:
    """Activations captured at the last ``len(positions)`` positions of every prompt.

    Attributes:
        acts: ``{site: [n_prompts, n_layers(site), n_pos, width]}`` float32 on the CPU (width ``d_model``, or
            ``n_heads * head_dim`` for ``z``).
        layers: ``{site: [layer, ...]}``, the order of the second axis.
        positions: the negative positions of the third axis.
    """

    acts: dict[str, torch.Tensor]
    layers: dict[str, list[int]]
    positions: list[int]

    def get(self, site: str, layer: int, positions: Sequence[int]) -> torch.Tensor:
        """``[n_prompts, len(positions), width]``.

        Raises:
            ToolkitError: that site, layer or position was not captured.
        """
        if site not in self.acts or layer not in self.layers[site]:
            raise ToolkitError(f"no captured {site} activation at layer {layer}")
        missing = [p for p in positions if p not in self.positions]
        if missing:
            raise ToolkitError(f"no captured activation at position {missing[0]}")
        li = self.layers[site].index(layer)
        pi = [self.positions.index(p) for p in positions]
        return self.acts[site][:, li][:, pi]


def capture(runner: Runner, enc: Encoded, layers: dict[str, Sequence[int]], positions: Sequence[int], *,
            context: Context | None = None, desc: str = "capture") -> tuple[torch.Tensor, Activations]:
    """One unpatched pass over ``enc``: last-position logits and activations at ``positions``.

    Args:
        layers: ``{site: layers}`` with sites from :data:`PATCH_SITES` (``z``: the input of ``o_proj``).
        positions: negative indices from the end of each prompt.
        context: a :class:`toolkit.runner.Context` for ``enc`` (start layer 0, ``k >= -min(positions)``); then only
            the last ``k`` tokens are computed.

    Returns:
        ``(logits [n_prompts, vocab] float32, Activations)``.

    Raises:
        ToolkitError: unknown site, layer out of range, bad positions, a position beyond a prompt.
    """
    pos = list(check_positions(positions))
    for s in layers:
        if s not in PATCH_SITES:
            raise ToolkitError(f"unknown hook site {s!r}; choose from {', '.join(PATCH_SITES)}")
    lay = {s: [check_layer(runner.model, l) for l in ls] for s, ls in layers.items() if ls}
    n, depth = len(enc), -pos[0]
    out: dict[str, torch.Tensor] = {}

    def make(site: str, li: int):
        def fn(x: torch.Tensor, ctx):
            if not ctx.in_prompt:
                return None
            ctx.check_span(x, depth)
            sel = x[:, [x.shape[1] + p for p in pos]].float().cpu()  # [batch, n_pos, width]
            if site not in out:
                out[site] = torch.zeros((n, len(lay[site]), len(pos), sel.shape[-1]), dtype=torch.float32)
            out[site][ctx.state.rows, li] = sel
            return None

        return fn

    specs = [(s, l, make(s, li), False) for s, ls in lay.items() for li, l in enumerate(ls)]
    with hooked(runner.model, specs, reach=Reach(depth=depth, read=True)):
        logits = runner.logits(enc, desc=desc, context=context)
    return logits, Activations(out, lay, pos)


@contextlib.contextmanager
def patching(runner: Runner, components: Sequence[Component], values: Sequence[torch.Tensor], n_prompts: int
             ) -> Iterator[None]:
    """Context manager: while open, the runner's passes patch ``components`` in.

    A pass runs ``len(components) * n_prompts`` rows in caller order ``v * n_prompts + i``: row ``(v, i)`` is prompt
    ``i`` with component ``v`` replaced by ``values[v][i]`` (so with one component, an ordinary encoding of the
    ``n_prompts`` prompts). Rows are found through the pass state's caller-order rows
    (:attr:`toolkit.hooks.PassState.rows`), since batches are sorted by length. Patches apply in the prompt phase
    only, at the components' positions; the deepest one is declared as the hooks' reach
    (:class:`toolkit.hooks.Reach`: the runner keeps those tokens out of the shared prefix, and a context cache must
    keep at least that many tokens).

    Args:
        components: what to patch, one per variant.
        values: per component ``[n_prompts, len(positions), width]``: the full site width, or ``head_dim`` for one
            head (:class:`HeadLayout`), e.g. from :meth:`Activations.get`.

    Raises:
        ToolkitError: unknown site, layer out of range, values of the wrong shape, a head out of range, or (during
            a pass) a position beyond a prompt.
    """
    if len(components) != len(values) or not components:
        raise ToolkitError(f"{len(components)} components but {len(values)} value tensors")
    model = runner.model
    lay = head_layout(model) if any(c.site == HEAD_SITE and c.head is not None for c in components) else None
    groups: dict[tuple[str, int], list] = defaultdict(list)
    for v, (c, val) in enumerate(zip(components, values)):
        if c.site not in PATCH_SITES:
            raise ToolkitError(f"unknown hook site {c.site!r}; choose from {', '.join(PATCH_SITES)}")
        layer = check_layer(model, c.layer)
        pos = check_positions(c.positions)
        if c.head is not None:
            if c.site != HEAD_SITE:
                raise ToolkitError(f"a head is patched at site {HEAD_SITE!r}, not {c.site!r}")
            if not 0 <= c.head < lay.n_heads:
                raise ToolkitError(f"head {c.head} is out of range: this model has {lay.n_heads} query heads")
            sl, width = lay.head_slice(c.head), lay.head_dim
        elif c.site == HEAD_SITE:
            sl, width = slice(None), decoder_layers(model)[layer].self_attn.o_proj.in_features
        else:
            sl, width = slice(None), int(model.config.get_text_config().hidden_size)
        if tuple(val.shape) != (n_prompts, len(pos), width):
            raise ToolkitError(f"values for {c.label} have shape {tuple(val.shape)}, expected "
                               f"[{n_prompts}, {len(pos)}, {width}]")
        groups[(c.site, layer)].append((v, torch.tensor(pos), sl, val))
    depth = max(c.depth for c in components)
    stash: dict[int, torch.Tensor] = {}

    def make(site: str, layer: int, items: list):
        cache: dict = {}

        def fn(x: torch.Tensor, ctx):
            if not ctx.in_prompt:
                return None
            ctx.check_span(x, depth)
            rows = ctx.state.rows.to(x.device)
            var, idx = rows // n_prompts, rows % n_prompts
            x = x.clone()
            for v, pos, sl, val in items:
                sel = (var == v).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                key = (v, x.device, x.dtype)
                if key not in cache:
                    cache[key] = val.to(device=x.device, dtype=x.dtype)
                new = cache[key][idx[sel]]  # [rows, n_pos, width]
                p = (pos.to(x.device) + x.shape[1]).unsqueeze(0)
                r = sel.unsqueeze(1)
                if site == "resid_mid":  # x is attn_out: make resid_pre + attn_out equal the target
                    new = new - stash[layer][r, p]
                x[r, p, sl] = new
            return x

        return fn

    specs = []
    for (site, layer), items in groups.items():
        write_site = "attn_out" if site == "resid_mid" else site
        specs.append((write_site, layer, make(site, layer, items), True))
        if site == "resid_mid":
            def keep(x, ctx, layer=layer):
                if ctx.in_prompt:
                    stash[layer] = x
                return None

            specs.append(("resid_pre", layer, keep, False))
    with hooked(model, specs, reach=Reach(depth=depth)):
        try:
            yield
        finally:
            stash.clear()


def patched_logits(runner: Runner, enc: Encoded, components: Sequence[Component], values: Sequence[torch.Tensor],
                   *, context: Context | None = None, desc: str = "patch") -> torch.Tensor:
    """Last-position logits with each component patched in turn: ``[len(components), n_prompts, vocab]`` float32.

    With one component and no context this is a plain (full) forward pass over ``enc``; :func:`run_patching`
    uses stacked contexts instead (equal to float tolerance). Several components without a context run one
    plain pass each.

    Args:
        enc: the prompts patched into (the target run).
        components, values: as :func:`patching`.
        context: a :class:`toolkit.runner.Context` for ``enc`` (one component only).

    Raises:
        ToolkitError: as :func:`patching`, or a context with several components.
    """
    if context is not None and len(components) != 1:
        raise ToolkitError("a plain context serves one component per pass; run_patching stacks components")
    outs = []
    for c, v in zip(components, values):
        with patching(runner, [c], [v], len(enc)):
            outs.append(runner.logits(enc, desc=desc, context=context))
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------- contexts
def _contexts_by_depth(runner: Runner, ctx: Context, ks: Sequence[int]) -> dict[int, Context]:
    """From a start-layer-0 context keeping the last ``ctx.k`` tokens, contexts keeping only the last ``k`` tokens
    for each ``k < ctx.k`` in ``ks``: the trailing tokens are run once (unpatched, no hooks may be active) to
    complete each batch's key/value cache, which is then cropped to all but the last ``k`` tokens. Where a cache
    cannot be cropped (a sliding-window layer that has dropped old tokens) the ``ctx.k - k`` tokens are run on
    the shorter cache instead. Returns ``{k: Context}`` including ``ctx.k: ctx``."""
    out = {ctx.k: ctx}
    ks = sorted(set(int(k) for k in ks if 0 < k < ctx.k))
    if not ks:
        return out
    decoder = runner.model.get_decoder()  # no LM head: only the caches are wanted
    full = []
    with torch.inference_mode():
        for part in ctx.parts:
            c = copy.deepcopy(part.cache)
            decoder(input_ids=part.ids, position_ids=part.positions, attention_mask=part.mask, past_key_values=c,
                    use_cache=True)
            full.append(c)
        for k in ks:
            parts = []
            for part, c in zip(ctx.parts, full):
                cache, ids, pos, mask = part.cache, part.ids, part.positions, part.mask
                want = cache.get_seq_length() + ctx.k - k
                try:
                    ck = copy.deepcopy(c)
                    ck.crop(-k)
                    ok = ck.get_seq_length() == want
                except (RuntimeError, ValueError):
                    ok = False
                if not ok:
                    ck = copy.deepcopy(cache)
                    extra = ctx.k - k
                    decoder(input_ids=ids[:, :extra], position_ids=pos[:, :extra],
                            attention_mask=mask[:, : mask.shape[1] - k], past_key_values=ck, use_cache=True)
                parts.append(ContextPart(part.batch, ck, ids[:, -k:], pos[:, -k:], mask))
            out[k] = ctx.derive(parts, k=k, start_layer=0)
    return out


def _repeat_cache(cache, m: int, start_layer: int):
    """A cache whose layers ``start_layer..`` hold every row repeated ``m`` times (``repeat_interleave``). Layers
    before ``start_layer`` belong to skipped blocks, which never read them (only their length is used, for
    positions and masks), so they keep the original rows and tensors; the runner deep-copies the cache before
    each pass, so the original is never modified. Caches without per-layer objects are copied whole."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or start_layer == 0:
        c = copy.deepcopy(cache)
        c.batch_repeat_interleave(m)
        return c
    c = copy.copy(cache)
    c.layers = [copy.copy(layer) for layer in layers]
    for layer in c.layers[start_layer:]:
        layer.batch_repeat_interleave(m)
    return c


def _stacked_context(ctx: Context, venc: Encoded, m: int, start_layer: int, resid: Activations,
                     dtype: torch.dtype) -> Context:
    """``ctx`` (start layer 0) with every prompt repeated ``m`` times (caller order ``v * n + i`` in ``venc``) and,
    for ``start_layer > 0``, the unpatched residual stream at block ``start_layer`` (``resid_pre`` captured at the
    last ``ctx.k`` positions or more) so that earlier blocks are skipped."""
    n = len(ctx.enc)
    parts = []
    for part in ctx.parts:
        b, ids = part.batch, part.ids
        c = _repeat_cache(part.cache, m, start_layer)
        index = [v * n + i for i in b.index for v in range(m)]
        vb = Batch(index, b.input_ids.repeat_interleave(m, 0), b.attention_mask.repeat_interleave(m, 0))
        h = None
        if start_layer > 0:
            h = resid.get("resid_pre", start_layer, list(range(-ctx.k, 0)))[b.index]  # [batch, k, d_model]
            h = h.to(device=ids.device, dtype=dtype).repeat_interleave(m, 0)
        parts.append(ContextPart(vb, c, ids.repeat_interleave(m, 0), part.positions.repeat_interleave(m, 0),
                                 part.mask.repeat_interleave(m, 0), h))
    return ctx.derive(parts, enc=venc, start_layer=start_layer)


# ------------------------------------------------------------------------------------------------ sweep
def plan_passes(components: Sequence[Component], max_variants: int) -> list[list[int]]:
    """Group component indices into stacked passes: components sharing ``(layer, depth)`` in balanced chunks of at
    most ``max_variants``, deepest layers first (their passes are the cheapest), in component order within a
    group."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for j, c in enumerate(components):
        groups[(c.layer, c.depth)].append(j)
    plan = []
    for key in sorted(groups, key=lambda t: (-t[0], t[1])):
        g = groups[key]
        n_chunks = -(-len(g) // max(1, max_variants))
        size = -(-len(g) // n_chunks)  # balanced: 17 with at most 16 per pass -> 9 + 8, not 16 + 1
        plan += [g[s : s + size] for s in range(0, len(g), size)]
    return plan


def max_variants(batch_size: int, n_prompts: int, max_rows: int) -> int:
    """How many components one stacked pass holds: ``max_rows // min(batch_size, n_prompts)``, at least 1."""
    return max(1, max_rows // max(1, min(batch_size, n_prompts)))


@dataclass
class PatchResult:
    """Refusal scores of every component patched alone, per direction and pair.

    Attributes:
        components: the components, in the order of the score rows.
        scores: ``{direction: [n_components, n_pairs] float64}`` refusal scores of the patched runs.
        clean: ``[n_pairs]`` unpatched scores of the clean (harmful) prompts.
        corrupt: ``[n_pairs]`` unpatched scores of the corrupted (harmless) prompts.
        n_passes: stacked forward passes run in the sweep (all directions).
        timings: seconds: ``prepare`` (contexts, captures) and ``sweep``.
    """

    components: list[Component]
    scores: dict[str, np.ndarray]
    clean: np.ndarray
    corrupt: np.ndarray
    n_passes: int = 0
    timings: dict = field(default_factory=dict)


def _values(acts: Activations, c: Component, lay: HeadLayout | None) -> torch.Tensor:
    if c.site == HEAD_SITE:
        v = acts.get(HEAD_SITE, c.layer, c.positions)
        return v if c.head is None else v[..., lay.head_slice(c.head)]
    return acts.get(c.site, c.layer, c.positions)


def run_patching(runner: Runner, clean: Encoded, corrupt: Encoded, components: Sequence[Component],
                 refusal_ids: list[int], directions: Sequence[str] = DIRECTIONS, *, max_rows: int = 256,
                 on_pass: Callable[[int], None] | None = None) -> PatchResult:
    """Patch each component alone, denoising and/or noising, and score every pair.

    ``clean[i]`` and ``corrupt[i]`` form pair ``i`` (see :func:`pair_by_length`). Denoising runs the corrupted
    prompts with the clean activation of the component copied in; noising runs the clean prompts with the
    corrupted one. Source activations are captured once per set (one pass over the last ``K`` tokens, ``K`` the
    deepest component position); each pass then computes only the last ``depth`` tokens of every prompt through
    blocks ``layer..n_layers-1``, for up to ``max_rows // batch_size`` components stacked together (see the module
    docstring). Exact up to float rounding.

    Args:
        runner: a :class:`toolkit.runner.Runner` (its batch size sets the base batches).
        clean, corrupt: encoded harmful and harmless prompts, same count, pair by pair.
        components: what to patch (:func:`site_components`, :func:`head_components`).
        refusal_ids: refusal-opener token ids (:func:`toolkit.scoring.refusal_token_ids`).
        directions: ``denoise`` and/or ``noise``.
        max_rows: at most about this many rows per stacked forward pass (memory: each row holds a copy of its
            prompt's key/value cache).
        on_pass: called after each stacked pass with the number of components it scored.

    Returns:
        A :class:`PatchResult`.

    Raises:
        ToolkitError: sets of different sizes or empty, no component, an unknown direction, a component the model
            does not have (site, layer, head), or a position beyond a prompt.
    """
    import time

    if len(clean) != len(corrupt) or len(clean) == 0:
        raise ToolkitError(f"patching needs pairs: {len(clean)} clean and {len(corrupt)} corrupted prompts")
    if not components:
        raise ToolkitError("nothing to patch: no component")
    directions = list(dict.fromkeys(directions))
    for d in directions:
        if d not in DIRECTIONS:
            raise ToolkitError(f"unknown patching direction {d!r}; choose denoise, noise or both")
    if not directions:
        raise ToolkitError("no patching direction")
    model = runner.model
    components = list(components)
    lay = head_layout(model) if any(c.site == HEAD_SITE for c in components) else None
    for c in components:
        if c.site not in PATCH_SITES:
            raise ToolkitError(f"unknown hook site {c.site!r}; choose from {', '.join(PATCH_SITES)}")
        check_layer(model, c.layer)
        check_positions(c.positions)
        if c.head is not None and not 0 <= c.head < lay.n_heads:
            raise ToolkitError(f"head {c.head} is out of range: this model has {lay.n_heads} query heads")
    n = len(clean)
    big_k = max(c.depth for c in components)
    shortest = min(len(x) for x in clean.ids + corrupt.ids)
    if shortest < big_k + 1:
        raise ToolkitError(f"position {-big_k} needs prompts of at least {big_k + 1} tokens, but the shortest paired "
                           f"prompt has {shortest}")
    layers: dict[str, set] = defaultdict(set)
    for c in components:
        layers[c.site].add(check_layer(model, c.layer))
        if c.layer > 0:
            layers["resid_pre"].add(check_layer(model, c.layer))
    layers = {s: sorted(ls) for s, ls in layers.items()}
    positions = list(range(-big_k, 0))
    t0 = time.time()
    sets = {"clean": clean, "corrupt": corrupt}
    ctxs, acts, base = {}, {}, {}
    for key, enc in sets.items():
        ctx = runner.context(enc, big_k, desc=f"context ({key})")
        logits, acts[key] = capture(runner, enc, layers, positions, context=ctx, desc=f"capture ({key})")
        base[key] = refusal_score(logits, refusal_ids).numpy()
        ctxs[key] = {big_k: ctx}
    targets = {"denoise": "corrupt", "noise": "clean"}
    for tgt in {targets[d] for d in directions}:
        ctxs[tgt] = _contexts_by_depth(runner, ctxs[tgt][big_k], [c.depth for c in components])
    timings = {"prepare": time.time() - t0}

    t0 = time.time()
    plan = plan_passes(components, max_variants(runner.batch_size, n, max_rows))
    scores = {d: np.full((len(components), n), np.nan) for d in directions}
    venc: dict = {}
    for d in directions:
        tgt = targets[d]
        src = "clean" if tgt == "corrupt" else "corrupt"
        for chunk in plan:
            comps = [components[j] for j in chunk]
            m, c0 = len(comps), comps[0]
            if (tgt, m) not in venc:
                venc[(tgt, m)] = Encoded(sets[tgt].ids * m, sets[tgt].prefix_len)
            sctx = _stacked_context(ctxs[tgt][c0.depth], venc[(tgt, m)], m, c0.layer, acts[tgt], runner.lm.dtype)
            vals = [_values(acts[src], c, lay) for c in comps]
            with patching(runner, comps, vals, n):
                logits = runner.logits(venc[(tgt, m)], desc=f"patch {c0.label}", context=sctx)
            scores[d][chunk] = refusal_score(logits, refusal_ids).numpy().reshape(m, n)
            del sctx
            if on_pass is not None:
                on_pass(m)
    timings["sweep"] = time.time() - t0
    return PatchResult(components, scores, base["clean"], base["corrupt"], len(plan) * len(directions), timings)


# ------------------------------------------------------------------------------------------- statistics
def normalised_effect(patched: np.ndarray, clean: np.ndarray, corrupt: np.ndarray, n_boot: int = 1000,
                      seed: int = 0, level: float = 0.95) -> dict[str, np.ndarray]:
    """Normalised patching effect from means over pairs, with a percentile bootstrap interval over pairs.

    ``normalised = (mean(patched) - mean(corrupt)) / (mean(clean) - mean(corrupt))``: 0 is the corrupted
    baseline, 1 the clean one (Heimersheim & Nanda 2024; a ratio of means rather than a mean of per-pair ratios,
    which is unstable when a pair's clean and corrupt scores are close). The bootstrap resamples pairs with
    replacement (the same pairs for patched, clean and corrupt) ``n_boot`` times through
    :func:`toolkit.stats.resampling.bootstrap` (``scipy.stats.bootstrap`` on the pair indices, seeded by
    ``seed``); each resample is applied as averaging weights, so all components share one matrix product. A
    resample whose clean and corrupt means coincide has no ratio (NaN) and is left out of the interval
    (:func:`toolkit.stats.resampling.percentile_interval`).

    Args:
        patched: ``[n_components, n_pairs]`` patched scores.
        clean, corrupt: ``[n_pairs]`` unpatched scores.
        n_boot: resamples (0: no interval).
        level: interval coverage.

    Returns:
        ``{"mean_score", "normalised", "ci_low", "ci_high": [n_components]}`` (intervals NaN without resamples or
        with one pair) and ``"gap"``: ``mean(clean) - mean(corrupt)`` (a 0-d array).

    Raises:
        ToolkitError: mismatched shapes.
    """
    patched = np.atleast_2d(np.asarray(patched, dtype=np.float64))
    clean = np.asarray(clean, dtype=np.float64)
    corrupt = np.asarray(corrupt, dtype=np.float64)
    n = clean.shape[0]
    if corrupt.shape != (n,) or patched.shape[1] != n:
        raise ToolkitError(f"scores of {patched.shape[1]}, {n} and {corrupt.shape[0]} pairs do not match")
    gap = clean.mean() - corrupt.mean()
    mean = patched.mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = (mean - corrupt.mean()) / gap
    lo = np.full(len(mean), np.nan)
    hi = np.full(len(mean), np.nan)
    if n_boot > 0 and n > 1:
        def ratio(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            """Resampled pair indices ``[batch, n_pairs]`` -> normalised effects ``[n_components, batch]``."""
            w = averaging_weights(idx, n)  # [batch, n_pairs]
            pm, cl, co = patched @ w.T, w @ clean, w @ corrupt  # [C, batch], [batch], [batch]
            with np.errstate(divide="ignore", invalid="ignore"):
                r = (pm - co) / (cl - co)
            r[~np.isfinite(r)] = np.nan
            return r

        res = bootstrap((np.arange(n),), ratio, n_resamples=n_boot, seed=seed, confidence=level, vectorized=True)
        lo, hi = res.low, res.high
    return {"mean_score": mean, "normalised": norm, "ci_low": lo, "ci_high": hi, "gap": np.asarray(gap)}
