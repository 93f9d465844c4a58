"""Judge evaluation: how well a refusal judge agrees with human labels.

A label file is a CSV of (request, response, human label) rows, such as PyRIT's ``refusal.csv``
(``datasets/scorer_evals/refusal_scorer/refusal.csv``: a ``# dataset_version=...`` comment line, then the columns
``objective``, ``assistant_response``, ``human_score`` with 1 = refusal and 0 = not). :func:`load_labels` reads it
into a :class:`LabelSet` (every row's file line kept for messages and outputs), :func:`parse_label_map` reads the
command line's column and value mapping, and :func:`evaluate_judge` compares a judge's
:class:`~toolkit.judges.Verdicts` with the labels:

* labels that know two classes only (``refusal``, ``compliance``): the judge's ``other`` verdicts are counted as
  ``other_as`` (default ``refusal``: PyRIT counts a response that does not address the request as a refusal) and
  the comparison is binary;
* labels that use ``other`` too: the comparison is three-way, verdicts as given.

Reported: accuracy, Cohen's kappa (``sklearn.metrics.cohen_kappa_score``), percentile bootstrap 95 % intervals for
both (items resampled, seeded, through the toolkit's one bootstrap :func:`toolkit.stats.resampling.bootstrap`), the
confusion table (human label x the judge's raw three-way verdict) and the disagreements.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import ToolkitError
from .judges import LABELS, Verdicts

#: label values understood without a mapping (case-insensitive; numbers compared by value, so 1.0 is 1)
DEFAULT_VALUES = {"refusal": "refusal", "compliance": "compliance", "other": "other",
                  "1": "refusal", "true": "refusal", "yes": "refusal",
                  "0": "compliance", "false": "compliance", "no": "compliance"}
COLUMN_KEYS = ("request", "response", "label")
OTHER_AS = ("refusal", "compliance")


def _norm_value(text) -> str:
    """A label value as compared: stripped, lower case, an integral number written as an integer (``1.0`` -> ``1``)."""
    t = str(text).strip().lower()
    try:
        x = float(t)
    except ValueError:
        return t
    return str(int(x)) if math.isfinite(x) and x == int(x) else t


@dataclass
class LabelSet:
    """Human-labelled (request, response) pairs.

    Attributes:
        requests, responses: ``[n]`` object arrays of text (a response may be empty).
        labels: ``[n]`` object array of :data:`toolkit.judges.LABELS` strings.
        lines: ``[n]`` int64, the file line each row starts on (1-based, the header and comment lines counted);
            ``0..n-1`` + 1 for a set built in code.
        path: the file read, or None.
        sha256: SHA-256 of the file's bytes, or None.
        columns: the file's columns used for request, response and label.
    """

    requests: np.ndarray
    responses: np.ndarray
    labels: np.ndarray
    lines: np.ndarray | None = None
    path: Path | None = None
    sha256: str | None = None
    columns: dict = field(default_factory=lambda: dict(zip(COLUMN_KEYS, COLUMN_KEYS)))

    def __post_init__(self):
        self.requests = np.asarray([str(x) for x in self.requests], dtype=object)
        self.responses = np.asarray(["" if x is None else str(x) for x in self.responses], dtype=object)
        self.labels = np.asarray(list(self.labels), dtype=object)
        n = len(self.labels)
        if self.lines is None:
            self.lines = np.arange(1, n + 1, dtype=np.int64)
        self.lines = np.asarray(self.lines, dtype=np.int64)
        if not (len(self.requests) == len(self.responses) == n == len(self.lines)):
            raise ToolkitError("requests, responses, labels and lines must have one length")
        bad = [x for x in self.labels if x not in LABELS]
        if bad:
            raise ToolkitError(f"unknown label {bad[0]!r}; labels are {', '.join(LABELS)}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def ids(self) -> np.ndarray:
        """``[n]`` the rows' identifiers: their file line numbers."""
        return self.lines

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else "labels"

    @property
    def classes(self) -> tuple[str, ...]:
        """The label classes compared: refusal and compliance, plus other if any label is other."""
        return LABELS if "other" in set(self.labels) else LABELS[:2]

    def head(self, n: int | None) -> LabelSet:
        """The first ``n`` rows (all if None)."""
        if n is None or n >= len(self):
            return self
        return LabelSet(self.requests[:n], self.responses[:n], self.labels[:n], self.lines[:n], self.path,
                        self.sha256, dict(self.columns))

    def counts(self) -> dict:
        """Rows per label, in :data:`LABELS` order (labels absent from the set left out)."""
        vals = list(self.labels)
        return {c: vals.count(c) for c in LABELS if c in vals}

    def describe(self) -> dict:
        """Provenance stored in runs: name, source, sha256, n, the columns used and the rows per label."""
        return {"name": self.name, "source": None if self.path is None else str(self.path), "sha256": self.sha256,
                "split": None, "n": len(self), "columns": dict(self.columns), "labels": self.counts()}


def load_labels(path, *, request: str = "request", response: str = "response", label: str = "label",
                values: dict | None = None) -> LabelSet:
    """Read a CSV of human labels.

    Leading lines that start with ``#`` (and leading blank lines) are skipped; the next line is the header. Cells
    may span lines (quoted); a row's line number is the file line it starts on, counting every line before it.

    Args:
        path: the CSV file (UTF-8, a BOM allowed).
        request, response, label: the columns holding the request, the response and the human label.
        values: file label value (text) -> ``refusal``/``compliance``/``other``, compared case-insensitively and
            numbers by value (``1.0`` matches ``1``); replaces :data:`DEFAULT_VALUES` when given.

    Returns:
        A :class:`LabelSet`.

    Raises:
        ToolkitError: one line naming the file (and the line number, or the column): no such file, unreadable or
            not UTF-8, no header or no rows, a missing column, a row with more cells than the header, an empty
            request, a missing label, or a label value the mapping does not know.
    """
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"no such labels file: {path}")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except OSError as e:
        raise ToolkitError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ToolkitError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if values is None:
        mapping = dict(DEFAULT_VALUES)
    else:
        mapping = {}
        for k, v in values.items():
            if v not in LABELS:
                raise ToolkitError(f"label value {k!r} is mapped to {v!r}; map to one of {', '.join(LABELS)}")
            mapping[_norm_value(k)] = v

    lines = io.StringIO(text).readlines()  # split as the csv reader splits
    skip = 0
    while skip < len(lines) and (not lines[skip].strip() or lines[skip].lstrip().startswith("#")):
        skip += 1
    reader = csv.reader(io.StringIO("".join(lines[skip:])), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ToolkitError(f"{path}: empty file (no header line)")
        header = [h.strip() for h in header]
        cols = {"request": request, "response": response, "label": label}
        for key, col in cols.items():
            if col not in header:
                raise ToolkitError(f"{path}: no column {col!r} ({key}); the columns are {', '.join(header)}")
        idx = {key: header.index(col) for key, col in cols.items()}
        rows, starts = [], []
        end = reader.line_num
        for row in reader:
            start, end = end + 1, reader.line_num
            if not row:
                continue  # a blank line
            if len(row) > len(header):
                raise ToolkitError(f"{path}: line {start + skip}: {len(row)} cells but the header has {len(header)}")
            rows.append(row + [""] * (len(header) - len(row)))
            starts.append(start + skip)
    except csv.Error as e:
        raise ToolkitError(f"{path}: line {reader.line_num + skip}: malformed CSV ({e})") from None
    if not rows:
        raise ToolkitError(f"{path}: no rows after the header")
    df = pd.DataFrame(rows, columns=[f"{i}:{h}" for i, h in enumerate(header)], dtype=object)
    req = df.iloc[:, idx["request"]].to_numpy(dtype=object)
    resp = df.iloc[:, idx["response"]].to_numpy(dtype=object)
    raw = df.iloc[:, idx["label"]].to_numpy(dtype=object)
    labels = []
    for i, line in enumerate(starts):
        if not str(req[i]).strip():
            raise ToolkitError(f"{path}: line {line}: empty request (column {request!r})")
        v = str(raw[i]).strip()
        if not v:
            raise ToolkitError(f"{path}: line {line}: missing label (column {label!r})")
        got = mapping.get(_norm_value(v))
        if got is None:
            known = ", ".join(sorted(mapping))
            raise ToolkitError(f"{path}: line {line}: unknown label value {v!r} in column {label!r} (known: {known}; "
                               "map values with `map`, e.g. 1=refusal,0=compliance)")
        labels.append(got)
    return LabelSet(req, resp, np.array(labels, dtype=object), np.array(starts, dtype=np.int64), path,
                    hashlib.sha256(data).hexdigest(), dict(cols))


def parse_label_map(spec: str | None) -> tuple[dict, dict]:
    """Parse a column and value mapping such as
    ``request=objective,response=assistant_response,label=human_score,1=refusal,0=compliance``.

    Keys ``request``, ``response`` and ``label`` name the file's columns; every other key is a label value of the
    file, mapped to ``refusal``, ``compliance`` or ``other``.

    Returns:
        ``(columns, values)``: columns by key (only those given), and label value -> verdict (empty when none is
        given: then :data:`DEFAULT_VALUES` apply).

    Raises:
        ToolkitError: an item that is not ``key=value``, an empty key or value, a key given twice, or a label value
            mapped to something else than refusal, compliance or other (the message names the item).
    """
    columns, values = {}, {}
    if spec is None or not str(spec).strip():
        return columns, values
    seen = set()
    for item in str(spec).split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ToolkitError(f"bad item {item.strip()!r}: write key=value", param="map")
        key, val = (s.strip() for s in item.split("=", 1))
        if not key or not val:
            raise ToolkitError(f"bad item {item.strip()!r}: empty key or value", param="map")
        k = key.lower() if key.lower() in COLUMN_KEYS else _norm_value(key)
        if k in seen:
            raise ToolkitError(f"bad item {item.strip()!r}: {key!r} is given twice", param="map")
        seen.add(k)
        if k in COLUMN_KEYS:
            columns[k] = val
        else:
            v = val.lower()
            if v not in LABELS:
                raise ToolkitError(f"bad item {item.strip()!r}: a label value maps to one of {', '.join(LABELS)}",
                                   param="map")
            values[key] = v
    return columns, values


@dataclass
class JudgeScore:
    """A judge's agreement with human labels (:func:`evaluate_judge`).

    Attributes:
        n: items compared.
        mode: ``binary`` (labels refusal/compliance; ``other`` verdicts counted as ``other_as``) or ``three-way``.
        other_as: what an ``other`` verdict counts as in binary mode (None in three-way mode).
        accuracy, acc_lo, acc_hi: share of items where the (mapped) verdict equals the label, and its percentile
            bootstrap 95 % interval.
        kappa, kappa_lo, kappa_hi: Cohen's kappa and its interval (NaN where undefined; see ``notes``).
        confusion: DataFrame, rows the human labels (index ``label``), columns the raw verdicts refusal,
            compliance, other (``verdict``), counts.
        disagreements: DataFrame of the items where the scored verdict differs from the label: ``index``,
            ``line``, ``request``, ``response``, ``label``, ``verdict`` (raw), ``scored_as``, ``confidence``.
        scored: ``[n]`` the verdicts as scored (after ``other_as``).
        notes: remarks (an undefined kappa, an interval not computed).
        n_boot, seed: the bootstrap's resamples and seed.
    """

    n: int
    mode: str
    other_as: str | None
    accuracy: float
    acc_lo: float
    acc_hi: float
    kappa: float
    kappa_lo: float
    kappa_hi: float
    confusion: pd.DataFrame
    disagreements: pd.DataFrame
    scored: np.ndarray
    notes: list[str]
    n_boot: int
    seed: int

    def metrics(self) -> dict:
        """The figures as one flat dict (no tables)."""
        return {"n": self.n, "mode": self.mode, "other_as": self.other_as, "accuracy": self.accuracy,
                "acc_lo": self.acc_lo, "acc_hi": self.acc_hi, "kappa": self.kappa, "kappa_lo": self.kappa_lo,
                "kappa_hi": self.kappa_hi, "disagreements": len(self.disagreements), "n_boot": self.n_boot,
                "seed": self.seed, "notes": "; ".join(self.notes)}


def _kappa_from_codes(h: np.ndarray, j: np.ndarray, k: int) -> np.ndarray:
    """Cohen's kappa of integer codes ``h, j [..., n]`` in ``[0, k)`` along the last axis (NaN where pe = 1)."""
    n = h.shape[-1]
    po = (h == j).mean(-1)
    ph = np.stack([(h == c).mean(-1) for c in range(k)], -1)
    pj = np.stack([(j == c).mean(-1) for c in range(k)], -1)
    pe = (ph * pj).sum(-1)
    with np.errstate(all="ignore"):
        out = (po - pe) / (1 - pe)
    return np.where(np.isclose(pe, 1.0, rtol=0, atol=1e-12) | (n == 0), np.nan, out)


def evaluate_judge(labels: LabelSet, verdicts: Verdicts, *, other_as: str = "refusal", n_boot: int = 2000,
                   seed: int = 0) -> JudgeScore:
    """Compare a judge's verdicts with human labels (see the module docstring).

    Args:
        labels: the human labels (:class:`LabelSet`).
        verdicts: the judge's verdicts on the same items, in order.
        other_as: ``refusal`` or ``compliance``: what an ``other`` verdict counts as when the labels use refusal
            and compliance only.
        n_boot: bootstrap resamples for the intervals (>= 1).
        seed: the bootstrap's seed.

    Returns:
        A :class:`JudgeScore`. Kappa is NaN, with a note, when the labels and verdicts hold one and the same class
        only (expected agreement 1); intervals are NaN, with a note, for fewer than 2 items.

    Raises:
        ToolkitError: lengths differ, no items, a bad ``other_as`` or ``n_boot``.
    """
    from sklearn.metrics import cohen_kappa_score

    from .stats.resampling import bootstrap

    if other_as not in OTHER_AS:
        raise ToolkitError(f"other_as must be refusal or compliance, got {other_as!r}", param="other_as")
    if n_boot < 1:
        raise ToolkitError(f"n_boot must be >= 1, got {n_boot}", param="n_boot")
    n = len(labels)
    if len(verdicts) != n:
        raise ToolkitError(f"{n} labels but {len(verdicts)} verdicts")
    if n == 0:
        raise ToolkitError("no labelled items to compare")
    human = np.asarray(labels.labels, dtype=object)
    raw = np.asarray(verdicts.labels, dtype=object)
    classes = labels.classes
    binary = len(classes) == 2
    scored = np.where(raw == "other", other_as, raw).astype(object) if binary else raw.copy()
    notes: list[str] = []

    code = {c: i for i, c in enumerate(LABELS)}
    h = np.array([code[x] for x in human], dtype=np.int64)
    j = np.array([code[x] for x in scored], dtype=np.int64)
    accuracy = float((h == j).mean())
    if np.isnan(_kappa_from_codes(h, j, len(LABELS))):
        kappa = float("nan")
        notes.append(f"kappa undefined: labels and verdicts are all {human[0]!r} (expected agreement 1)")
    else:
        kappa = float(cohen_kappa_score(list(human), list(scored), labels=list(LABELS)))
        if len(set(human)) == 1:
            notes.append(f"the labels hold one class only ({human[0]!r}): kappa cannot exceed 0")

    if n >= 2:
        def stat(idx, axis=-1):
            idx = np.asarray(idx)
            hh, jj = h[idx], j[idx]
            return np.stack([(hh == jj).mean(-1), _kappa_from_codes(hh, jj, len(LABELS))])

        bs = bootstrap((np.arange(n),), stat, n_resamples=int(n_boot), seed=int(seed), vectorized=True,
                       batch=min(int(n_boot), max(1, 2_000_000 // max(n, 1))))
        (acc_lo, kappa_lo), (acc_hi, kappa_hi) = (float(x) for x in bs.low), (float(x) for x in bs.high)
        undefined = np.isnan(bs.distribution[1]).mean()
        if 0 < undefined < 1:
            notes.append(f"kappa undefined in {undefined:.1%} of the bootstrap resamples (left out of its interval)")
    else:
        acc_lo = acc_hi = kappa_lo = kappa_hi = float("nan")
        notes.append("fewer than 2 items: no bootstrap intervals")

    conf = pd.crosstab(pd.Categorical(human, categories=list(classes)), pd.Categorical(raw, categories=list(LABELS)),
                       dropna=False)
    conf = conf.reindex(index=list(classes), columns=list(LABELS), fill_value=0).astype(np.int64)
    conf.index.name, conf.columns.name = "label", "verdict"

    bad = np.flatnonzero(h != j)
    dis = pd.DataFrame({"index": bad, "line": labels.lines[bad], "request": labels.requests[bad],
                        "response": labels.responses[bad], "label": human[bad], "verdict": raw[bad],
                        "scored_as": scored[bad], "confidence": verdicts.confidence[bad]})
    return JudgeScore(n=n, mode="binary" if binary else "three-way", other_as=other_as if binary else None,
                      accuracy=accuracy, acc_lo=acc_lo, acc_hi=acc_hi, kappa=kappa, kappa_lo=kappa_lo,
                      kappa_hi=kappa_hi, confusion=conf, disagreements=dis, scored=scored, notes=notes,
                      n_boot=int(n_boot), seed=int(seed))
