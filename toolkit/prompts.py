"""Prompt sets: the toolkit's own JSONL sets and users' CSV, JSONL, text files or Hugging Face datasets.

Built-in sets live in ``prompts/`` as JSONL with the keys ``id``, ``prompt``, ``category``, ``split``
(``train``/``val``/``test``): ``harmful`` (320 requests, 10 harm categories), ``harmless`` (320 instructions,
10 kinds) and ``borderline`` (160 benign prompts that resemble harmful ones, 8 kinds). Splits are fixed in the
files.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ToolkitError

BUILTIN_DIR = Path(os.environ.get("REFUSAL_TOOLKIT_PROMPTS", Path(__file__).resolve().parents[1] / "prompts"))
BUILTIN = ("harmful", "harmless", "borderline")
SPLITS = ("train", "val", "test")


@dataclass
class PromptSet:
    """A named list of prompts.

    Attributes:
        name: short name (file stem, built-in name, or dataset id).
        source: where it was read from.
        sha256: hash of the source bytes (or of the dataset's prompts), recorded in runs.
        records: dicts with ``id``, ``prompt``, ``category``, ``split``.
        split: the split this set was restricted to, or None.
        split_ignored: the split that was asked for but not applied because the file has no splits (see
            :meth:`select`), or None.
    """

    name: str
    source: str
    sha256: str
    records: list[dict] = field(default_factory=list)
    split: str | None = None
    split_ignored: str | None = None

    @property
    def prompts(self) -> list[str]:
        """The prompt texts."""
        return [r["prompt"] for r in self.records]

    @property
    def ids(self) -> list[str]:
        """The prompt ids."""
        return [r["id"] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def has_splits(self) -> bool:
        """Whether any record names a split (``train``/``val``/``test``)."""
        return any(r.get("split") for r in self.records)

    def select(self, split: str | None) -> PromptSet:
        """This set restricted to one split: the one split rule of every command.

        ``None`` or ``"all"`` keeps every prompt. A file whose records name no split at all is used whole, whatever
        split is asked for, and the returned set records the split it ignored (``split_ignored``, in
        :meth:`describe`), so that a run says so.

        Raises:
            ToolkitError: unknown split, or the file has splits but none of this one.
        """
        if split is None or split == "all":
            return self
        if split not in SPLITS:
            raise ToolkitError(f"unknown split {split!r}; choose train, val, test or all")
        if not self.has_splits:
            return PromptSet(self.name, self.source, self.sha256, self.records, None, split)
        recs = [r for r in self.records if r.get("split") == split]
        if not recs:
            raise ToolkitError(f"prompt set {self.name!r} has no prompts in split {split!r}")
        return PromptSet(self.name, self.source, self.sha256, recs, split)

    def subset(self, keep: list[int]) -> PromptSet:
        """A copy holding only the records at the given indices (same name, source and hash)."""
        return PromptSet(self.name, self.source, self.sha256, [self.records[i] for i in keep], self.split,
                         self.split_ignored)

    def half(self, which: str | None, seed: int) -> PromptSet:
        """One of two disjoint halves of this set, by a seeded hash of each prompt id
        (:func:`toolkit.steering.hash_split` with fraction 0.5: ``"a"`` = its training part, ``"b"`` = the rest).
        Membership depends only on the id and the seed, so halves ``a`` and ``b`` of one seed are disjoint and
        together cover the set; each holds about, not exactly, half of it. ``None`` keeps every prompt. Used to
        measure a figure's prompt-sampling spread (:mod:`toolkit.xmodel`).

        Raises:
            ToolkitError: ``which`` not ``a``, ``b`` or None, repeated prompt ids, or an empty half.
        """
        if which is None:
            return self
        if which not in ("a", "b"):
            raise ToolkitError(f"must be 'a' or 'b', got {which!r}", param="half")
        from .steering import hash_split

        mask = hash_split(self.ids, seed, 0.5)
        keep = [i for i, m in enumerate(mask) if bool(m) == (which == "a")]
        if not keep:
            raise ToolkitError(f"half {which!r} of prompt set {self.name!r} ({len(self)} prompts, seed {seed}) is "
                               "empty", param="half")
        return self.subset(keep)

    def head(self, n: int | None) -> PromptSet:
        """The first ``n`` records (all if ``n`` is None)."""
        return self if n is None else self.subset(list(range(min(n, len(self)))))

    def sample(self, n: int | None, seed: int) -> PromptSet:
        """``n`` records drawn without replacement by a seeded permutation (numpy ``default_rng(seed)``), kept in
        file order; all records (unshuffled) if ``n`` is None or at least the set's size. For seed-to-seed spread
        of estimates from disjoint-ish training samples."""
        if n is None or n >= len(self):
            return self
        import numpy as np

        keep = sorted(np.random.default_rng(seed).permutation(len(self))[:n].tolist())
        return self.subset(keep)

    def describe(self) -> dict:
        """Provenance stored in runs: name, source, sha256, split, count, and ``split_ignored`` with a note when the
        file has no splits and was used whole although a split was asked for."""
        d = {"name": self.name, "source": self.source, "sha256": self.sha256, "split": self.split, "n": len(self)}
        if self.split_ignored:
            d["split_ignored"] = self.split_ignored
            d["split_note"] = (f"the file has no splits: all {len(self)} prompts were used for split "
                               f"{self.split_ignored!r}")
        return d


def _record(obj: dict, line: int, where: str, column: str | None, idx: int, stem: str) -> dict:
    key = column or ("prompt" if "prompt" in obj else "instruction" if "instruction" in obj else None)
    if key is None or key not in obj:
        raise ToolkitError(f"{where}: line {line}: no {column or 'prompt'!r} field")
    text = obj[key]
    if not isinstance(text, str) or not text.strip():
        raise ToolkitError(f"{where}: line {line}: the {key!r} field is empty or not text")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise ToolkitError(f"{where}: line {line}: unknown split {split!r} (train, val or test)")
    return {"id": str(obj.get("id", f"{stem}-{idx + 1:04d}")), "prompt": text.strip(),
            "category": str(obj.get("category") or "none"), "split": split}


def distinct_names(sets: list[PromptSet]) -> list[PromptSet]:
    """The sets with names that tell different sources apart: sets from different files that share a name (the file
    stem, e.g. ``in/h.jsonl`` and ``in/other/h.jsonl``) are renamed by their paths below the files' common folder,
    with ``__`` for ``/`` (``h`` and ``other__h``; with the file suffix if only that differs), so their rows in a run's tables cannot be confused. Sets of one
    source keep their name; names that are already distinct are unchanged.

    Returns:
        A list of the same length and order (renamed sets are copies).
    """
    import dataclasses

    by_name: dict[str, set[str]] = {}
    for ps in sets:
        by_name.setdefault(ps.name, set()).add(ps.source)
    clash = {n for n, srcs in by_name.items() if len(srcs) > 1}
    if not clash:
        return list(sets)
    renamed = {}
    for n in clash:
        paths = {s: Path(s).resolve() for s in by_name[n]}
        base = Path(os.path.commonpath([str(p.parent) for p in paths.values()]))
        names = {s: "__".join(p.relative_to(base).with_suffix("").parts) for s, p in paths.items()}
        if len(set(names.values())) < len(names):  # in/h.jsonl and in/h.csv: keep the suffixes
            names = {s: "__".join(p.relative_to(base).parts) for s, p in paths.items()}
        for s, new in names.items():
            renamed[(n, s)] = new
    return [dataclasses.replace(ps, name=renamed[(ps.name, ps.source)]) if ps.name in clash else ps for ps in sets]


def load_prompt_set(spec: str, column: str | None = None) -> PromptSet:
    """Load a prompt set.

    Args:
        spec: a built-in name (``harmful``, ``harmless``, ``borderline``), a path to ``.jsonl``, ``.json``
            (list of objects or strings), ``.csv``/``.tsv`` or ``.txt`` (one prompt per line), or
            ``hf:OWNER/NAME[:SPLIT]`` for a Hugging Face dataset (needs the ``datasets`` package and network).
        column: field or column holding the prompt (default ``prompt``, then ``instruction``).

    Raises:
        ToolkitError: missing file, empty set, malformed line (with its number), duplicate ids, missing column.
    """
    if spec in BUILTIN:
        path = BUILTIN_DIR / f"{spec}.jsonl"
        if not path.is_file():
            raise ToolkitError(f"built-in prompt set {spec!r} is missing at {path}")
    elif spec.startswith("hf:"):
        return _load_hf(spec[3:], column)
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ToolkitError(f"no such prompt file: {spec} (built-in sets: {', '.join(BUILTIN)})")
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"{path}: not UTF-8 text") from None
    stem, where, suffix = path.stem, str(path), path.suffix.lower()
    records = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ToolkitError(f"{where}: line {n}: malformed JSON ({e.msg})") from None
            if isinstance(obj, str):
                obj = {"prompt": obj}
            if not isinstance(obj, dict):
                raise ToolkitError(f"{where}: line {n}: expected a JSON object")
            records.append(_record(obj, n, where, column, len(records), stem))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ToolkitError(f"{where}: line {e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise ToolkitError(f"{where}: expected a JSON list of prompts")
        for n, obj in enumerate(data, 1):
            obj = {"prompt": obj} if isinstance(obj, str) else obj
            if not isinstance(obj, dict):
                raise ToolkitError(f"{where}: item {n}: expected an object or a string")
            records.append(_record(obj, n, where, column, len(records), stem))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if column and reader.fieldnames and column not in reader.fieldnames:
            raise ToolkitError(f"{where}: no column {column!r} (columns: {', '.join(reader.fieldnames)})")
        for n, row in enumerate(reader, 2):
            records.append(_record(row, n, where, column, len(records), stem))
    elif suffix == ".txt":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_record({"prompt": line}, n, where, None, len(records), stem))
    else:
        raise ToolkitError(f"{where}: unsupported prompt file type {suffix!r} (use .jsonl, .json, .csv, .tsv, .txt)")
    if not records:
        raise ToolkitError(f"{where}: no prompts")
    seen = set()
    for r in records:
        if r["id"] in seen:
            raise ToolkitError(f"{where}: duplicate prompt id {r['id']!r}")
        seen.add(r["id"])
    return PromptSet(stem if spec not in BUILTIN else spec, str(path), sha, records)


def _load_hf(ds: str, column: str | None) -> PromptSet:
    """Load ``OWNER/NAME[:SPLIT]`` with the ``datasets`` package (online)."""
    name, _, split = ds.partition(":")
    try:
        import datasets  # type: ignore
    except ImportError:
        raise ToolkitError("loading a Hugging Face dataset needs the 'datasets' package: pip install datasets") from None
    try:
        d = datasets.load_dataset(name, split=split or "train")
    except Exception as e:
        raise ToolkitError(f"could not load dataset {name!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    col = column or next((c for c in ("prompt", "instruction", "goal", "text") if c in d.column_names), None)
    if col is None or col not in d.column_names:
        raise ToolkitError(f"dataset {name!r} has no column {column or 'prompt'!r} (columns: {d.column_names})")
    records = [_record({"prompt": t, "id": f"{i + 1:05d}"}, i + 1, name, None, i, name) for i, t in enumerate(d[col])]
    sha = hashlib.sha256("\n".join(r["prompt"] for r in records).encode()).hexdigest()
    return PromptSet(name.replace("/", "__"), f"hf:{ds}", sha, records)
