"""The run store: every command writes ``runs/<command>/<name>/`` atomically, with ``run.json`` provenance.

A run is built in a hidden temporary folder beside its final place and renamed into place only when complete,
so a failure never leaves a partial run. An existing run is replaced only with ``force=True``.

``run.json`` holds: ``schema_version``, ``command``, ``argv``, ``name``, ``created``, ``model`` (id, hash,
dtype, ...), ``prompt_sets`` (name, source, sha256, split, n), ``seed``, ``versions`` (python, torch,
transformers, refusal-toolkit), ``git_commit``, ``timings`` (seconds), ``params`` and ``results``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
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


def default_name() -> str:
    """A timestamp name such as ``20261121-204500``."""
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


class Run:
    """A run being written. Use as a context manager; call :meth:`finish` to publish it.

    Args:
        command: subcommand name (folder under ``runs/``).
        name: run name; default a timestamp.
        force: replace an existing run of that name.
        root: runs folder (default :func:`runs_root`).

    Raises:
        ToolkitError: the run exists and ``force`` is false, or the name is not a plain folder name.
    """

    def __init__(self, command: str, name: str | None = None, force: bool = False, root: Path | None = None):
        name = name or default_name()
        if not name or "/" in name or name.startswith(".") or name in ("..",):
            raise ToolkitError(f"bad run name {name!r}: use a plain folder name")
        self.command, self.name, self.force = command, name, force
        self.final = (root or runs_root()) / command / name
        if self.final.exists() and not force:
            raise ToolkitError(f"run {self.final} already exists; choose another --name or pass --force")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{name}.tmp-"))
        self.t0 = time.time()
        self.timings: dict[str, float] = {}
        self.meta: dict = {}
        self.done = False

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self.done:
            shutil.rmtree(self.dir, ignore_errors=True)
        return False

    def path(self, name: str) -> Path:
        """Path of a file inside the (temporary) run folder."""
        return self.dir / name

    def write_csv(self, name: str, df) -> Path:
        """Write a pandas DataFrame as CSV inside the run."""
        p = self.path(name)
        df.to_csv(p, index=False)
        return p

    def write_json(self, name: str, obj) -> Path:
        """Write JSON inside the run."""
        p = self.path(name)
        p.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
        return p

    def time(self, key: str, seconds: float) -> None:
        """Record a timing (seconds) in ``run.json``."""
        self.timings[key] = round(float(seconds), 3)

    def finish(self, *, model: dict | None, prompt_sets: list[dict], seed: int | None, params: dict,
               results: dict) -> Path:
        """Write ``run.json`` and move the run into place (replacing an old one only if forced).

        Returns:
            The final run folder.
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
        self.write_json("run.json", doc)
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.dir, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.final


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


def load_run(path: str | Path, command: str | None = None) -> tuple[Path, dict]:
    """Open a finished run folder (or its ``run.json``) -> (folder, parsed run.json).

    Args:
        path: ``runs/<command>/<name>``, its ``run.json``, or just ``<name>`` when ``command`` is given.
        command: expected command; checked against the run.

    Raises:
        ToolkitError: no such run, unreadable run.json, schema too new, or a run of another command.
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
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ToolkitError(f"{meta_path}: malformed run.json ({e.msg})") from None
    if meta.get("schema_version", 0) > SCHEMA_VERSION:
        raise ToolkitError(f"{meta_path}: schema version {meta.get('schema_version')} is newer than this toolkit's")
    if command and meta.get("command") != command:
        raise ToolkitError(f"{path} is a '{meta.get('command')}' run, expected a '{command}' run")
    return p, meta
