"""The run store: every command writes ``runs/<command>/<name>/`` atomically, with ``run.json`` provenance.

A run is built in a hidden temporary folder beside its final place and renamed into place only when complete,
so a failure never leaves a partial run. An existing run is replaced only with ``force=True``; two commands given
one name cannot both publish (the second fails at start), and default names carry a random suffix.

``run.json`` holds: ``schema_version``, ``command``, ``argv``, ``name``, ``created``, ``model`` (id, hash,
dtype, ...), ``prompt_sets`` (name, source, sha256, split, n), ``seed``, ``versions`` (python, torch,
transformers, refusal-toolkit), ``git_commit``, ``timings`` (seconds), ``params`` and ``results``. It is strict JSON:
a value that is not a finite number (NaN, an infinity; e.g. an undefined interval) is written as ``null``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from .errors import ToolkitError

SCHEMA_VERSION = 1


def runs_root() -> Path:
    """``$REFUSAL_RUNS`` if set, else ``./runs``."""
    return Path(os.environ.get("REFUSAL_RUNS", "runs"))


def git_commit() -> str | None:
    """The toolkit's git commit (with ``-dirty`` if the tree has changes), or None outside a checkout."""
    here = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    """Versions of Python and the main libraries."""
    import torch
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "refusal-toolkit": __version__}


NAME_MAX_BYTES = 200  # a run name's limit in UTF-8 bytes: the file system's 255 less the temporary-folder affixes
STALE_AFTER_S = 24 * 3600  # a temporary run folder whose owner cannot be checked counts as abandoned after this
OWNER_FILE = ".refusal-run-owner.json"


def default_name() -> str:
    """A timestamp name with a random 24-bit suffix, such as ``20261121-204500-3f9c0a``: two commands started in the
    same second get one name with probability 2^-24, and then the second fails at start (:class:`Run`), never
    silently."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def check_name(name: str) -> str:
    """A run name as given, if it is a plain folder name of at most :data:`NAME_MAX_BYTES` UTF-8 bytes.

    Raises:
        ToolkitError: empty, a path (``/``, ``\\``), hidden (leading ``.``), a control character, or too long.
    """
    if (not name or "/" in name or "\\" in name or name.startswith(".") or not name.isprintable()):
        raise ToolkitError(f"bad run name {name!r}: use a plain folder name")
    if len(name.encode()) > NAME_MAX_BYTES:
        raise ToolkitError(f"run name of {len(name.encode())} bytes is too long (at most {NAME_MAX_BYTES})")
    return name


def to_strict_json(obj):
    """``obj`` with every non-finite float (NaN, +-Infinity) replaced by None and numpy scalars by Python ones, so
    that ``json.dumps(..., allow_nan=False)`` succeeds and strict parsers can read the result."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if isinstance(obj, dict):
        return {k: to_strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_strict_json(v) for v in obj]
    if np is not None and isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _owner_alive(folder: Path) -> bool:
    """Whether the process that owns a temporary run folder may still be running (see :data:`OWNER_FILE`)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        owner = None
    if owner is not None and host == socket.gethostname():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:  # another machine's run (shared file system) or no owner file: judged by age
        return time.time() - folder.stat().st_mtime < STALE_AFTER_S
    except OSError:
        return False


def clean_stale(parent: Path) -> list[Path]:
    """Remove the abandoned temporary run folders (``.NAME.tmp*``, ``.NAME.old-*``) under a command's folder: those
    whose owning process on this machine is gone (a SIGKILL, a power cut), and ownerless or other machines' ones
    older than :data:`STALE_AFTER_S`.

    Returns:
        The folders removed.
    """
    removed = []
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        if p.name.startswith(".") and (".tmp" in p.name or ".old-" in p.name) and p.is_dir() and not _owner_alive(p):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


class Run:
    """A run being written. Use as a context manager; call :meth:`finish` to publish it.

    The run is written in a hidden temporary folder ``runs/<command>/.NAME.tmp`` beside its final place, created
    exclusively (so a second command started with the same name fails at once, naming the first one's process)
    with the user's umask, and renamed into place by :meth:`finish`. An existing run is never replaced unless
    ``force`` is true, also when it appeared while this one was running. On failure nothing is left: the temporary
    folder and any runs folders this run created are removed. Abandoned temporary folders of killed commands are
    cleaned at the next start (:func:`clean_stale`).

    Args:
        command: subcommand name (folder under ``runs/``).
        name: run name (:func:`check_name`); default :func:`default_name`.
        force: replace an existing run of that name.
        root: runs folder (default :func:`runs_root`).

    Raises:
        ToolkitError: the run exists and ``force`` is false; another process is writing a run of that name; a bad
            name; the runs folder is a file or cannot be written.
    """

    def __init__(self, command: str, name: str | None = None, force: bool = False, root: Path | None = None):
        name = check_name(name) if name is not None else default_name()
        self.command, self.name, self.force = command, name, force
        root = Path(root) if root is not None else runs_root()
        self.final = root / command / name
        if self.final.exists() and not force:
            raise ToolkitError(f"run {self.final} already exists; choose another `name` or pass `force`")
        self._created: list[Path] = []
        self.dir = self.final.parent / f".{name}.tmp"
        mine = False
        for d in (root, root / command):
            if d.exists() and not d.is_dir():
                raise ToolkitError(f"runs folder {d} is a file, not a folder (see $REFUSAL_RUNS)")
        try:
            for d in reversed([self.final.parent, *self.final.parent.parents]):
                if not d.exists():
                    d.mkdir()
                    self._created.append(d)
            clean_stale(self.final.parent)
            try:
                self.dir.mkdir()
                mine = True
            except FileExistsError:
                raise ToolkitError(f"run {self.final} is being written by another process ({_owner_text(self.dir)}); "
                                   "choose another `name`") from None
            (self.dir / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                           "started": time.time()}))
        except OSError as e:
            if mine:
                shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_created()
            raise ToolkitError(f"cannot write runs under {root}: {e.strerror or e}") from None
        self.t0 = time.time()
        self.timings: dict[str, float] = {}
        self.done = False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._remove_created()
        return False

    def _remove_created(self) -> None:
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty

    def path(self, name: str) -> Path:
        """Path of a file inside the (temporary) run folder."""
        return self.dir / name

    def write_csv(self, name: str, df) -> Path:
        """Write a pandas DataFrame as CSV inside the run."""
        p = self.path(name)
        df.to_csv(p, index=False)
        return p

    def write_json(self, name: str, obj) -> Path:
        """Write strict JSON inside the run: NaN and infinities become ``null`` (:func:`to_strict_json`)."""
        p = self.path(name)
        p.write_text(json.dumps(to_strict_json(obj), indent=2, default=_json_default, allow_nan=False) + "\n")
        return p

    def time(self, key: str, seconds: float) -> None:
        """Record a timing (seconds) in ``run.json``."""
        self.timings[key] = round(float(seconds), 3)

    def finish(self, *, model: dict | None, prompt_sets: list[dict], seed: int | None, params: dict,
               results: dict, judge: dict | None = None, damage: dict | None = None) -> Path:
        """Write ``run.json`` and move the run into place; an existing run is replaced only if ``force``.

        Args:
            judge: the refusal judge's record (:meth:`toolkit.judges.Judge.describe`: name, version, model, hash),
                for runs that judge completions; stored as ``run.json["judge"]``.
            damage: the damage measures computed and their settings, stored as ``run.json["damage"]``.

        Returns:
            The final run folder.

        Raises:
            ToolkitError: a run of this name appeared meanwhile and ``force`` is false, or the rename failed.
        """
        self.timings["total"] = round(time.time() - self.t0, 3)
        doc = {
            "schema_version": SCHEMA_VERSION,
            "command": self.command,
            "name": self.name,
            "argv": sys.argv,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": model,
            "prompt_sets": prompt_sets,
            "seed": seed,
            "versions": versions(),
            "git_commit": git_commit(),
            "timings": self.timings,
            "params": params,
            "results": results,
        }
        if judge is not None:
            doc["judge"] = judge
        if damage is not None:
            doc["damage"] = damage
        self.write_json("run.json", doc)
        (self.dir / OWNER_FILE).unlink(missing_ok=True)
        old = None
        try:
            if self.final.exists() or self.final.is_symlink():
                if not self.force:
                    raise ToolkitError(f"run {self.final} was created by another command while this one ran; "
                                       "nothing was replaced (use another `name`, or `force` to replace it)")
                old = self.final.with_name(f".{self.name}.old-{os.getpid()}")
                os.replace(self.final, old)
            os.rename(self.dir, self.final)  # fails on an existing non-empty folder: no silent replacement
        except OSError as e:
            raise ToolkitError(f"cannot publish run {self.final}: {e.strerror or e}") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.final


def _owner_text(folder: Path) -> str:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
        return f"pid {owner['pid']} on {owner['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "owner unknown"


# columns of a run's CSVs that hold identifiers: always read as text ("001" stays "001", "NA" stays "NA")
TEXT_COLUMNS = ("set", "id", "category", "split", "condition", "kind", "site", "positions", "part", "role")


def read_run_table(path: Path, what: str = "CSV"):
    """Read a run's CSV as a pandas DataFrame: only empty cells are missing ("NA", "None" stay text), identifier
    columns (:data:`TEXT_COLUMNS`) are text, and columns of True/False with gaps become pandas' nullable boolean.

    Args:
        path: the CSV file.
        what: what the file is, for messages (e.g. ``"summary"``).

    Raises:
        ToolkitError: the file is missing or cannot be parsed (empty, malformed, not UTF-8).
    """
    import numpy as np
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"no {what} at {path}")
    try:
        head = pd.read_csv(path, nrows=0)
        dtype = {c: str for c in head.columns if c in TEXT_COLUMNS}
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype=dtype)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ToolkitError(f"{path}: unreadable {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
            from None
    for c in df.columns:
        if df[c].dtype == object:
            vals = df[c].dropna()
            if len(vals) and vals.map(lambda v: isinstance(v, (bool, np.bool_))).all():
                df[c] = df[c].astype("boolean")
    return df


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# the fields of run.json that readers rely on, with their types (None allowed where a command has none)
_RUN_FIELDS = {"schema_version": (int,), "command": (str,), "name": (str,), "model": (dict, type(None)),
               "prompt_sets": (list,), "params": (dict,), "results": (dict,)}


def check_run_doc(meta, where) -> None:
    """Check the shape of a parsed ``run.json``: an object whose fields of :data:`_RUN_FIELDS` have their types
    (``schema_version`` and ``command`` required; the others may be absent); a model record with a text hash.

    Raises:
        ToolkitError: naming the file and the first field of the wrong type.
    """
    if not isinstance(meta, dict):
        raise ToolkitError(f"{where}: malformed run.json (a JSON object is expected, got {type(meta).__name__})")
    for key in ("schema_version", "command"):
        if key not in meta:
            raise ToolkitError(f"{where}: malformed run.json (no {key!r})")
    for key, types in _RUN_FIELDS.items():
        if key in meta and (not isinstance(meta[key], types) or isinstance(meta[key], bool)):
            raise ToolkitError(f"{where}: malformed run.json ({key!r} is a {type(meta[key]).__name__})")
    model = meta.get("model") or {}
    if not isinstance(model.get("hash", ""), (str, type(None))):
        raise ToolkitError(f"{where}: malformed run.json (model hash is not text)")
    if not all(isinstance(p, dict) for p in meta.get("prompt_sets", [])):
        raise ToolkitError(f"{where}: malformed run.json (a prompt set record is not an object)")


def load_run(path: str | Path, command: str | None = None) -> tuple[Path, dict]:
    """Open a finished run folder (or its ``run.json``) -> (folder, parsed run.json).

    Args:
        path: ``runs/<command>/<name>``, its ``run.json``, or just ``<name>`` when ``command`` is given.
        command: expected command; checked against the run.

    Raises:
        ToolkitError: no such run, unreadable or malformed run.json (:func:`check_run_doc`), schema too new, or a
            run of another command.
    """
    p = Path(path)
    if p.name == "run.json":
        p = p.parent
    if not p.exists() and command and len(p.parts) == 1:
        p = runs_root() / command / p
    meta_path = p / "run.json"
    if not meta_path.is_file():
        raise ToolkitError(f"no run at {path} (expected a folder with run.json)")
    try:
        meta = json.loads(meta_path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ToolkitError(f"{meta_path}: malformed run.json (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise ToolkitError(f"{meta_path}: malformed run.json ({e.msg})") from None
    except OSError as e:
        raise ToolkitError(f"{meta_path}: cannot read run.json ({e.strerror or e})") from None
    check_run_doc(meta, meta_path)
    if meta["schema_version"] > SCHEMA_VERSION:
        raise ToolkitError(f"{meta_path}: schema version {meta.get('schema_version')} is newer than this toolkit's")
    if command and meta.get("command") != command:
        raise ToolkitError(f"{path} is a '{meta.get('command')}' run, expected a '{command}' run")
    return p, meta


def reuse_baseline(spec: str, ps, lm, split: str, gen_tokens: int, limit: int | None, judge: dict | None = None):
    """Per-prompt baseline of prompt set ``ps`` read from a score run (``scores.csv``) instead of recomputed,
    checked for the same model (hash), prompt file (hash), split, limit and completion length.

    Args:
        spec: the score run (folder or name).
        ps: a :class:`toolkit.prompts.PromptSet`; lm: the :class:`toolkit.models.LoadedModel` evaluated.
        split, gen_tokens, limit: this run's settings, which must equal the score run's.
        judge: this run's judge record (:meth:`toolkit.judges.Judge.describe`); the score run's must be the same
            judge (name, version, model hash).

    Returns:
        :class:`toolkit.evaluation.Evaluation` with ``logits=None``.

    Raises:
        ToolkitError: not a score run, another model, another prompt file (hash), split, limit or
            completion length, or the set is missing from the run.
    """
    import numpy as np
    import pandas as pd

    from .evaluation import Evaluation

    folder, meta = load_run(spec, "score")
    if (meta.get("model") or {}).get("hash") != lm.model_hash:
        raise ToolkitError(f"baseline run {folder} was made with another model ({meta['model'].get('id')})")
    params = meta.get("params", {})
    if params.get("gen_tokens") != gen_tokens or params.get("split") != split or params.get("limit") != limit:
        raise ToolkitError(f"baseline run {folder} used split {params.get('split')}, `gen_tokens` "
                           f"{params.get('gen_tokens')}, `limit` {params.get('limit')}; this run uses {split}, "
                           f"{gen_tokens}, {limit}")
    if judge is not None and judge_key(judge_of(meta)) != judge_key(judge):
        raise ToolkitError(f"baseline run {folder} was judged by {judge_key(judge_of(meta))}, this run by "
                           f"{judge_key(judge)}; their verdicts are not comparable")
    sets = {p.get("name"): p for p in meta.get("prompt_sets", [])}
    if ps.name not in sets or sets[ps.name].get("sha256") != ps.sha256:
        raise ToolkitError(f"baseline run {folder} has no scores for prompt set {ps.name} with this file's hash")
    path = folder / "scores.csv"
    if not path.is_file():
        raise ToolkitError(f"baseline run {folder} has no scores.csv")
    df = read_run_table(path, "scores table")
    lacking = [c for c in ("set", "id", "score", "refusal", "completion") if c not in df.columns]
    if lacking:
        raise ToolkitError(f"{path}: not a score run's table (no column {lacking[0]!r})")
    df = df[df["set"] == ps.name].drop_duplicates("id").set_index("id")
    missing = [i for i in ps.ids if i not in df.index]
    if missing:
        raise ToolkitError(f"baseline run {folder} lacks prompt {missing[0]} of {ps.name}")
    df = df.loc[ps.ids]
    refusals = df["refusal"].map(lambda v: str(v) == "True").to_numpy()
    scores = pd.to_numeric(df["score"], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(scores).all():
        raise ToolkitError(f"{path}: a score of {ps.name} is missing or not a number")
    values = {"score": scores, "refusal": refusals}
    for c in df.columns:  # the score run's judge columns (verdict, confidence, markers beside, windows)
        if c.startswith(("refusal_", "refusal@")):
            values[c] = df[c].map(lambda v: str(v) == "True").to_numpy()
        elif c.startswith("verdict"):
            values[c] = df[c].fillna("").astype(str).to_numpy(dtype=object)
        elif c.startswith("confidence"):
            values[c] = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)
    return Evaluation(None, df["completion"].fillna("").astype(str).tolist(), values=values)


#: what a run made before judges were recorded was judged by: the binary marker judge of version 1
LEGACY_JUDGE = {"name": "markers", "version": "markers-1", "model": None, "model_hash": None}


def judge_of(meta: dict) -> dict | None:
    """The judge record of a parsed ``run.json``: its ``judge`` field; :data:`LEGACY_JUDGE` for score, extract,
    ablate, steer and dose-response runs written before judges were recorded; None for runs that judge nothing."""
    j = meta.get("judge")
    if isinstance(j, dict):
        return j
    if meta.get("command") in ("score", "extract", "ablate", "steer", "dose-response"):
        return LEGACY_JUDGE
    return None


def judge_key(judge: dict | None) -> str:
    """A judge record as one comparable text: ``name version [model hash prefix]``."""
    if judge is None:
        return "none"
    h = judge.get("model_hash")
    return f"{judge.get('name')} {judge.get('version')}" + (f" [{str(h)[:12]}]" if h else "")


def check_same_judge(metas: list[tuple[str, dict]], allow: bool = False) -> list[str]:
    """Refuse to put side by side runs whose refusal verdicts come from different judges.

    Args:
        metas: ``(label, parsed run.json)`` per run.
        allow: accept mixed judges (the caller then shows each row's judge).

    Returns:
        The judge key (:func:`judge_key`) per run.

    Raises:
        ToolkitError: two runs that judge completions used different judges (name, version or model) and
            ``allow`` is false.
    """
    keys = [judge_key(judge_of(m)) for _, m in metas]
    judged = [(label, k) for (label, m), k in zip(metas, keys) if judge_of(m) is not None]
    if not allow and len({k for _, k in judged}) > 1:
        (la, ka), (lb, kb) = judged[0], next((x for x in judged if x[1] != judged[0][1]))
        raise ToolkitError(f"{la} was judged by {ka} but {lb} by {kb}: their refusal rates are not comparable; "
                           "re-judge one (`refusal judge`) or accept the mix with `allow_mixed_judges`")
    return keys
