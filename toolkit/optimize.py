"""Automated abliteration search: the search space, the per-model inputs computed once, a trial's objectives, and
the Pareto front (Optuna multi-objective TPE, as Heretic; p-e-w/heretic).

A trial's parameters (:class:`SearchSpace`) are all depth-free (fractions of depth, weights, switches), so a trial of
one model can be enqueued on another (a warm-start profile). :class:`SearchState` holds what every trial reuses:
per-layer difference-in-means directions at one prompt position, the harmless mean, each residual writer's mean
output (the affine form's reference) and the per-layer separation of harmful from harmless prompts along each
direction (the activation-scaled weights). :meth:`SearchState.edit` turns parameters into a
:class:`toolkit.abliteration.WeightEdit`; :class:`TrialEvaluator` measures it with hooks (no weight copies).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .abliteration import (COMPONENTS, FORMS, Kernel, WeightEdit, direction_at, edit_hooks, layer_separation,
                           orthogonalize_to, unit_rows)
from .errors import ToolkitError
from .hooks import Reach, hooked
from .runner import Encoded, Runner

OBJECTIVES = {  # name -> (Optuna direction, description)
    "refusal": ("minimize", "refusal rate on the harmful validation prompts by the judge"),
    "kl": ("minimize", "first-token KL divergence from the unedited model on the harmless validation prompts (nats)"),
    "kl_multi": ("minimize", "mean per-token KL over the unedited model's own greedy completions of the harmless "
                 "validation prompts (nats)"),
    "capability": ("maximize", "multiple-choice capability accuracy (cloze-scored)"),
    "over_refusal": ("minimize", "refusal rate on the borderline (benign) validation prompts"),
}


def parse_objectives(spec: str) -> tuple[str, ...]:
    """``"refusal,kl"`` -> ``("refusal", "kl")``: distinct names from :data:`OBJECTIVES`, in the order given.

    Raises:
        ToolkitError: empty, unknown or repeated names.
    """
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ToolkitError("give at least one objective", param="objectives")
    bad = [n for n in names if n not in OBJECTIVES]
    if bad:
        raise ToolkitError(f"unknown objective {bad[0]!r}; choose from {', '.join(OBJECTIVES)}", param="objectives")
    if len(set(names)) != len(names):
        raise ToolkitError("an objective is named twice", param="objectives")
    return tuple(names)


@dataclass(frozen=True)
class SearchSpace:
    """The parameters a trial draws, with their ranges; every range is Heretic 1.4's unless said otherwise.

    Positions and distances are fractions of ``n_layers - 1`` (Heretic draws them in layers over the same fractions),
    so that parameters carry over between models of different depth.

    Attributes:
        scopes: ``"global"`` (one direction at a fractional layer index, interpolated between adjacent layers'
            directions) and/or ``"per_layer"`` (each layer's edit removes the direction read at its own output).
        direction_range: the global direction's position as a fraction of depth (Heretic: ``[0.4, 0.9]`` of the last
            layer index; shifted by one layer here because our directions are read at a block's input, Heretic's at
            its output).
        attn_max_weight, mlp_max_weight: peak strength ranges; the MLP's lower bound is negative and clamped at 0 so
            the search can switch MLP ablation off (Heretic issue #202).
        position_range: the kernel's peak, fraction of depth.
        min_weight_range: the kernel's edge strength as a fraction of its peak.
        distance_range: the kernel's half-width as a fraction of depth, at least one layer (Heretic: ``[1, 0.6 (L -
            1)]`` layers).
        forms: edit forms the search may take (:data:`toolkit.abliteration.FORMS`).
        orthogonalize: whether directions are made orthogonal to the harmless mean (projected abliteration, grimjim
            2025; Heretic's default is on), as choices.
        activation_scaled: whether per-layer strengths are multiplied by the layer's separation (seed proposal 3).
    """

    scopes: tuple[str, ...] = ("global", "per_layer")
    direction_range: tuple[float, float] = (0.4, 0.9)
    attn_max_weight: tuple[float, float] = (0.8, 1.5)
    mlp_max_weight: tuple[float, float] = (-0.25, 1.5)
    position_range: tuple[float, float] = (0.6, 1.0)
    min_weight_range: tuple[float, float] = (0.0, 1.0)
    distance_range: tuple[float, float] = (0.05, 0.6)
    forms: tuple[str, ...] = FORMS
    orthogonalize: tuple[bool, ...] = (True, False)
    activation_scaled: tuple[bool, ...] = (False, True)

    def __post_init__(self):
        for f in self.forms:
            if f not in FORMS:
                raise ToolkitError(f"unknown edit form {f!r}; choose from {', '.join(FORMS)}", param="forms")
        for s in self.scopes:
            if s not in ("global", "per_layer"):
                raise ToolkitError(f"unknown direction scope {s!r}; choose global or per_layer", param="scopes")
        if not self.forms or not self.scopes:
            raise ToolkitError("the search needs at least one form and one scope")

    def suggest(self, trial) -> dict:
        """Draw one trial's parameters from an Optuna ``trial`` (every parameter is drawn every time, as multivariate
        TPE needs; a categorical with one choice is fixed, not drawn).

        Returns:
            ``{name: value}`` (the Optuna parameters plus the fixed ones).
        """
        p = {}

        def cat(name, choices):
            p[name] = choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))

        cat("scope", self.scopes)
        p["direction"] = trial.suggest_float("direction", *self.direction_range)
        for comp, rng in (("attn", self.attn_max_weight), ("mlp", self.mlp_max_weight)):
            p[f"{comp}.max_weight"] = trial.suggest_float(f"{comp}.max_weight", *rng)
            p[f"{comp}.position"] = trial.suggest_float(f"{comp}.position", *self.position_range)
            p[f"{comp}.min_weight"] = trial.suggest_float(f"{comp}.min_weight", *self.min_weight_range)
            p[f"{comp}.distance"] = trial.suggest_float(f"{comp}.distance", *self.distance_range)
        cat("form", self.forms)
        cat("orthogonalize", self.orthogonalize)
        cat("activation_scaled", self.activation_scaled)
        return p

    def fixed(self) -> dict:
        """The parameters that are not drawn because they have one choice."""
        out = {}
        for name, choices in (("scope", self.scopes), ("form", self.forms), ("orthogonalize", self.orthogonalize),
                              ("activation_scaled", self.activation_scaled)):
            if len(choices) == 1:
                out[name] = choices[0]
        return out

    def describe(self) -> dict:
        """JSON-ready ranges and choices."""
        return {k: list(v) for k, v in asdict(self).items()}


def _separation(xh: torch.Tensor, xb: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Per-layer Cohen's d of the projections on each layer's unit direction (kept name of
    :func:`toolkit.abliteration.layer_separation`). ``xh, xb``: ``[n, n_layers, d_model]``; ``dirs``:
    ``[n_layers, d_model]`` unit rows. Returns ``[n_layers]`` float64."""
    return layer_separation(xh, xb, dirs)


@dataclass(frozen=True)
class SearchState:
    """Per-model inputs of every trial, computed once (:func:`compute_search_state`) and saved with the run.

    Attributes:
        directions: ``[n_layers, d_model]`` float32 difference-in-means (harmful minus harmless) at ``resid_pre`` of
            each layer, at prompt position ``position``.
        harmless_mean: ``[n_layers, d_model]`` float32 harmless mean at the same sites.
        module_means: ``{"attn": [n_layers, d_model], "mlp": [...]}`` float32 mean output of each layer's ``o_proj``
            and ``down_proj`` over the harmless prompts' tokens (the affine form's reference).
        separation: ``{"raw": [n_layers], "orthogonal": [n_layers]}`` float64 Cohen's d of harmful vs harmless
            projections on each layer's direction (unit; plain or made orthogonal to the harmless mean).
        position: the prompt position the directions were read at (negative).
        model_hash, model_id: the model's.
        meta: provenance (prompt sets, counts).
    """

    directions: torch.Tensor
    harmless_mean: torch.Tensor
    module_means: dict
    separation: dict
    position: int = -1
    model_hash: str | None = None
    model_id: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        """Number of layers."""
        return int(self.directions.shape[0])

    def edit(self, params: dict) -> WeightEdit:
        """The :class:`WeightEdit` of one trial's parameters (:meth:`SearchSpace.suggest`).

        Directions: per layer, raw or orthogonal to the harmless mean; ``global`` scope interpolates at index
        ``1 + direction * (n_layers - 1)`` (at most ``n_layers - 1``); ``per_layer`` scope edits layer ``l`` with the
        direction read at its output (row ``l + 1``; the last layer uses its own row). Strengths: Heretic's kernel per
        component (``max_weight`` clamped at 0; ``min_weight`` a fraction of it; position and half-width fractions of
        ``n_layers - 1``, half-width at least one layer), times ``separation / max(separation)`` (clamped at 0) with
        ``activation_scaled``. Affine references: each module's mean output projected on its layer's direction.

        Raises:
            ToolkitError: a missing or out-of-range parameter.
        """
        try:
            L = self.n_layers
            orth = bool(params["orthogonalize"])
            dirs = self.unit_directions(orth)
            if params["scope"] == "global":
                idx = min(1.0 + float(params["direction"]) * (L - 1), float(L - 1))
                rows = direction_at(dirs, idx).expand(L, -1).clone()
            else:
                rows = dirs[[min(l + 1, L - 1) for l in range(L)]]
            strengths = {}
            span = max(L - 1, 1)
            for comp in COMPONENTS:
                mw = max(0.0, float(params[f"{comp}.max_weight"]))
                k = Kernel(mw, float(params[f"{comp}.position"]) * span, float(params[f"{comp}.min_weight"]) * mw,
                           max(1.0, float(params[f"{comp}.distance"]) * span))
                strengths[comp] = k.weights(L)
            if params.get("activation_scaled"):
                sep = self.separation["orthogonal" if orth else "raw"].clamp(min=0)
                scale = sep / sep.max() if float(sep.max()) > 0 else torch.zeros_like(sep)
                strengths = {c: w * scale for c, w in strengths.items()}
            refs = None
            if params["form"] == "affine":
                refs = {c: (self.module_means[c].double() * rows).sum(-1) for c in COMPONENTS}
            return WeightEdit(rows, strengths, params["form"], refs, meta={"params": dict(params)})
        except KeyError as e:
            raise ToolkitError(f"trial parameters lack {e.args[0]!r}") from None

    def unit_directions(self, orthogonal: bool = False) -> torch.Tensor:
        """``[n_layers, d_model]`` float64 unit directions, plain or orthogonal to the harmless mean
        (:func:`toolkit.abliteration.orthogonalize_to`). Row 0 (the block-0 input: at a template position every prompt
        has the same token there, so the difference is zero) is used by no edit and is left at zero when it is zero.

        Raises:
            ToolkitError: a zero or non-finite direction at a layer above 0.
        """
        out = torch.zeros(self.directions.shape, dtype=torch.float64)
        first = 1 if float(self.directions[0].double().norm()) == 0.0 else 0
        rest = self.directions[first:]
        out[first:] = orthogonalize_to(rest, self.harmless_mean[first:]) if orthogonal else unit_rows(rest)
        return out

    def save(self, path: Path) -> None:
        """Write the state as one safetensors file (tensors float32/float64, metadata as JSON)."""
        from safetensors.torch import save_file

        t = {"directions": self.directions.float().contiguous(), "harmless_mean": self.harmless_mean.float().contiguous()}
        t.update({f"module_mean.{c}": v.float().contiguous() for c, v in self.module_means.items()})
        t.update({f"separation.{k}": v.double().contiguous() for k, v in self.separation.items()})
        meta = {"position": self.position, "model_hash": self.model_hash, "model_id": self.model_id, "meta": self.meta,
                "schema": 1}
        save_file(t, str(path), metadata={"meta": json.dumps(meta, sort_keys=True)})

    def to_bytes(self) -> bytes:
        """The :meth:`save` file's bytes (for a study's storage, so that workers elsewhere read the same state)."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "s.safetensors"
            self.save(p)
            return p.read_bytes()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "search state") -> "SearchState":
        """Read :meth:`to_bytes` output.

        Raises:
            ToolkitError: not a search-state file.
        """
        from safetensors.torch import load

        try:
            t = load(data)
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            meta = json.loads(header["__metadata__"]["meta"])
            return cls(t["directions"], t["harmless_mean"],
                       {c: t[f"module_mean.{c}"] for c in COMPONENTS},
                       {k: t[f"separation.{k}"] for k in ("raw", "orthogonal")},
                       int(meta["position"]), meta.get("model_hash"), meta.get("model_id"), meta.get("meta") or {})
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise ToolkitError(f"{source} is not a search-state file ({type(e).__name__}: {e})") from None
        except Exception as e:  # safetensors' own errors
            if type(e).__module__.startswith("safetensors"):
                raise ToolkitError(f"{source} is not a search-state file ({e})") from None
            raise

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        """Read a :meth:`save` file.

        Raises:
            ToolkitError: missing or not a search-state file.
        """
        path = Path(path)
        if not path.is_file():
            raise ToolkitError(f"no search state at {path}")
        return cls.from_bytes(path.read_bytes(), str(path))


def module_means(runner: Runner, enc: Encoded, desc: str = "writer means") -> dict:
    """Mean output of every layer's ``o_proj`` and ``down_proj`` over the prompt tokens of ``enc`` (the template
    prefix shared by all prompts excluded; in each batch the last ``min_len`` positions, which are real tokens for
    every row, so no padding is counted). One pass that reads the decoder (one LM-head column), float64 sums.

    The affine edit's reference levels (Marshall et al. 2024): ``c = mean . r_hat`` per module (project).

    Args:
        runner: the model's runner.
        enc: encoded prompts (e.g. the harmless training prompts).
        desc: progress-bar label.

    Returns:
        ``{"attn": [n_layers, d_model], "mlp": [n_layers, d_model]}`` float32 (residual-stream units).
    """
    L, d = runner.lm.n_layers, runner.lm.d_model
    sums = {c: torch.zeros(L, d, dtype=torch.float64) for c in COMPONENTS}
    counts = {c: torch.zeros(L, dtype=torch.float64) for c in COMPONENTS}

    def make(comp, layer):
        def fn(y, ctx):
            if not ctx.in_prompt:
                return None
            m = y.shape[1] if ctx.state.min_len is None else min(ctx.state.min_len, y.shape[1])
            sel = y[:, -m:].double().cpu()
            sums[comp][layer] += sel.sum((0, 1))
            counts[comp][layer] += sel.shape[0] * sel.shape[1]
            return None
        return fn

    specs = [(site, l, make(comp, l)) for l in range(L) for comp, site in COMPONENTS.items()]
    with hooked(runner.model, specs, write=False, reach=Reach(read=True)):
        runner.logits(enc, desc=desc, columns=[0])  # the decoder is what is read: one LM-head row, not the vocabulary
    return {c: (sums[c] / counts[c].clamp(min=1).unsqueeze(1)).float() for c in COMPONENTS}


_module_means = module_means  # the former private name


def compute_search_state(runner: Runner, harmful: Encoded, harmless: Encoded, position: int = -1,
                         meta: dict | None = None) -> SearchState:
    """The per-model inputs of a search from training prompts: one pass per set reads ``resid_pre`` of every layer at
    ``position`` (stopping after the last block; no LM head), one more over the harmless prompts reads the writers'
    mean outputs. Statistics in float64.

    Args:
        runner: the model's runner.
        harmful, harmless: encoded training prompts.
        position: negative prompt position (Heretic reads the last token, -1).

    Raises:
        ToolkitError: a non-negative position or one beyond a prompt; fewer than one prompt per set.
    """
    if position >= 0:
        raise ToolkitError(f"position must be negative (from the end of the prompt), got {position}", param="position")
    if len(harmful) < 1 or len(harmless) < 1:
        raise ToolkitError("the search needs harmful and harmless training prompts")
    L = runner.lm.n_layers
    xh = runner.collect(harmful, range(L), ["resid_pre"], [position], desc="harmful residuals")["resid_pre"][:, :, 0]
    xb = runner.collect(harmless, range(L), ["resid_pre"], [position], desc="harmless residuals")["resid_pre"][:, :, 0]
    mh, mb = xh.double().mean(0), xb.double().mean(0)
    raw = mh - mb
    means = module_means(runner, harmless, "writer means")
    state = SearchState(raw.float(), mb.float(), means, {}, position, runner.lm.model_hash, runner.lm.model_id,
                        dict(meta or {}, n_harmful=len(harmful), n_harmless=len(harmless)))
    sep = {"raw": _separation(xh, xb, state.unit_directions(False)),
           "orthogonal": _separation(xh, xb, state.unit_directions(True))}
    object.__setattr__(state, "separation", sep)
    return state


class TrialEvaluator:
    """Measures one edit on the validation prompts, with the edit applied as hooks (:func:`edit_hooks`).

    Everything about the unedited model is computed once at construction: its first-token logits on the harmless
    prompts and, for ``kl_multi``, its greedy reference completions.

    Args:
        runner: the model's runner.
        objectives: names from :data:`OBJECTIVES`.
        harmful: encoded harmful validation prompts and their texts (``refusal``).
        harmless: encoded harmless validation prompts (``kl``, ``kl_multi``).
        judge: the refusal :class:`toolkit.judges.Judge`.
        refusal_ids: refusal opener token ids (the judged measure reports the refusal score beside).
        gen_tokens: greedy completion length judged.
        kl_tokens: reference completion length for ``kl_multi``.
        borderline: encoded borderline prompts and texts (``over_refusal``), or None.
        capability: a :class:`toolkit.capability.CapabilitySet` (``capability``), or None.

    Raises:
        ToolkitError: an objective whose inputs are missing.
    """

    def __init__(self, runner: Runner, objectives: Sequence[str], *, harmful: tuple[Encoded, list[str]],
                 harmless: Encoded, judge, refusal_ids: Sequence[int], gen_tokens: int = 12, kl_tokens: int = 16,
                 borderline: tuple[Encoded, list[str]] | None = None, capability=None):
        from .evaluation import evaluate

        self.runner, self.objectives = runner, tuple(objectives)
        self.harmful, self.harmless, self.borderline = harmful, harmless, borderline
        self.judge, self.refusal_ids, self.gen_tokens = judge, list(refusal_ids), gen_tokens
        self.capability = capability
        if "over_refusal" in self.objectives and borderline is None:
            raise ToolkitError("the over_refusal objective needs a borderline prompt set", param="objectives")
        if "capability" in self.objectives and capability is None:
            raise ToolkitError("the capability objective needs a capability set", param="objectives")
        if gen_tokens < 1 and ("refusal" in self.objectives or "over_refusal" in self.objectives):
            raise ToolkitError("judged objectives need gen_tokens >= 1", param="gen_tokens")
        self.base_logits = runner.logits(harmless, desc="base harmless logits")
        self.references = None
        if "kl_multi" in self.objectives:
            from .damage import reference_completions

            toks = evaluate(runner, harmless, [], gen_tokens=kl_tokens, desc="reference completions").tokens
            self.references = reference_completions(toks, kl_tokens)

    def _refusal(self, enc_texts, edit, desc) -> tuple[float, object]:
        from .evaluation import evaluate, judged

        enc, texts = enc_texts
        ev = evaluate(self.runner, enc, judged(self.refusal_ids, self.judge, texts), gen_tokens=self.gen_tokens,
                      intervention=edit_hooks(self.runner.model, edit) if edit is not None else None, desc=desc)
        return float(np.mean(ev.refusals)), ev

    def __call__(self, edit: WeightEdit | None) -> dict:
        """The objectives' values for ``edit`` (None: the unedited model), plus ``kl`` always.

        Returns:
            ``{objective: float}`` (rates in [0, 1], KL in nats, accuracy in [0, 1]).
        """
        from .scoring import kl_divergence

        r, model = self.runner, self.runner.model
        out = {}
        hooks = (lambda: edit_hooks(model, edit)) if edit is not None else None
        if "refusal" in self.objectives:
            out["refusal"], _ = self._refusal(self.harmful, edit, "trial harmful")
        if hooks is None:
            out["kl"] = 0.0
        else:
            with hooks():
                lg = r.logits(self.harmless, desc="trial harmless")
            out["kl"] = float(kl_divergence(self.base_logits, lg).mean())
        if "kl_multi" in self.objectives:
            if hooks is None:
                out["kl_multi"] = 0.0
            else:
                from .damage import forced_damage

                out["kl_multi"] = forced_damage(r, self.harmless, self.references, hooks, desc="trial multi-token KL"
                                                ).summary()["kl_multi"]
        if "over_refusal" in self.objectives:
            out["over_refusal"], _ = self._refusal(self.borderline, edit, "trial borderline")
        if "capability" in self.objectives:
            from .capability import capability_check

            out["capability"] = capability_check(r, self.capability, intervention=hooks() if hooks else None,
                                                 desc="trial capability").accuracy
        return out


def pareto_mask(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Which rows of ``values`` ``[n, k]`` are Pareto-optimal (no other row is at least as good on every objective
    and better on one), with ``directions`` ``"minimize"``/``"maximize"`` per column. Returns ``[n]`` bool."""
    v = np.asarray(values, dtype=float).copy()
    for j, d in enumerate(directions):
        if d == "maximize":
            v[:, j] = -v[:, j]
    n = len(v)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(v <= v[i], axis=1) & np.any(v < v[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def choose_trial(front, kl_max: float, refusal_key: str = "refusal", kl_key: str = "kl"):
    """The trial a user would take from a front (a pandas DataFrame with ``trial``, ``refusal`` and ``kl`` columns):
    the fewest refusals among trials with ``kl <= kl_max`` (ties: lower KL), else the lowest-KL trial.

    Returns:
        ``(row, rule)``: the chosen row (a pandas Series) and a sentence saying which rule picked it.

    Raises:
        ToolkitError: an empty front.
    """
    if front is None or len(front) == 0:
        raise ToolkitError("the study has no finished trial to choose from")
    ok = front[front[kl_key] <= kl_max]
    if len(ok):
        row = ok.sort_values([refusal_key, kl_key]).iloc[0]
        return row, f"fewest refusals with KL <= {kl_max:g}"
    row = front.sort_values([kl_key, refusal_key]).iloc[0]
    return row, f"no front trial has KL <= {kl_max:g}: the lowest-KL trial"


def depth_profile(front_params: list[dict], model: dict, objectives: Sequence[str]) -> dict:
    """A warm-start profile: front trials' parameters (all depth-free) with the source model's description.

    Returns:
        ``{"schema": 1, "kind": "refusal-toolkit optimize profile", "model": ..., "objectives": [...],
        "trials": [params, ...]}``.
    """
    return {"schema": 1, "kind": "refusal-toolkit optimize profile", "model": model, "objectives": list(objectives),
            "trials": [dict(p) for p in front_params]}


def read_profile(path: Path, space: SearchSpace) -> list[dict]:
    """The trials of a warm-start profile (:func:`depth_profile`), as Optuna parameter dicts for ``enqueue_trial``,
    keeping only parameters this search draws (fixed ones are dropped; out-of-range values are clipped to the range).

    Raises:
        ToolkitError: missing or malformed profile.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "profile.json"
    try:
        doc = json.loads(path.read_text())
        trials = doc["trials"]
        if doc.get("kind") != "refusal-toolkit optimize profile" or not isinstance(trials, list):
            raise ValueError("not a profile")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ToolkitError(f"{path} is not an optimize profile ({type(e).__name__}: {e})", param="warm_start") from None
    ranges = {"direction": space.direction_range, "attn.max_weight": space.attn_max_weight,
              "mlp.max_weight": space.mlp_max_weight}
    for comp in COMPONENTS:
        ranges.update({f"{comp}.position": space.position_range, f"{comp}.min_weight": space.min_weight_range,
                       f"{comp}.distance": space.distance_range})
    choices = {"scope": space.scopes, "form": space.forms, "orthogonalize": space.orthogonalize,
               "activation_scaled": space.activation_scaled}
    out = []
    for t in trials:
        p = {}
        for k, (lo, hi) in ranges.items():
            if k in t and isinstance(t[k], (int, float)) and math.isfinite(t[k]):
                p[k] = min(max(float(t[k]), lo), hi)
        for k, ch in choices.items():
            if len(ch) > 1 and k in t and t[k] in ch:
                p[k] = t[k]
        if p:
            out.append(p)
    return out
