"""Run EleutherAI lm-evaluation-harness tasks on the model as the toolkit has it.

lm-evaluation-harness (Gao et al., "A framework for few-shot language model evaluation", EleutherAI,
https://github.com/EleutherAI/lm-evaluation-harness; PyPI ``lm-eval``; Heretic uses it to check that abliteration
keeps capabilities) scores a model on benchmark tasks. :func:`run_lm_eval` hands it the *already loaded*
``transformers`` model and tokenizer of a :class:`toolkit.models.LoadedModel`, wrapped in lm-eval's own Hugging Face
wrapper (``lm_eval.models.huggingface.HFLM``), so whatever the toolkit did to that model counts: weights edited in
place (:func:`toolkit.interventions.orthogonalize_weights`) and forward hooks registered by an intervention context
manager (:func:`toolkit.interventions.directional_ablation`, :func:`toolkit.interventions.activation_addition`
without ``positions``), which is opened around the evaluation only and closed (hooks removed) after it, even on error.

How lm-eval scores, and what that means here:

* ``multiple_choice`` / ``loglikelihood`` tasks: each (context, continuation) pair is tokenized as
  ``tokenizer.encode(context + continuation)`` split after ``len(tokenizer.encode(context))`` tokens (trailing spaces
  of the context move to the continuation); the summed log-probability of the continuation tokens is read from one
  forward pass ``model(input_ids)`` over a batch padded on the *right* with no attention mask (harmless for a causal
  LM: padding comes after every scored position). HFLM does this whatever the tokenizer's ``padding_side`` (the
  toolkit's tokenizers pad on the left); for ``generate_until`` tasks it pads on the left itself, with an attention
  mask, and restores the tokenizer's padding side afterwards. ``acc`` picks the choice with the highest summed
  log-likelihood, ``acc_norm`` the highest per byte of the choice's text.
* No chat template is applied unless ``apply_chat_template=True`` (lm-eval's default is plain text, which is how
  published scores of base *and* instruct models are usually produced; with it, the context is rendered as a user
  turn with the tokenizer's chat template and a generation prompt, and multi-shot examples as turns).
* Interventions that address prompt positions (``activation_addition(..., positions=[-1])``) are refused: lm-eval's
  passes are context plus continuation, right-padded, outside the toolkit's Runner, so "the last prompt positions"
  do not exist there. Interventions at every position (ablation, addition without positions) are exact.
* lm-eval seeds Python's, NumPy's and torch's global random generators; their states are restored afterwards.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ToolkitError

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'refusal-toolkit[lm-eval]'"


@dataclass
class LmEvalResult:
    """What :func:`run_lm_eval` measured.

    Attributes:
        metrics: ``{task or group name: {metric: value}}``, plain floats (``None`` where lm-eval reports none, e.g. a
            stderr of ``"N/A"`` or a NaN); metric names as lm-eval's (``acc``, ``acc_stderr``, ``acc_norm``,
            ``acc_norm_stderr``, ...) with the filter appended after a comma when it is not ``none``
            (``exact_match,strict-match``). Accuracies are fractions in [0, 1]; ``*_stderr`` their standard errors.
        lm_eval_version: the installed lm-eval version.
        tasks: the task names asked for.
        limit: the per-task item limit passed on (None: every item; a float < 1 is a fraction).
        n_samples: ``{task: number of items evaluated}`` (after ``limit``).
        num_fewshot: the few-shot override passed on (None: each task's own).
        model_id, model_hash: the model's provenance (:class:`toolkit.models.LoadedModel`).
        intervention: whether an intervention context manager was open during the evaluation.
        samples: ``{task: [per-item record]}``: ``doc_id``, ``target`` and ``resps`` (lm-eval's filtered responses:
            for loglikelihood tasks ``[summed log-likelihood (nats), is_greedy]`` per choice) and the item's metrics;
            not part of :meth:`describe`.
    """

    metrics: dict[str, dict[str, float | None]]
    lm_eval_version: str
    tasks: list[str]
    limit: int | float | None
    n_samples: dict[str, int]
    num_fewshot: int | None = None
    model_id: str | None = None
    model_hash: str | None = None
    intervention: bool = False
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)

    def describe(self) -> dict:
        """A JSON-safe summary (no per-item samples)."""
        return {"lm_eval_version": self.lm_eval_version, "tasks": list(self.tasks), "limit": self.limit,
                "num_fewshot": self.num_fewshot, "n_samples": dict(self.n_samples), "model_id": self.model_id,
                "model_hash": self.model_hash, "intervention": self.intervention,
                "metrics": {t: dict(m) for t, m in self.metrics.items()}}


def _import_lm_eval():
    """lm_eval's modules, imported lazily.

    Raises:
        ToolkitError: lm-eval is not installed (or cannot be imported).
    """
    try:
        import lm_eval
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ToolkitError(INSTALL_HINT) from e
    return lm_eval, evaluator, HFLM, TaskManager


def _plain(v: Any) -> float | None:
    """A metric value as a finite float, else None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _plain(x)
    return str(x)


@contextlib.contextmanager
def _kept_rng_state():
    """Restore Python's, NumPy's and torch's global random states on exit (lm-eval reseeds them)."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


_MANAGERS: dict[tuple, Any] = {}


def _task_manager(TaskManager, include_path: str | Path | None):
    """lm-eval's ``TaskManager`` for ``include_path``, reused within the process while no YAML under that folder
    changes (building one indexes every built-in task: about 7 s on two CPU cores)."""
    key: tuple = (None,)
    if include_path is not None:
        root = Path(include_path).resolve()
        key = (str(root), tuple(sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*.y*ml"))))
    if key not in _MANAGERS:
        if len(_MANAGERS) >= 8:
            _MANAGERS.clear()
        _MANAGERS[key] = TaskManager(include_path=key[0])
    return _MANAGERS[key]


def _check_tasks(tasks: list[str], manager) -> None:
    """Refuse names that are neither a registered task/group/tag nor a task YAML file."""
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not (t.endswith((".yaml", ".yml")) and Path(t).is_file())]
    if unknown:
        raise ToolkitError(f"unknown lm-eval task(s): {', '.join(unknown)} (not a registered task, group or tag, "
                           "nor a task YAML; local tasks need `include_path`)", param="tasks")


def run_lm_eval(lm, tasks: str | list[str], *, intervention=None, limit: int | float | None = None,
                batch_size: int = 8, include_path: str | Path | None = None, num_fewshot: int | None = None,
                apply_chat_template: bool = False, bootstrap_iters: int = 100000) -> LmEvalResult:
    """Evaluate ``lm`` (as it is now: edited weights, and ``intervention``'s hooks if given) on lm-eval tasks.

    Args:
        lm: a :class:`toolkit.models.LoadedModel`; its model and tokenizer are used as they are (not reloaded, not
            copied, not moved).
        tasks: lm-eval task, group or tag names (``"arc_easy"``, ``"mmlu"``), or paths of task YAML files.
        intervention: a context manager not yet entered (``directional_ablation(lm.model, direction)``), opened
            around the evaluation only; its hooks are removed on exit. Must act at every position (see module doc).
        limit: items per task (an int), or a fraction of each task (a float < 1); None: all. For testing: lm-eval's
            scores on a limited task are not comparable with published ones.
        batch_size: requests per forward pass (HFLM's ``batch_size``; ``"auto"`` is lm-eval's own search).
        include_path: a folder of local task YAMLs, added to lm-eval's task index (``TaskManager(include_path=...)``).
            Relative ``dataset_kwargs.data_files`` in those YAMLs are resolved by Hugging Face ``datasets`` against
            the working directory.
        num_fewshot: few-shot examples per item, overriding the tasks' own (tasks that fix 0 keep 0).
        apply_chat_template: render contexts with the tokenizer's chat template (lm-eval's ``apply_chat_template``).
        bootstrap_iters: lm-eval's bootstrap resamples for metrics without an analytic stderr (0: none).

    Returns:
        An :class:`LmEvalResult` (metrics per task, as plain floats).

    Raises:
        ToolkitError: lm-eval is not installed; no task, or an unknown one (named); ``include_path`` is not a folder;
            bad ``limit`` / ``batch_size`` / ``num_fewshot``; an intervention that addresses prompt positions; a
            task's dataset cannot be loaded (e.g. offline and not cached).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = [str(t) for t in tasks]
    if not tasks:
        raise ToolkitError("no lm-eval task given", param="tasks")
    if limit is not None and (isinstance(limit, bool) or not limit > 0):
        raise ToolkitError(f"must be positive, got {limit!r}", param="limit")
    if batch_size != "auto" and (isinstance(batch_size, bool) or int(batch_size) < 1):
        raise ToolkitError(f"must be a positive integer, got {batch_size!r}", param="batch_size")
    if num_fewshot is not None and num_fewshot < 0:
        raise ToolkitError(f"must be >= 0, got {num_fewshot!r}", param="num_fewshot")
    if include_path is not None and not Path(include_path).is_dir():
        raise ToolkitError(f"not a folder: {include_path}", param="include_path")

    lm_eval, evaluator, HFLM, TaskManager = _import_lm_eval()
    version = getattr(lm_eval, "__version__", None)
    if version is None:
        from importlib.metadata import version as _v
        version = _v("lm_eval")

    manager = _task_manager(TaskManager, include_path)
    _check_tasks(tasks, manager)

    from .hooks import active_hooks

    hflm = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    with _kept_rng_state(), (intervention if intervention is not None else contextlib.nullcontext()):
        if intervention is not None and active_hooks(lm.model).depth:
            raise ToolkitError("the intervention addresses prompt positions, which lm-eval's passes do not have; "
                               "use one that acts at every position (e.g. activation addition without positions)",
                               param="intervention")
        try:
            out = evaluator.simple_evaluate(
                model=hflm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=True, apply_chat_template=apply_chat_template, bootstrap_iters=bootstrap_iters)
        except ToolkitError:
            raise
        except (FileNotFoundError, ConnectionError, OSError) as e:  # datasets offline / missing file
            msg = " ".join(str(e).split())[:300]
            raise ToolkitError(f"lm-eval could not load a task's data: {type(e).__name__}: {msg}") from e
    if out is None:  # not rank 0 (distributed), which a single in-process model never is
        raise ToolkitError("lm-eval returned no results")

    metrics: dict[str, dict[str, float | None]] = {}
    for name, row in out["results"].items():
        m = {}
        for key, v in row.items():
            if key in ("alias", "name", "sample_len", " ") or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            m[metric if filt == "none" else key] = _plain(v)
        metrics[name] = m
    n_samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in out.get("n-samples", {}).items()}
    samples = {t: [{"doc_id": _jsonable(s.get("doc_id")), "target": _jsonable(s.get("target")),
                    "resps": _jsonable(s.get("filtered_resps")),
                    **{k: _jsonable(s[k]) for k in s.get("metrics", []) if k in s}} for s in rows]
               for t, rows in (out.get("samples") or {}).items()}
    return LmEvalResult(metrics=metrics, lm_eval_version=str(version), tasks=tasks, limit=limit, n_samples=n_samples,
                        num_fewshot=num_fewshot, model_id=getattr(lm, "model_id", None),
                        model_hash=getattr(lm, "model_hash", None), intervention=intervention is not None,
                        samples=samples)
