"""A small offline multiple-choice capability check: does an edit to the model hurt its abilities?

The check is MMLU-style letter scoring (Hendrycks et al. 2021, "Measuring Massive Multitask Language
Understanding"): each item is shown as a question with four lettered choices and an instruction to answer with
the letter only; the model's answer is the letter among ``A``-``D`` whose token has the highest next-token logit
at the first response position. One logits-only pass (:func:`toolkit.evaluation.evaluate` with
``gen_tokens=0``) scores the whole set, with or without an intervention, so comparing the accuracy with and
without an edit is two cheap passes.

The built-in set ``prompts/capability.jsonl`` (written by ``scripts/make_capability.py``) has four categories
(``arithmetic``, ``facts``, ``reading``, ``code``) of about 54 short items each, with the correct letter
balanced across ``A``-``D``, so chance accuracy is 25 %. Arithmetic and code answers are computed by that script
(code snippets are executed), reading answers are stated in the item's passage, facts are stable world knowledge.

Caveat, measured on the default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, float32, CPU): accuracy is near chance,
65/218 = 29.8 % (Wilson 95 % 24.1-36.2 %), with a strong letter bias (B 112, A 80, C 26, D 0 choices), although the
model answers the same fact questions correctly in free text; rewording the prompt, two in-context examples and
per-letter calibration did not lift it clearly above chance. Small models are poor at binding answers to letters
(Robinson and Wingate 2023), so on such a model this check says little about damage; it is meant for models that
score clearly above chance unedited.

JSONL format, one object per line: ``{"id": str, "category": str, "question": str, "choices": [4 strings],
"answer": "A"|"B"|"C"|"D"}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from .errors import ToolkitError
from .evaluation import Evaluation, Measure, evaluate
from .prompts import BUILTIN_DIR
from .runner import Encoded, Runner
from .stats.rates import rate_summary

LETTERS = ("A", "B", "C", "D")
FIELDS = ("id", "category", "question", "choices", "answer")
INSTRUCTION = "Answer with the letter of the correct choice only."
DEFAULT_NAME = "capability"


def default_path() -> Path:
    """The packaged set, ``prompts/capability.jsonl`` (the folder of the built-in prompt sets, which
    ``$REFUSAL_TOOLKIT_PROMPTS`` overrides; see :mod:`toolkit.prompts`)."""
    return BUILTIN_DIR / f"{DEFAULT_NAME}.jsonl"


@dataclass
class CapabilitySet:
    """A multiple-choice item set.

    Attributes:
        items: dicts with ``id`` (str), ``category`` (str), ``question`` (str), ``choices`` (list of 4 str) and
            ``answer`` (``"A"``-``"D"``), in file order.
        name: short name (the file stem; ``capability`` for the built-in set).
        source: the file it was read from.
        sha256: hex SHA-256 of the file's bytes, recorded in runs.
    """

    items: list[dict]
    name: str
    source: str
    sha256: str

    def __len__(self) -> int:
        return len(self.items)

    @property
    def ids(self) -> list[str]:
        """The item ids."""
        return [it["id"] for it in self.items]

    @property
    def categories(self) -> list[str]:
        """Each item's category, ``[n]``."""
        return [it["category"] for it in self.items]

    @property
    def answers(self) -> tuple[int, ...]:
        """Each item's correct choice as an index 0-3 (``A`` = 0), ``[n]``."""
        return tuple(LETTERS.index(it["answer"]) for it in self.items)

    def head(self, n: int | None) -> CapabilitySet:
        """The first ``n`` items (all if ``n`` is None), same name, source and hash."""
        return self if n is None else CapabilitySet(self.items[:n], self.name, self.source, self.sha256)

    def describe(self) -> dict:
        """Provenance stored in runs: ``{"name", "source" (the file path), "sha256", "n"}``."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256, "n": len(self)}


def _check_item(obj, where: str, n: int) -> dict:
    if not isinstance(obj, dict):
        raise ToolkitError(f"{where}: line {n}: expected a JSON object")
    for key in FIELDS:
        if key not in obj:
            raise ToolkitError(f"{where}: line {n}: no {key!r} field")
    for key in ("id", "category", "question"):
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ToolkitError(f"{where}: line {n}: the {key!r} field is empty or not text")
    ch = obj["choices"]
    if not isinstance(ch, list) or len(ch) != 4:
        got = f"{len(ch)} choices" if isinstance(ch, list) else type(ch).__name__
        raise ToolkitError(f"{where}: line {n}: 'choices' must be a list of 4 strings, got {got}")
    if any(not isinstance(c, str) or not c.strip() for c in ch):
        raise ToolkitError(f"{where}: line {n}: a choice is empty or not text")
    if obj["answer"] not in LETTERS:
        raise ToolkitError(f"{where}: line {n}: 'answer' must be one of A, B, C, D, got {obj['answer']!r}")
    return {"id": obj["id"], "category": obj["category"], "question": obj["question"].strip(),
            "choices": [c.strip() for c in ch], "answer": obj["answer"]}


def load_capability_set(path: str | Path | None = None) -> CapabilitySet:
    """Load and validate a multiple-choice set (JSONL, format in the module docstring).

    Args:
        path: the file; None loads the packaged ``prompts/capability.jsonl`` (:func:`default_path`).

    Returns:
        :class:`CapabilitySet` in file order; blank lines are skipped.

    Raises:
        ToolkitError: missing file (``param="path"``), not UTF-8, no items, or a bad line, named by file and
            1-based line number: malformed JSON, not an object, a missing field, an empty text field, choices not
            a list of 4 non-empty strings, an answer not ``A``-``D``, or an id already used on an earlier line.
    """
    p = default_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        what = "the built-in capability set is missing at" if path is None else "no such capability file:"
        raise ToolkitError(f"{what} {p}", param=None if path is None else "path")
    raw = p.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    where = str(p)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{where}: not UTF-8 text") from None
    items, seen = [], {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ToolkitError(f"{where}: line {n}: malformed JSON ({e.msg})") from None
        item = _check_item(obj, where, n)
        if item["id"] in seen:
            raise ToolkitError(f"{where}: line {n}: duplicate id {item['id']!r} (first on line {seen[item['id']]})")
        seen[item["id"]] = n
        items.append(item)
    if not items:
        raise ToolkitError(f"{where}: no items")
    return CapabilitySet(items, p.stem, where, sha)


def format_item(item: dict) -> str:
    """The instruction text of one item (the user turn; the chat template is applied by ``Runner.encode``)::

        <question>

        A. <choice 1>
        B. <choice 2>
        C. <choice 3>
        D. <choice 4>

        Answer with the letter of the correct choice only.
    """
    choices = "\n".join(f"{L}. {c}" for L, c in zip(LETTERS, item["choices"]))
    return f"{item['question']}\n\n{choices}\n\n{INSTRUCTION}"


def letter_token_ids(tokenizer) -> list[int]:
    """Token ids of ``A``, ``B``, ``C``, ``D`` as the first token of a response (encoded without a leading space
    or special tokens, as the text right after the chat template's assistant header).

    Returns:
        4 distinct ints, in letter order.

    Raises:
        ToolkitError: a letter does not encode to exactly one token, encodes to the unknown token, or two letters
            share a token.
    """
    ids = []
    for L in LETTERS:
        toks = tokenizer(L, add_special_tokens=False)["input_ids"]
        unk = getattr(tokenizer, "unk_token_id", None)
        if len(toks) != 1 or (unk is not None and toks[0] == unk):
            raise ToolkitError(f"the tokenizer has no single token for the answer letter {L!r} (got {toks}); "
                               "the capability check needs one token per letter A-D")
        ids.append(int(toks[0]))
    if len(set(ids)) != 4:
        raise ToolkitError(f"answer letters A-D share tokens in this tokenizer: {ids}")
    return ids


def chosen_letters(logits: torch.Tensor, letter_ids: Sequence[int]) -> np.ndarray:
    """The chosen choice per prompt: argmax over the four letter columns of ``logits`` (``[n, vocab]``).

    Returns:
        ``[n]`` int64 in 0-3 (``A`` = 0); a tie goes to the earlier letter (``torch.argmax`` takes the first).
    """
    return logits[:, list(letter_ids)].float().argmax(-1).numpy().astype(np.int64)


def letter_mass(logits: torch.Tensor, letter_ids: Sequence[int]) -> np.ndarray:
    """Next-token probability of the four letters together, ``[n]`` float64 in [0, 1]: how much the model answers in
    the asked format at all (a low mass means its top token is not a letter, so a wrong letter may be noise)."""
    return torch.softmax(logits.double(), -1)[:, list(letter_ids)].sum(-1).numpy()


@dataclass(frozen=True)
class ChoiceAccuracy(Measure):
    """Whether each item's chosen letter (:func:`chosen_letters`) is its correct one: ``[n]`` bool.

    Attributes:
        answers: the correct choice per item, 0-3 (``A`` = 0), in the order of the encoded prompts.
        letter_ids: the token ids of ``A``-``D`` (:func:`letter_token_ids`).

    Raises (from :meth:`compute`):
        ToolkitError: ``answers`` and the pass have different lengths.
    """

    answers: tuple[int, ...]
    letter_ids: tuple[int, ...]
    name: ClassVar[str] = "capability_correct"

    def compute(self, ev, runner, enc):
        if len(self.answers) != ev.logits.shape[0]:
            raise ToolkitError(f"{len(self.answers)} answers for {ev.logits.shape[0]} prompts")
        return chosen_letters(ev.logits, self.letter_ids) == np.asarray(self.answers, dtype=np.int64)


@dataclass(frozen=True)
class ChosenLetter(Measure):
    """The chosen choice per item, ``[n]`` int64 0-3 (:func:`chosen_letters`)."""

    letter_ids: tuple[int, ...]
    name: ClassVar[str] = "capability_choice"

    def compute(self, ev, runner, enc):
        return chosen_letters(ev.logits, self.letter_ids)


@dataclass(frozen=True)
class LetterMass(Measure):
    """Probability of the four letters together per item, ``[n]`` float64 (:func:`letter_mass`)."""

    letter_ids: tuple[int, ...]
    name: ClassVar[str] = "capability_letter_mass"

    def compute(self, ev, runner, enc):
        return letter_mass(ev.logits, self.letter_ids)


@dataclass
class CapabilityResult:
    """The result of :func:`capability_check`.

    Attributes:
        set: the item set's provenance (:meth:`CapabilitySet.describe`).
        n: number of items.
        k: number answered correctly.
        accuracy: ``k / n`` (a fraction, not a percentage).
        ci_low, ci_high: Wilson 95 % score interval of the accuracy (:func:`toolkit.stats.rates.rate_ci`).
        per_category: ``{category: {"n", "k", "rate", "ci_low", "ci_high"}}`` (Wilson 95 %), categories in first
            appearance order.
        ids: item ids ``[n]``.
        categories: item categories ``[n]``.
        correct: ``[n]`` bool, per item.
        chosen: ``[n]`` int64, the chosen choice 0-3 (``A`` = 0).
        answers: ``[n]`` int64, the correct choice 0-3.
        letter_mass: ``[n]`` float64, next-token probability of the four letters together.
        letter_ids: the 4 letter token ids used.
        chance: accuracy of guessing, 0.25.
        evaluation: the underlying :class:`toolkit.evaluation.Evaluation` (logits ``[n, vocab]`` float32).
    """

    set: dict
    n: int
    k: int
    accuracy: float
    ci_low: float
    ci_high: float
    per_category: dict[str, dict]
    ids: list[str]
    categories: list[str]
    correct: np.ndarray
    chosen: np.ndarray
    answers: np.ndarray
    letter_mass: np.ndarray
    letter_ids: list[int]
    chance: float = 0.25
    evaluation: Evaluation | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """JSON-ready figures: set, n, k, accuracy with its interval, chance, mean letter mass, per category."""
        return {"set": self.set, "n": self.n, "k": self.k, "accuracy": self.accuracy, "ci_low": self.ci_low,
                "ci_high": self.ci_high, "chance": self.chance, "mean_letter_mass": float(self.letter_mass.mean()),
                "letter_ids": list(self.letter_ids), "per_category": self.per_category}

    def rows(self) -> list[dict]:
        """One JSON-ready dict per item: id, category, answer, chosen (letters), correct, letter_mass."""
        return [{"id": i, "category": c, "answer": LETTERS[a], "chosen": LETTERS[ch], "correct": bool(ok),
                 "letter_mass": float(m)}
                for i, c, a, ch, ok, m in zip(self.ids, self.categories, self.answers, self.chosen, self.correct,
                                              self.letter_mass)]


def format_cloze(item: dict) -> str:
    """The instruction text of one item for cloze scoring: the question alone, then ``Answer briefly.``"""
    return f"{item['question'].strip()}\n\nAnswer briefly."


def capability_check(runner: Runner, cset: CapabilitySet, *,
                     intervention: contextlib.AbstractContextManager | None = None,
                     desc: str = "capability", method: str = "cloze") -> CapabilityResult:
    """Score ``cset`` by cloze scoring (``method="cloze"``, the default) or MMLU-style letter scoring
    (``method="letter"``).

    Cloze (the ``acc_norm``-style scoring of lm-evaluation-harness, Gao et al.): each item's question
    (:func:`format_cloze`) is followed, teacher-forced, by each of its four choices as the assistant's answer
    (:meth:`toolkit.runner.Runner.forced`, so an intervention acts as it does during generation); the answer is the
    choice with the highest mean log-probability per token. Four passes' worth of tokens per item, but it does not
    depend on a small model's ability to map an answer to a letter: the default 0.5B model scores near chance (30 %)
    by letters and well above it by cloze. ``letter_mass`` is NaN for cloze.

    Each item is formatted by :func:`format_item`, encoded with the runner's chat format, and run once through
    :func:`toolkit.evaluation.evaluate` (``gen_tokens=0``) under ``intervention``; the answer is the argmax of the
    next-token logits over the tokens of ``A``-``D`` at the first response position.

    Args:
        runner: the runner (its chat format and tokenizer are used).
        cset: the items (:func:`load_capability_set`).
        intervention: a hook context manager, not yet entered (e.g.
            :func:`toolkit.interventions.directional_ablation`), open during the pass only; None for the
            unmodified model.
        desc: progress-bar label.

    Returns:
        :class:`CapabilityResult`: overall and per-category accuracy with Wilson 95 % intervals, per-item
        correctness and choices.

    Raises:
        ToolkitError: the tokenizer has no single distinct tokens for ``A``-``D`` (:func:`letter_token_ids`), an
            empty set, and whatever the runner or the intervention raise.
    """
    if len(cset) == 0:
        raise ToolkitError("the capability set has no items")
    if method not in ("cloze", "letter"):
        raise ToolkitError(f"capability method must be cloze or letter, got {method!r}", param="method")
    if method == "cloze":
        return _cloze(runner, cset, intervention, desc)
    ids = tuple(letter_token_ids(runner.lm.tokenizer))
    enc: Encoded = runner.encode([format_item(it) for it in cset.items])
    answers = cset.answers
    measures = (ChoiceAccuracy(answers, ids), ChosenLetter(ids), LetterMass(ids))
    ev = evaluate(runner, enc, measures, gen_tokens=0, intervention=intervention, desc=desc)
    correct = ev.values[ChoiceAccuracy.name].astype(bool)
    overall = rate_summary(correct)
    cats = cset.categories
    per_cat = {}
    for c in dict.fromkeys(cats):
        per_cat[c] = rate_summary([ok for ok, cc in zip(correct, cats) if cc == c])
    return CapabilityResult(set=cset.describe(), n=overall["n"], k=overall["k"], accuracy=overall["rate"],
                            ci_low=overall["ci_low"], ci_high=overall["ci_high"], per_category=per_cat,
                            ids=cset.ids, categories=cats, correct=correct,
                            chosen=ev.values[ChosenLetter.name], answers=np.asarray(answers, dtype=np.int64),
                            letter_mass=ev.values[LetterMass.name], letter_ids=list(ids), evaluation=ev)


def _cloze(runner: Runner, cset: CapabilitySet, intervention, desc: str) -> CapabilityResult:
    tok = runner.lm.tokenizer
    prompts, conts = [], []
    for it in cset.items:
        for ch in it["choices"]:
            prompts.append(format_cloze(it))
            conts.append(tok(str(ch).strip(), add_special_tokens=False)["input_ids"])
    if any(len(c) == 0 for c in conts):
        raise ToolkitError("a capability choice encodes to no tokens")
    enc = runner.encode(prompts)
    score = np.full(len(prompts), -np.inf)

    def keep(rows, logp, targets, lens):
        for r, i in enumerate(rows):
            n = lens[r]
            score[i] = float(logp[r, :n].gather(-1, targets[r, :n, None]).double().mean())

    with intervention if intervention is not None else contextlib.nullcontext():
        runner.forced(enc, conts, keep, desc=desc)
    chosen = score.reshape(len(cset), 4).argmax(1).astype(np.int64)
    answers = np.asarray(cset.answers, dtype=np.int64)
    correct = chosen == answers
    overall = rate_summary(correct)
    cats = cset.categories
    per_cat = {c: rate_summary([ok for ok, cc in zip(correct, cats) if cc == c]) for c in dict.fromkeys(cats)}
    return CapabilityResult(set=cset.describe(), n=overall["n"], k=overall["k"], accuracy=overall["rate"],
                            ci_low=overall["ci_low"], ci_high=overall["ci_high"], per_category=per_cat,
                            ids=cset.ids, categories=cats, correct=correct, chosen=chosen, answers=answers,
                            letter_mass=np.full(len(cset), np.nan), letter_ids=[], evaluation=None)
