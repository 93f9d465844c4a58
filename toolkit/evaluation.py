"""One evaluation path: run a prompt set once under an optional intervention, then compute pluggable measures.

:func:`evaluate` is the only place where the toolkit turns a pass over prompts into per-prompt figures; every
command (score, extract's selection, ablate, steer, dose-response, cones' ablation test) goes through it. A pass
is either last-position logits (one forward pass, optionally over a :class:`toolkit.runner.Context`) or, with
``gen_tokens > 0``, greedy generation, whose first step gives the same logits, so generating costs no extra
prompt pass. The intervention (a hook context manager such as
:func:`toolkit.interventions.activation_addition`) is open during that pass only; the measures are computed
after it is closed, so a measure that runs the model again (coherence: the *unmodified* model's likelihood of
the completion) never sees it.

A measure is an object with a ``name`` (the key of its per-prompt values), a ``needs`` set naming what it reads
(``"logits"``, ``"completions"``) and a ``compute(ev, runner, enc)`` method returning ``[n]`` values. Measures
that need completions are skipped, and their values absent (None), when nothing was generated. The built-in
measures:

* :class:`RefusalScore` (``"score"``): Arditi et al. 2024's logit refusal score
  (:func:`toolkit.scoring.refusal_score`).
* :class:`Judged` (``"refusal"``, ``"verdict"``, ``"confidence"``, ``"refusal@W"``): a refusal judge of
  :mod:`toolkit.judges` over the completions, also at shorter windows; :func:`MarkerJudge` is the marker judge.
  A measure may return a dict of value arrays instead of one array.
* :class:`Degeneration` (``"degenerate"``): the OBLITERATUS degeneration rule (:func:`toolkit.scoring.is_degenerate`).
* :class:`Coherence` (``"coherence"``): mean per-token log-likelihood of the completion under the unmodified model
  (:meth:`toolkit.runner.Runner.continuation_logprob`), nats/token.
* :class:`KLFromBase` (``"kl"``): ``KL(base || this)`` of the next-token distribution at the last prompt position,
  nats (:func:`toolkit.scoring.kl_divergence`), against a baseline :class:`Evaluation` of the same prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from .errors import ToolkitError
from .runner import Context, Encoded, Runner
from .scoring import is_degenerate, kl_divergence, refusal_score


@dataclass
class Evaluation:
    """Per-prompt results of one pass over a prompt set.

    Attributes:
        logits: ``[n, vocab]`` float32 next-token logits at the last prompt position (None for a baseline read
            back from a run, which stores no logits).
        completions: greedy completions (text, special tokens removed), or None if nothing was generated.
        tokens: the generated token ids per prompt, cut before the first end-of-sequence or padding token, or None.
        values: ``{measure name: [n] array}`` for every measure computed.
    """

    logits: torch.Tensor | None
    completions: list[str] | None = None
    tokens: list[list[int]] | None = None
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, name: str) -> np.ndarray | None:
        """The per-prompt values of measure ``name``, or None when it was not computed."""
        return self.values.get(name)

    @property
    def scores(self) -> np.ndarray:
        """``[n]`` float64 logit refusal scores (measure ``"score"``).

        Raises:
            ToolkitError: the evaluation was made without :class:`RefusalScore`.
        """
        if "score" not in self.values:
            raise ToolkitError("this evaluation has no refusal scores (no RefusalScore measure)")
        return self.values["score"]

    @property
    def refusals(self) -> np.ndarray | None:
        """``[n]`` bool: the judge's verdict is ``refusal`` (measure ``"refusal"``), or None without completions."""
        return self.values.get("refusal")

    @property
    def noncompliance(self) -> np.ndarray | None:
        """``[n]`` bool: the judge's verdict is not ``compliance`` (a refusal, or ``other``: off-topic, evasive,
        empty or degenerate), i.e. the model did not do what was asked; None without completions."""
        if "verdict" in self.values:
            return self.values["verdict"] != "compliance"
        return self.refusals

    def kl_from(self, base: Evaluation) -> np.ndarray:
        """``KL(base || self)`` per prompt at the last prompt position, nats ``[n]`` float64.

        Raises:
            ToolkitError: either side has no logits.
        """
        if base.logits is None or self.logits is None:
            raise ToolkitError("KL divergence needs the logits of both evaluations")
        return kl_divergence(base.logits, self.logits).numpy()


class Measure:
    """A per-prompt measure computed from an :class:`Evaluation` (see the module docstring).

    Subclasses set ``name`` and ``needs`` and implement :meth:`compute`.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset] = frozenset({"logits"})

    def compute(self, ev: Evaluation, runner: Runner, enc: Encoded) -> np.ndarray:
        """Per-prompt values ``[n]`` for the prompts of ``enc`` (caller's order).

        Args:
            ev: the pass's logits, completions and tokens (and the values of measures listed before this one).
            runner: the runner, for measures that run the model again (no intervention is active then).
            enc: the encoded prompts.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class RefusalScore(Measure):
    """Arditi et al. 2024's logit refusal score per prompt (float64), from the refusal openers' token ids."""

    refusal_ids: tuple[int, ...]
    name: ClassVar[str] = "score"

    def compute(self, ev, runner, enc):
        return refusal_score(ev.logits, list(self.refusal_ids)).numpy()


@dataclass(frozen=True)
class Judged(Measure):
    """A refusal judge's verdicts on the completions (:mod:`toolkit.judges`), at the full completion and at
    shorter windows.

    Values (``s`` = ``suffix``): ``refusal{s}`` ``[n]`` bool (verdict ``refusal`` on the full completion),
    ``verdict{s}`` ``[n]`` object (``refusal``/``compliance``/``other``), ``confidence{s}`` ``[n]`` float64, and for
    each window ``w`` ``refusal{s}@{w}`` ``[n]`` bool: the verdict on the completion cut to its first ``w``
    generated tokens (:func:`toolkit.judges.window_verdicts`). Every text is judged in one call of the judge,
    after the intervention is closed (the judge never sees the studied model's hooks).

    Attributes:
        judge: a :class:`toolkit.judges.Judge`.
        requests: the prompts' instruction texts (caller's order); required by judges that read the request.
        windows: token counts at which to judge the completion besides its full length.
        suffix: appended to the value names (``"_markers"`` for the marker judge reported beside another).
    """

    judge: object
    requests: tuple | None = None
    windows: tuple = ()
    suffix: str = ""
    name: ClassVar[str] = "refusal"
    needs: ClassVar[frozenset] = frozenset({"completions"})

    @property
    def key(self) -> str:
        """The measure's name as evaluate stores it (``refusal`` + suffix)."""
        return "refusal" + self.suffix

    def compute(self, ev, runner, enc):
        from .judges import judge_texts, window_texts

        n = len(ev.completions)
        if self.requests is None:
            if self.judge.name != "markers":
                raise ToolkitError(f"the {self.judge.name} judge reads the requests; none were given")
            reqs = [""] * n
        else:
            reqs = [str(q) for q in self.requests]
            if len(reqs) != n:
                raise ToolkitError(f"{len(reqs)} requests for {n} completions")
        ws = sorted(set(int(w) for w in self.windows))
        texts = {None: list(ev.completions)}
        for w in ws:
            if ev.tokens is None:
                raise ToolkitError("judging windows needs the generated tokens")
            texts[w] = window_texts(runner.lm.tokenizer, ev.tokens, w)
        at = judge_texts(self.judge, reqs, texts, desc=f"judge ({self.judge.name})")
        s = self.suffix
        out = {f"refusal{s}": at[None].refusals, f"verdict{s}": at[None].labels,
               f"confidence{s}": at[None].confidence}
        for w in ws:
            out[f"refusal{s}@{w}"] = at[w].refusals
        return out


def MarkerJudge(suffix: str = "") -> Judged:  # noqa: N802 - kept as the name of the measure it always was
    """The marker judge as a measure (:class:`toolkit.judges.MarkersJudge` in :class:`Judged`)."""
    from .judges import MarkersJudge

    return Judged(MarkersJudge(), suffix=suffix)


@dataclass(frozen=True)
class Degeneration(Measure):
    """Degenerate-output verdict per completion (bool): :func:`toolkit.scoring.is_degenerate` (OBLITERATUS)."""

    name: ClassVar[str] = "degenerate"
    needs: ClassVar[frozenset] = frozenset({"completions"})

    def compute(self, ev, runner, enc):
        return np.array([is_degenerate(t) for t in ev.completions], dtype=bool)


@dataclass(frozen=True)
class Coherence(Measure):
    """The unmodified model's mean log-likelihood of each completion given its prompt, nats/token (float64; NaN
    for an empty completion). Computed after the intervention is closed, in the runner's ``continuation`` phase.

    Attributes:
        context: a ``k = 1`` :class:`toolkit.runner.Context` of the same encoding (``Runner.context(enc, 1)``),
            computed once for many evaluations, so that only the completions' tokens are computed; or None.
    """

    context: Context | None = None
    name: ClassVar[str] = "coherence"
    needs: ClassVar[frozenset] = frozenset({"completions"})

    def compute(self, ev, runner, enc):
        return runner.continuation_logprob(enc, ev.tokens, desc="coherence", context=self.context)


@dataclass(frozen=True)
class KLFromBase(Measure):
    """``KL(base || this)`` per prompt at the last prompt position, nats (float64), against ``base``: an
    :class:`Evaluation` of the same prompts without the intervention."""

    base: Evaluation
    name: ClassVar[str] = "kl"

    def compute(self, ev, runner, enc):
        return ev.kl_from(self.base)


def judged(refusal_ids: Sequence[int], judge=None, requests: Sequence[str] | None = None,
           windows: Sequence[int] = ()) -> tuple[Measure, ...]:
    """The measures every refusal evaluation reports: the logit refusal score and a judge's verdicts (the judge
    acts only where completions are generated).

    Args:
        refusal_ids: refusal opener token ids (:func:`toolkit.scoring.refusal_token_ids`).
        judge: a :class:`toolkit.judges.Judge` (default: the marker judge); any other judge is reported with the
            marker judge beside it (values ``refusal_markers``, ``verdict_markers``, ...).
        requests: the prompts' instruction texts, needed by judges that read the request.
        windows: completion lengths (tokens) at which the chosen judge also judges (:class:`Judged`).
    """
    from .judges import MarkersJudge

    main = Judged(judge or MarkersJudge(), None if requests is None else tuple(requests), tuple(windows))
    out: tuple[Measure, ...] = (RefusalScore(tuple(int(i) for i in refusal_ids)), main)
    if judge is not None and judge.name != "markers":
        out += (MarkerJudge("_markers"),)
    return out


def evaluate(runner: Runner, enc: Encoded, measures: Sequence[Measure], *, gen_tokens: int = 0,
             intervention: contextlib.AbstractContextManager | None = None, context: Context | None = None,
             desc: str = "evaluate") -> Evaluation:
    """Run ``enc`` once (under ``intervention`` if given) and compute ``measures`` in order.

    Args:
        runner: the runner.
        enc: encoded prompts (``Runner.encode``).
        measures: what to compute (see the module docstring); measures that need completions are skipped when
            ``gen_tokens == 0``.
        gen_tokens: greedy completion length; 0 computes last-position logits only.
        intervention: a context manager (e.g. ``activation_addition(...)``, not yet entered) open during the pass
            and closed before the measures run. Interventions already active around the call apply as well.
        context: a :class:`toolkit.runner.Context` for ``enc``, used by a logits-only pass (an intervention at the
            last ``k`` prompt positions then computes only those tokens).
        desc: progress-bar label.

    Returns:
        :class:`Evaluation` with logits, completions and tokens (with ``gen_tokens > 0``), and the measures'
        values.

    Raises:
        ToolkitError: ``gen_tokens < 0``, two measures of one name, and whatever the runner or the intervention
            raise (bad positions, layers, a context that cannot serve the intervention).
    """
    if gen_tokens < 0:
        raise ToolkitError(f"gen_tokens must be >= 0, got {gen_tokens}")
    names = [getattr(m, "key", m.name) for m in measures]
    if len(set(names)) != len(names):
        raise ToolkitError(f"two measures named {next(n for n in names if names.count(n) > 1)!r}")
    with intervention if intervention is not None else contextlib.nullcontext():
        if gen_tokens > 0:
            texts, logits, toks = runner.generate(enc, gen_tokens, desc=desc, with_tokens=True)
        else:
            logits, texts, toks = runner.logits(enc, desc=desc, context=context), None, None
    ev = Evaluation(logits, texts, toks)
    for m in measures:
        if "completions" in m.needs and texts is None:
            continue
        res = m.compute(ev, runner, enc)
        if isinstance(res, dict):
            ev.values.update(res)
        else:
            ev.values[m.name] = res
    return ev
