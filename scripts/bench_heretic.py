"""Benchmark: Heretic (PyPI ``heretic-llm``) against ``refusal optimize`` on one model, one prompt set, one budget.

Usage::

    python scripts/bench_heretic.py --name NAME [--model DIR] [--trials 50] [--startup-trials N] [--batch-size 16]
        [--kl-max 0.1] [--n-test 120] [--gen-tokens 64] [--judge markers] [--skip-ours | --skip-heretic]
        [--ours-run NAME] [--venv runs/heretic-venv]

Both tools search for a refusal-removing weight edit with the same trial budget, on the same model folder, with the
same training prompts (our ``train`` split) and the same search-time evaluation prompts (our ``val`` split). From
each tool's Pareto front (refusals vs first-token KL on the validation prompts) one trial is chosen by one rule:
the fewest refusals among Pareto trials with KL <= ``--kl-max``, else the lowest-KL Pareto trial. Both chosen edits
are saved as merged checkpoints and scored by one function (:func:`evaluate`) on the held-out ``test`` split:
refusals of greedy completions (``--gen-tokens``) judged by our judge, and the mean KL(base || edited) of the
first-token distributions on the harmless test prompts. The unedited model is scored too.

Heretic is AGPL-3.0: it is only *run* here, as a separate program in its own virtual environment (``--venv``,
built on first use: ``pip install torch==<ours>`` first so pip takes the local CPU wheel, then ``heretic-llm``).
No Heretic code is imported by this script or copied into it. It is driven as follows:

* ``config.toml`` in its working folder (Heretic reads ``./config.toml``): model, datasets (plain text files, one
  prompt per line, written from our JSONL splits), ``n_trials``, ``n_startup_trials``, a fixed ``batch_size``
  (skips its batch-size search), ``seed``, ``system_prompt``, ``export_strategy = "merge"``, a
  ``study_checkpoint_dir`` inside the working folder.
* ``KAGGLE_KERNEL_RUN_TYPE`` set in its environment: Heretic then asks its menu questions as numbered lists read
  with ``input()`` instead of full-screen questionary prompts, so this script answers them through a pipe
  (:func:`answer`): choose the trial, "Save the model to a local folder", the folder, then leave.
* Its Optuna journal (``<checkpoint dir>/<model>.jsonl``) is read after the run with the venv's own ``optuna``
  (a tiny dump script, :data:`DUMP_STUDY`) for every trial's parameters, refusals, KL and duration.

Results: ``runs/bench-heretic/<name>/{results.json,results.csv,heretic/...}`` and a table on the terminal.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERETIC_VERSION = "1.4.0"
MENU_ENV = "KAGGLE_KERNEL_RUN_TYPE"  # makes heretic.utils.is_notebook() true: numbered menus read with input()

# Run with the venv's python: prints the Heretic study (every trial) as JSON. Our code, using Optuna's public API.
DUMP_STUDY = r"""
import json, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
path = sys.argv[1]
storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
study = optuna.load_study(study_name="heretic", storage=storage)
trials = []
for t in study.trials:
    trials.append({"number": t.number, "state": t.state.name, "params": t.params, "values": t.values,
                   "user_attrs": t.user_attrs,
                   "duration_s": t.duration.total_seconds() if t.duration is not None else None})
json.dump({"user_attrs": study.user_attrs, "trials": trials}, sys.stdout, default=str)
"""


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/test_bench_heretic.py)
# ---------------------------------------------------------------------------------------------------------------

def pareto_front(trials: list[dict], refusals: str = "refusals", kl: str = "kl") -> list[dict]:
    """Trials not dominated in (refusals, kl), both minimised (:func:`toolkit.optimize.pareto_mask`); sorted by
    refusals then KL. Of exact ties the first one is kept."""
    from toolkit.optimize import pareto_mask

    seen, unique = set(), []
    for t in trials:
        if (t[refusals], t[kl]) not in seen:
            seen.add((t[refusals], t[kl]))
            unique.append(t)
    if not unique:
        return []
    mask = pareto_mask([[t[refusals], t[kl]] for t in unique], ["minimize", "minimize"])
    return sorted((t for t, keep in zip(unique, mask) if keep), key=lambda t: (t[refusals], t[kl]))


def choose_trial(front: list[dict], kl_max: float, refusals: str = "refusals", kl: str = "kl") -> dict:
    """The rule both tools share, :func:`toolkit.optimize.choose_trial`: fewest refusals among Pareto trials with KL
    <= ``kl_max`` (ties: lower KL), else the lowest-KL Pareto trial.

    Raises:
        ValueError: an empty front.
    """
    import pandas as pd

    from toolkit.optimize import choose_trial as rule

    if not front:
        raise ValueError("no Pareto trials to choose from")
    df = pd.DataFrame(front).reset_index(drop=True)
    row, _ = rule(df.assign(_i=range(len(df))), kl_max, refusal_key=refusals, kl_key=kl)
    return front[int(row["_i"])]


_CHOICE = re.compile(r"^\s*\[(\d+)\]\s+(.*?)\s*$")
_TRIAL = re.compile(r"\[Trial\s+(\d+)\]\s+Refusals:\s*(\d+)\s*/\s*(\d+),\s*KL divergence:\s*([-+0-9.eE]+|nan|inf)")


def parse_menu(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The last numbered menu in Heretic's output: ``(question, [(number, title)])``. In menu mode Heretic prints
    the question on one line, then ``[i] title`` lines, then asks ``Enter number:``."""
    lines = text.splitlines()
    end = len(lines)
    while end and not _CHOICE.match(lines[end - 1]):
        end -= 1
    start = end
    while start and _CHOICE.match(lines[start - 1]):
        start -= 1
    choices = [(int(m.group(1)), m.group(2)) for m in (_CHOICE.match(x) for x in lines[start:end])]
    question = ""
    for x in reversed(lines[:start]):
        if x.strip():
            question = x.strip()
            break
    return question, choices


def parse_trial_choice(title: str) -> dict | None:
    """``[Trial  12] Refusals:  3/40, KL divergence: 0.0456`` -> ``{"index", "refusals", "n", "kl"}``."""
    m = _TRIAL.search(title)
    if not m:
        return None
    return {"index": int(m.group(1)), "refusals": int(m.group(2)), "n": int(m.group(3)), "kl": float(m.group(4))}


def _pick(choices: list[tuple[int, str]], *starts: str) -> str:
    for s in starts:
        for i, title in choices:
            if title.startswith(s):
                return str(i)
    raise ValueError(f"none of {starts} among the menu choices {[t for _, t in choices]}")


_PROMPTS = ("Enter number", "Path to the folder", "How many additional trials do you want to run?")


def _tail(text: str) -> str:
    return text.rstrip().rstrip(":").rstrip()


def waiting(text: str) -> bool:
    """Heretic's output ends with one of its ``input()`` prompts (``Path to the folder:: `` included: its text
    prompts append ``": "`` to a message that already ends with a colon)."""
    return _tail(text).endswith(_PROMPTS)


def answer(text: str, state: dict) -> str:
    """The line to type at Heretic's prompt, given its output since the last answer (ending with the prompt).

    ``state`` carries ``save_dir``, ``kl_max`` and is updated with ``front`` (Pareto trials from the menu),
    ``chosen`` (the chosen trial), ``save_tries`` and ``saved``. Raises ``ValueError`` on a prompt it does not
    know (the caller then stops Heretic).
    """
    tail = _tail(text)
    if tail.endswith("Path to the folder"):
        state["save_tries"] = state.get("save_tries", 0) + 1
        return str(state["save_dir"])
    if tail.endswith("How many additional trials do you want to run?"):
        return ""
    question, choices = parse_menu(text)
    if not choices:
        raise ValueError(f"unknown Heretic prompt: {tail[-300:]!r}")
    if question.startswith("How would you like to proceed?"):
        return _pick(choices, "Continue the previous run", "Show the results from the previous run")
    if question.startswith("Which trial do you want to use?"):
        if state.get("saved") or state.get("save_tries", 0) >= 2:
            return _pick(choices, "Exit program")
        front = [dict(t, choice=i) for i, title in choices if (t := parse_trial_choice(title))]
        if not front:
            raise ValueError("Heretic listed no Pareto trials")
        state["front"] = front
        state["chosen"] = choose_trial(front, state["kl_max"])
        return str(state["chosen"]["choice"])
    if question.startswith("What do you want to do with the decensored model?"):
        if state.get("saved") or state.get("save_tries", 0) >= 2:
            return _pick(choices, "Return to the trial selection menu", "Exit program")
        return _pick(choices, "Save the model to a local folder")
    if question.startswith("How do you want to export the model?"):
        return _pick(choices, "Merge")
    raise ValueError(f"unknown Heretic menu {question!r}: {[t for _, t in choices]}")


def toml_dumps(cfg: dict) -> str:
    """A small TOML writer for Heretic's config: scalars, lists of scalars or of lists, and one level of tables."""

    def val(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"TOML has no {v}")
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v, ensure_ascii=False)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    top = [f"{k} = {val(v)}" for k, v in cfg.items() if not isinstance(v, dict)]
    tables = [f"\n[{k}]\n" + "\n".join(f"{kk} = {val(vv)}" for kk, vv in v.items())
              for k, v in cfg.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"


def write_prompt_file(prompts: list[str], path: Path) -> Path:
    """One prompt per line (Heretic's plain-text dataset format: lines are stripped, empty lines dropped)."""
    bad = [p for p in prompts if "\n" in p or "\r" in p or not p.strip()]
    if bad:
        raise ValueError(f"{len(bad)} prompts are empty or span lines, e.g. {bad[0][:80]!r}; Heretic's text format "
                         "holds one prompt per line")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p.strip() + "\n" for p in prompts), encoding="utf-8")
    return path


def heretic_datasets(splits: dict[str, list[str]], folder: Path) -> dict[str, dict]:
    """Write Heretic's four prompt files from our splits and return their config tables.

    ``splits``: ``harmful_train``, ``harmless_train`` (directions), ``harmful_eval``, ``harmless_eval`` (the
    search's own evaluation). Harmless is Heretic's "good", harmful its "bad".
    """
    names = {"good_prompts": "harmless_train", "bad_prompts": "harmful_train",
             "good_evaluation_prompts": "harmless_eval", "bad_evaluation_prompts": "harmful_eval"}
    out = {}
    for key, split in names.items():
        path = write_prompt_file(splits[split], Path(folder) / f"{split}.txt")
        out[key] = {"dataset": str(path.resolve()), "column": "text"}
    return out


def heretic_config(model: str, datasets: dict[str, dict], *, trials: int, startup_trials: int, batch_size: int,
                   seed: int, system: str, checkpoint_dir: str, dtype: str = "auto", max_tokens: int = 100,
                   kl_target: float | None = None, prefix_check: bool = True) -> dict:
    """Heretic's ``config.toml`` as a dict (keys of Heretic 1.4.0's ``Settings``)."""
    cfg = {"model": model, "dtypes": [dtype], "device_map": "cpu" if _no_gpu() else "auto",
           "batch_size": batch_size, "max_response_length": max_tokens, "n_trials": trials,
           "n_startup_trials": startup_trials, "seed": seed, "system_prompt": system,
           "study_checkpoint_dir": checkpoint_dir, "export_strategy": "merge"}
    if kl_target is not None:
        cfg["kl_divergence_target"] = kl_target
    if not prefix_check:
        cfg["response_prefix"] = ""  # no common-response-prefix search (200 greedy completions)
    cfg.update(datasets)
    return cfg


def default_startup_trials(trials: int) -> int:
    """Heretic's default proportion (60 random start-up trials of 200), at least 1, fewer than ``trials``."""
    return max(1, min(trials - 1, round(0.3 * trials))) if trials > 1 else 1


def venv_commands(venv: Path, torch_version: str) -> list[list[str]]:
    """Build Heretic's venv: CPU torch first (the local wheel, not the multi-GB CUDA build), then heretic-llm."""
    pip = str(Path(venv) / "bin" / "pip")
    return [[sys.executable, "-m", "venv", str(venv)],
            [pip, "install", f"torch=={torch_version}"],
            [pip, "install", f"heretic-llm=={HERETIC_VERSION}"]]


def heretic_command(venv: Path) -> list[str]:
    """Heretic's command line: everything else is in ``config.toml`` in its working folder."""
    return [str(Path(venv) / "bin" / "heretic")]


def heretic_env(base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    env.update({MENU_ENV: "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "NO_COLOR": "1"})
    return env


def ours_optimize_command(refusal: list[str], name: str, model: str, trials: int, system: str | None,
                          extra: list[str] = (), *, startup: int | None = None, n_train: int | None = None,
                          n_val: int | None = None, kl_max: float | None = None, dtype: str | None = None,
                          batch_size: int | None = None, forms: str | None = None) -> list[str]:
    """``refusal optimize`` with the budget and data Heretic gets; ``--no-test``: the test split is scored here."""
    cmd = [*refusal, "optimize", "--name", name, "--model", model, "--trials", str(trials), "--force", "--no-test"]
    for flag, v in (("--startup", startup), ("--n-train", n_train), ("--n-val", n_val), ("--kl-max", kl_max),
                    ("--dtype", dtype), ("--batch-size", batch_size), ("--forms", forms), ("--system", system)):
        if v is not None:
            cmd += [flag, str(v)]
    return cmd + list(extra)


def ours_export_command(refusal: list[str], name: str, trial: int, save: Path) -> list[str]:
    return [*refusal, "optimize", "--name", name, "--export", str(trial), "--save", str(save), "--replace-save"]


def read_pareto_csv(path: Path) -> list[dict]:
    """Our ``pareto.csv``: rows with ``trial`` (int), ``refusal_rate`` (the ``refusal`` objective, a rate; either
    column name) and ``kl`` (floats); other columns as text."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r = dict(r)
            r["trial"] = int(float(r["trial"]))
            r["refusal_rate"] = float(r["refusal_rate"] if r.get("refusal_rate") not in (None, "") else r["refusal"])
            r["kl"] = float(r["kl"])
            rows.append(r)
    return rows


def mean_column(path: Path, column: str) -> tuple[int, float | None]:
    """(rows, mean of a numeric column over the rows that have it) of a CSV file."""
    n, vals = 0, []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            n += 1
            try:
                vals.append(float(r[column]))
            except (KeyError, TypeError, ValueError):
                pass
    return n, (sum(vals) / len(vals) if vals else None)


def heretic_trials(study: dict) -> list[dict]:
    """Flatten the dumped Heretic study: one row per completed trial with ``index`` (Heretic's 1-based trial
    number as shown in its menu), ``refusals``, ``n``, ``kl``, ``duration_s``, ``params``."""
    rows = []
    for t in study["trials"]:
        ua = t.get("user_attrs", {})
        if t.get("state") != "COMPLETE" or "refusals" not in ua:
            continue
        rows.append({"index": ua.get("index", t["number"] + 1), "refusals": int(ua["refusals"]),
                     "n": ua.get("n_bad_prompts"), "base_refusals": ua.get("base_refusals"),
                     "kl": float(ua["kl_divergence"]), "duration_s": t.get("duration_s"),
                     "params": t.get("params", {}), "direction_index": ua.get("direction_index"),
                     "parameters": ua.get("parameters")})
    return rows


_PHASES = [  # (phase, first line of Heretic's output that starts it)
    ("load model", "Loading model"),
    ("load prompts", "Loading good prompts"),
    ("response prefix check", "Checking for common response prefix"),
    ("base evaluation", "Loading good evaluation prompts"),
    ("refusal directions", "Calculating per-layer refusal directions"),
    ("trials", "Running trial"),
    ("menu and save", "Optimization finished"),
]


def phase_times(lines: list[tuple[float, str]]) -> dict[str, float]:
    """Seconds spent in each phase of a Heretic run, from its timestamped output lines ``(t, line)``: the phase
    starts at the first line starting with its marker and ends where the next phase found starts (the last at the
    last line). Within ``trials``: ``trial: abliterate`` and ``trial: evaluate`` (KL + refusal count) summed."""
    starts = []
    for phase, marker in _PHASES:
        t = next((t for t, x in lines if x.lstrip().startswith(marker)), None)
        if t is not None:
            starts.append((t, phase))
    starts.sort()
    out: dict[str, float] = {}
    if not lines:
        return out
    t0, t_end = lines[0][0], lines[-1][0]
    if starts:
        out["startup"] = starts[0][0] - t0
    for (t, phase), nxt in zip(starts, starts[1:] + [(t_end, None)]):
        out[phase] = nxt[0] - t
    sub = {"* Resetting model": None, "* Abliterating": "trial: abliterate", "* Evaluating": "trial: evaluate"}
    cur, since = None, 0.0
    stop = next((t for t, p in starts if p == "menu and save"), math.inf)  # the chosen trial's restore is not one
    for t, x in lines:
        if t > stop:
            break
        s = x.strip()
        key = next((k for k in sub if s.startswith(k)), None)
        if cur is not None and (key is not None or s.startswith(("Elapsed time", "Running trial"))):
            out[cur] = out.get(cur, 0.0) + t - since
            cur = None
        if key is not None and sub[key] is not None:
            cur, since = sub[key], t
    return out


def kl_first_token(base_logits, edited_logits):
    """Per-prompt KL(base || edited) of the next-token distributions from logits ``[n, vocab]`` (float64)."""
    import torch

    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(edited_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def saved_dtype(folder: str | Path) -> str | None:
    """The dtype a checkpoint folder's ``config.json`` records (``dtype`` or the older ``torch_dtype``)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg.get("dtype") or cfg.get("torch_dtype")


def fmt_seconds(s: float | None) -> str:
    if s is None or (isinstance(s, float) and math.isnan(s)):
        return "-"
    s = float(s)
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


# ---------------------------------------------------------------------------------------------------------------
# Heretic half
# ---------------------------------------------------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    exe = Path(venv) / "bin" / "heretic"
    if exe.exists():
        return exe
    import torch

    version = torch.__version__.split("+")[0]
    print(f"building Heretic's venv at {venv} (torch {version}, heretic-llm {HERETIC_VERSION})", flush=True)
    for cmd in venv_commands(Path(venv), version):
        subprocess.run(cmd, check=True)
    return exe


def drive(cmd: list[str], cwd: Path, env: dict, state: dict, log_path: Path,
          timeout_s: float | None = None) -> tuple[int, list[tuple[float, str]]]:
    """Run Heretic, log its output with timestamps, answer its prompts (:func:`answer`). Returns (exit code,
    timestamped lines)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0)
    fd = proc.stdout.fileno()
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    partial, since_answer = "", ""
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                text = decoder.decode(chunk)
                sys.stdout.write(text)
                sys.stdout.flush()
                now = time.time() - t0
                partial += text
                since_answer += text
                *done, partial = partial.split("\n")
                for x in done:
                    lines.append((now, x))
                    log.write(f"{now:9.2f} {x}\n")
                log.flush()
                if "Model saved to" in since_answer:
                    state["saved"] = True
                if waiting(since_answer):
                    if partial:
                        lines.append((now, partial))
                        log.write(f"{now:9.2f} {partial}\n")
                        partial = ""
                    reply = answer(since_answer, state)
                    log.write(f"{now:9.2f} >>> {reply}\n")
                    sys.stdout.write(reply + "\n")
                    proc.stdin.write((reply + "\n").encode())
                    proc.stdin.flush()
                    since_answer = ""
                if timeout_s is not None and now > timeout_s:
                    raise TimeoutError(f"Heretic ran past {timeout_s} s")
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    rc = proc.wait()
    if partial:
        lines.append((time.time() - t0, partial))
    return rc, lines


def run_heretic(args, splits: dict[str, list[str]], out: Path) -> dict:
    """Run Heretic's whole search in ``<out>/heretic`` and save its chosen trial merged to ``<out>/heretic/model``.
    Without ``--force`` a study already in that folder is continued (or, if finished, only re-shown and saved)."""
    ensure_venv(Path(args.venv))
    work = out / "heretic"
    if work.exists() and args.force:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    datasets = heretic_datasets(splits, work / "prompts")
    save_dir = (work / "model").resolve()
    if save_dir.exists():
        shutil.rmtree(save_dir)
    cfg = heretic_config(str(Path(args.model).resolve()), datasets, trials=args.trials,
                         startup_trials=args.startup_trials, batch_size=args.batch_size, seed=args.seed,
                         system=args.system, checkpoint_dir=str((work / "checkpoints").resolve()),
                         dtype=args.heretic_dtype, max_tokens=args.heretic_max_tokens,
                         prefix_check=not args.no_prefix_check)
    (work / "config.toml").write_text(toml_dumps(cfg), encoding="utf-8")
    state = {"save_dir": save_dir, "kl_max": args.kl_max}
    t = time.time()
    rc, lines = drive(heretic_command(Path(args.venv)), work, heretic_env(), state, work / "heretic.log")
    wall = time.time() - t
    if not state.get("saved") or not (save_dir / "config.json").exists():
        raise RuntimeError(f"Heretic (exit code {rc}) saved no model; see {work / 'heretic.log'}")
    journals = sorted((work / "checkpoints").glob("*.jsonl"))
    study = {"trials": []}
    if journals:
        res = subprocess.run([str(Path(args.venv) / "bin" / "python"), "-c", DUMP_STUDY, str(journals[0])],
                             capture_output=True, text=True, check=True)
        study = json.loads(res.stdout)
        (work / "study.json").write_text(json.dumps(study, indent=1, default=str))
    trials = heretic_trials(study)
    durations = [t["duration_s"] for t in trials if t["duration_s"] is not None]
    chosen = state["chosen"]
    info = next((t for t in trials if t["index"] == chosen["index"]), {})
    return {"tool": "heretic", "checkpoint": str(save_dir), "wall_s": wall, "exit_code": rc,
            "trials": len(trials) or args.trials, "trial_s": wall / (len(trials) or args.trials),
            "trial_only_s": (sum(durations) / len(durations)) if durations else None,
            "phases_s": phase_times(lines), "chosen_trial": chosen["index"],
            "own_refusals": chosen["refusals"], "own_n": chosen["n"], "own_kl": chosen["kl"],
            "own_refusal_rate": chosen["refusals"] / chosen["n"] if chosen["n"] else None,
            "chosen_params": info.get("params"), "pareto": state["front"], "all_trials": trials,
            "config": cfg}


# ---------------------------------------------------------------------------------------------------------------
# Our half
# ---------------------------------------------------------------------------------------------------------------

def refusal_cli() -> list[str]:
    exe = shutil.which("refusal")
    return [exe] if exe else [sys.executable, "-c", "from experiments.entry import main; main()"]


def run_ours(args, out: Path) -> dict:
    from toolkit.runs import runs_root

    name = args.ours_run or f"bench-heretic-{args.name}"
    run_dir = runs_root() / "optimize" / name
    wall = None
    if not args.ours_run:
        dtype = None if args.heretic_dtype == "auto" else args.heretic_dtype
        cmd = ours_optimize_command(refusal_cli(), name, str(Path(args.model).resolve()), args.trials, args.system,
                                    args.ours_arg, startup=args.startup_trials, n_train=args.n_train,
                                    n_val=args.n_eval, kl_max=args.kl_max, dtype=dtype, forms=args.ours_forms or None)
        print("running:", " ".join(cmd), flush=True)
        t = time.time()
        subprocess.run(cmd, check=True)
        wall = time.time() - t
    if not (run_dir / "pareto.csv").exists():
        raise RuntimeError(f"{run_dir}/pareto.csv missing: no `refusal optimize` run named {name!r}")
    front = pareto_front(read_pareto_csv(run_dir / "pareto.csv"), refusals="refusal_rate")
    chosen = choose_trial(front, args.kl_max, refusals="refusal_rate")  # the rule `refusal optimize` applied too
    save = (out / "ours-model").resolve()
    cmd = ours_export_command(refusal_cli(), name, chosen["trial"], save)
    print("running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    n_trials, trial_only = (mean_column(run_dir / "trials.csv", "seconds") if (run_dir / "trials.csv").exists()
                            else (None, None))
    if wall is None:
        wall = (run.get("timings") or {}).get("total")
    return {"tool": "ours", "run": name, "checkpoint": str(save), "wall_s": wall, "trials": n_trials,
            "trial_s": wall / n_trials if wall and n_trials else None, "trial_only_s": trial_only,
            "phases_s": run.get("timings"), "chosen_trial": chosen["trial"],
            "own_refusal_rate": chosen["refusal_rate"], "own_kl": chosen["kl"],
            "pareto": [{k: v for k, v in r.items() if k in ("trial", "refusal_rate", "kl")} for r in front]}


# ---------------------------------------------------------------------------------------------------------------
# One evaluation for both
# ---------------------------------------------------------------------------------------------------------------

def evaluate(checkpoints: dict[str, str | None], base: str, harmful: list[str], harmless: list[str], *,
             gen_tokens: int, judge_name: str, dtype: str, batch_size: int, system: str | None) -> dict[str, dict]:
    """Score each checkpoint (``None``: the unedited base) on the test prompts: judged refusals of greedy
    completions of the harmful prompts, and mean first-token KL(base || edited) on the harmless ones."""
    import gc
    import warnings

    import torch

    from toolkit.judges import make_judge
    from toolkit.models import load_model
    from toolkit.runner import Runner
    from toolkit.stats import rate_ci
    from toolkit.templates import ChatFormat

    warnings.filterwarnings("ignore", category=FutureWarning)
    progress = sys.stderr.isatty()
    base_logits = None
    texts: dict[str, list[str]] = {}
    results: dict[str, dict] = {}
    order = [None] + [k for k, v in checkpoints.items() if v is not None]
    for label in order:
        path = base if label is None else checkpoints[label]
        t = time.time()
        lm = load_model(path, dtype=dtype)
        runner = Runner(lm, ChatFormat(lm.tokenizer, system=system), batch_size=batch_size, progress=progress)
        with torch.inference_mode():
            logits = runner.logits(runner.encode(harmless), desc=f"{label or 'base'} harmless")
            out, _ = runner.generate(runner.encode(harmful), gen_tokens, desc=f"{label or 'base'} harmful")
        if label is None:
            base_logits = logits
        kl = kl_first_token(base_logits, logits)
        texts[label or "unedited"] = out
        results[label or "unedited"] = {"kl_per_prompt": kl.tolist(), "kl": float(kl.mean()),
                                        "eval_s": time.time() - t, "saved_dtype": saved_dtype(path)}
        del lm, runner
        gc.collect()
    judge = make_judge(judge_name, progress=progress)
    for label, out in texts.items():
        v = judge.judge(harmful, out)
        k, n = int(v.refusals.sum()), len(out)
        rate, lo, hi = rate_ci(k, n)
        results[label].update({"refusals": k, "n": n, "refusal_rate": rate, "ci_low": lo, "ci_high": hi,
                               "labels": list(map(str, v.labels)), "completions": out})
    return results


# ---------------------------------------------------------------------------------------------------------------

def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ev = r.get("test", {})
        own = "-"
        if r.get("own_kl") is not None:
            if r.get("own_n"):
                own = f"{r['own_refusals']}/{r['own_n']}, KL {r['own_kl']:.4f}"
            else:
                own = f"{100 * r['own_refusal_rate']:.1f} %, KL {r['own_kl']:.4f}"
        ref = "-"
        if ev.get("n"):
            ref = (f"{ev['refusals']}/{ev['n']}  {100 * ev['refusal_rate']:.1f} % "
                   f"[{100 * ev['ci_low']:.1f}, {100 * ev['ci_high']:.1f}]")
        out.append([r["tool"], str(r.get("trials") or "-"), fmt_seconds(r.get("wall_s")),
                    fmt_seconds(r.get("trial_s")), ref, f"{ev['kl']:.4f}" if "kl" in ev else "-",
                    str(r.get("chosen_trial", "-")), own])
    return out


HEADER = ["tool", "trials", "wall", "per trial", "test harmful refusals (95% CI)", "test harmless KL",
          "chosen trial", "own val refusals, KL"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="default", help="results go to runs/bench-heretic/NAME")
    p.add_argument("--model", default=None, help="model folder [default: the toolkit's default model]")
    p.add_argument("--harmful", default="harmful", help="harmful prompt set (toolkit prompt-set spec)")
    p.add_argument("--harmless", default="harmless", help="harmless prompt set")
    p.add_argument("--trials", type=int, default=50, help="trial budget of each tool")
    p.add_argument("--startup-trials", type=int, default=None, help="Heretic's random start-up trials "
                   "[default: 30 %% of --trials, Heretic's own proportion]")
    p.add_argument("--batch-size", type=int, default=16, help="Heretic's fixed batch size (skips its search)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default="You are a helpful assistant.",
                   help="system prompt for both tools and the evaluation (Heretic always sends one; this is its "
                        "default)")
    p.add_argument("--kl-max", type=float, default=0.1, help="choice rule: fewest refusals with KL <= this")
    p.add_argument("--n-eval", type=int, default=None, help="Heretic's evaluation prompts per class (first N of "
                   "the val split) [default: all]")
    p.add_argument("--n-train", type=int, default=None, help="Heretic's training prompts per class [default: all]")
    p.add_argument("--n-test", type=int, default=None, help="test prompts per class [default: all]")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens of each judged test completion")
    p.add_argument("--judge", default="markers", help="judge of the test completions (markers, llm, ensemble)")
    p.add_argument("--dtype", default="float32", help="dtype of the evaluation")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--heretic-dtype", default="auto", help="Heretic's dtypes = [this]")
    p.add_argument("--heretic-max-tokens", type=int, default=100, help="Heretic's max_response_length")
    p.add_argument("--no-prefix-check", action="store_true", help="Heretic: response_prefix = \"\" (skips its "
                   "search for a common response prefix, 200 completions; none exists for non-thinking models)")
    p.add_argument("--venv", default="runs/heretic-venv", help="Heretic's venv (built when missing)")
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--skip-heretic", action="store_true")
    p.add_argument("--ours-run", default=None, help="reuse this `refusal optimize` run instead of starting one")
    p.add_argument("--ours-forms", default="projection,norm_preserving",
                   help="edit forms our search may use (`refusal optimize --forms`); the default leaves out 'affine', "
                        "which cannot be exported as a merged checkpoint of a model whose o_proj/down_proj have no "
                        "bias (Qwen2, Llama); '' = optimize's own default")
    p.add_argument("--ours-arg", action="append", default=[], help="extra argument for `refusal optimize` "
                   "(repeatable)")
    p.add_argument("--force", action="store_true", help="start Heretic's study afresh")
    args = p.parse_args(argv)
    if args.startup_trials is None:
        args.startup_trials = default_startup_trials(args.trials)
    args.venv = str(Path(args.venv).resolve())

    from rich.console import Console
    from rich.table import Table

    from toolkit.models import load_model
    from toolkit.prompts import load_prompt_set
    from toolkit.runs import runs_root

    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.model is None:
        args.model = str(load_model(None, dtype="float32").source)
    out = runs_root() / "bench-heretic" / args.name
    out.mkdir(parents=True, exist_ok=True)
    harmful, harmless = load_prompt_set(args.harmful), load_prompt_set(args.harmless)

    def split(ps, name, n):
        x = ps.select(name).prompts
        return x[:n] if n else x

    splits = {"harmful_train": split(harmful, "train", args.n_train),
              "harmless_train": split(harmless, "train", args.n_train),
              "harmful_eval": split(harmful, "val", args.n_eval), "harmless_eval": split(harmless, "val", args.n_eval)}
    test_harmful, test_harmless = split(harmful, "test", args.n_test), split(harmless, "test", args.n_test)

    rows = []
    if not args.skip_heretic:
        rows.append(run_heretic(args, splits, out))
    if not args.skip_ours:
        rows.append(run_ours(args, out))
    t = time.time()
    ev = evaluate({r["tool"]: r["checkpoint"] for r in rows}, args.model, test_harmful, test_harmless,
                  gen_tokens=args.gen_tokens, judge_name=args.judge, dtype=args.dtype,
                  batch_size=args.eval_batch_size, system=args.system)
    eval_s = time.time() - t
    rows = [{"tool": "unedited", "test": ev["unedited"]}] + [dict(r, test=ev[r["tool"]]) for r in rows]

    result = {"args": vars(args), "eval_s": eval_s, "n_test": [len(test_harmful), len(test_harmless)],
              "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["tool", "trials", "wall_s", "trial_s", "test_refusals", "test_n", "test_refusal_rate",
                    "ci_low", "ci_high", "test_kl", "chosen_trial", "own_refusals", "own_n", "own_refusal_rate",
                    "own_kl"])
        for r in rows:
            e = r["test"]
            w.writerow([r["tool"], r.get("trials"), r.get("wall_s"), r.get("trial_s"), e["refusals"], e["n"],
                        e["refusal_rate"], e["ci_low"], e["ci_high"], e["kl"], r.get("chosen_trial"),
                        r.get("own_refusals"), r.get("own_n"), r.get("own_refusal_rate"), r.get("own_kl")])

    table = Table(title=f"Heretic {HERETIC_VERSION} vs refusal optimize: {Path(args.model).name}, "
                        f"test {len(test_harmful)}+{len(test_harmless)} prompts, {args.gen_tokens} tokens, "
                        f"judge {args.judge}")
    for h in HEADER:
        table.add_column(h, justify="left" if h == "tool" else "right")
    for r in table_rows(rows):
        table.add_row(*r)
    console.print(table)
    for r in rows:
        if r.get("trial_only_s"):
            console.print(f"{r['tool']}: one trial alone (Optuna's duration) {fmt_seconds(r['trial_only_s'])}")
        if r.get("phases_s"):
            console.print(f"{r['tool']} time by phase: " + ", ".join(f"{k} {fmt_seconds(v)}"
                                                                  for k, v in r["phases_s"].items()))
    dtypes = {r["tool"]: r["test"].get("saved_dtype") for r in rows}
    if len(set(dtypes.values())) > 1 and args.dtype != "bfloat16":
        console.print(f"note: checkpoints saved in different dtypes {dtypes}; the KL of a bfloat16 export against "
                      f"a float32 base includes bfloat16 rounding (score with --dtype bfloat16 to cancel it)")
    console.print(f"evaluation {fmt_seconds(eval_s)}; results in {out}")
    return 0


def _no_gpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except ImportError:
        return True


if __name__ == "__main__":
    sys.exit(main())
