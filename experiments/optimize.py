"""``refusal optimize``: a multi-objective search of abliteration edits (refusal vs damage), its Pareto front, the
chosen trial on the test split beside random-direction controls, warm-start profiles, distributed workers, and the
export of a trial as a merged checkpoint or a PEFT adapter."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import pandas as pd
from pydantic import Field, FiniteFloat

from toolkit.errors import ToolkitError
from toolkit.optimize import (OBJECTIVES, SearchSpace, SearchState, TrialEvaluator, choose_trial, compute_search_state,
                              depth_profile, pareto_mask, parse_objectives, read_profile)
from toolkit.prompts import distinct_names, load_prompt_set
from toolkit.runs import Run, check_name, default_name, load_run, runs_root

from .shared import JudgeOptions, ModelOptions, RunOptions, command, console, evaluation_row, out, print_summary

# options that define a study: fixed when it is created; --resume and --worker take them from the study
STUDY_FIELDS = ("objectives", "forms", "scopes", "orthogonalize", "activation_scaled", "position", "harmful",
                "harmless", "borderline", "n_train", "n_val", "gen_tokens", "kl_tokens", "judge", "judge_model",
                "startup", "seed", "system")


class OptimizeConfig(ModelOptions, JudgeOptions, RunOptions):
    """The options of ``refusal optimize``."""

    trials: int = Field(40, ge=1, description="trial budget of the study, all workers together (with --resume: the "
                        "new total)")
    timeout: Optional[FiniteFloat] = Field(None, gt=0, description="start no trial after this many seconds")
    startup: int = Field(10, ge=0, description="random start-up trials before TPE models the front (Heretic: 60 of "
                         "200)")
    objectives: str = Field("refusal,kl", description="comma-separated objectives: refusal (harmful val refusal "
                            "rate), kl (first-token KL on harmless val), kl_multi (multi-token KL), capability "
                            "(multiple-choice accuracy, maximised), over_refusal (borderline val refusal rate)")
    forms: str = Field("projection,norm_preserving,affine", description="edit forms the search may take: projection, "
                       "norm_preserving (Heretic's row-norm-preserving edit), affine (Marshall et al. 2024)")
    scopes: str = Field("global,per_layer", description="direction scopes: global (one direction at a fractional "
                        "layer index) and/or per_layer")
    orthogonalize: Literal["search", "on", "off"] = Field(
        "search", description="make directions orthogonal to the harmless mean (projected abliteration): searched, "
        "always or never")
    activation_scaled: Literal["search", "on", "off"] = Field(
        "search", description="scale per-layer strengths by the layer's harmful/harmless separation: searched, always "
        "or never")
    position: int = Field(-1, le=-1, description="prompt position the directions are read at (Heretic: -1)")
    harmful: str = Field("harmful", description="harmful prompt set (train: directions; val: the refusal objective; "
                         "test: the final evaluation)")
    harmless: str = Field("harmless", description="harmless prompt set (train, val: KL, test)")
    borderline: str = Field("borderline", description="borderline-but-benign set for over_refusal and the test "
                            "evaluation, or none")
    n_train: Optional[int] = Field(None, ge=1, description="at most N training prompts per set")
    n_val: Optional[int] = Field(None, ge=1, description="at most N validation prompts per set (each trial runs them)")
    gen_tokens: int = Field(12, ge=1, description="greedy completion length judged per prompt")
    kl_tokens: int = Field(16, ge=1, description="reference completion length of kl_multi and of the test KL")
    kl_max: FiniteFloat = Field(0.1, gt=0, description="the chosen trial: fewest validation refusals among front "
                                "trials with KL at most this (nats), else the lowest-KL front trial")
    storage: Optional[str] = Field(None, description="Optuna storage: sqlite:///FILE, postgresql://..., mysql://..., "
                                   "or journal:FILE [default: a SQLite file in the run]")
    resume: bool = Field(False, description="continue the study of --name (a killed one, or a finished run whose "
                         "budget --trials raises)")
    worker: bool = Field(False, description="join the running study of --name (same --storage) and run trials until "
                         "its budget is spent; writes no run")
    warm_start: Optional[Path] = Field(None, description="a profile.json (or an optimize run) whose trials are tried "
                                       "first")
    test: bool = Field(True, description="evaluate the chosen trial on the test split beside random-direction controls")
    controls: int = Field(2, ge=0, description="random-direction controls with the chosen trial's kernel and form")
    test_limit: Optional[int] = Field(None, ge=1, description="at most N test prompts per set")
    heretic: Optional[Path] = Field(None, description="CSV of Heretic's trials (columns refusal, kl) drawn on the plot")
    export: Optional[str] = Field(None, description="export this trial (a number, or 'chosen': the run's chosen trial) "
                                  "of the finished run --name, with --save")
    save: Optional[Path] = Field(None, description="folder of the exported checkpoint or adapter")
    adapter: bool = Field(False, description="export a PEFT LoRA adapter instead of a merged checkpoint")
    adapter_rank: int = Field(8, ge=1, description="LoRA rank of a norm-preserving edit's adapter (other forms are "
                              "exact at rank 1)")
    save_dtype: str = Field("auto", description="dtype of a merged export: auto (the source's stored dtype), float32, "
                            "bfloat16, float16")
    replace_save: bool = Field(False, description="let --save replace an existing checkpoint folder")


def _space(cfg) -> SearchSpace:
    both = {"search": (True, False), "on": (True,), "off": (False,)}
    return SearchSpace(scopes=tuple(s.strip() for s in cfg.scopes.split(",") if s.strip()),
                       forms=tuple(s.strip() for s in cfg.forms.split(",") if s.strip()),
                       orthogonalize=both[cfg.orthogonalize],
                       activation_scaled=(False, True) if cfg.activation_scaled == "search" else
                       both[cfg.activation_scaled])


def open_storage(url: str):
    """An Optuna storage from a URL: ``journal:FILE`` (a journal file, safe for several processes on one machine),
    or an RDB URL (``sqlite:///FILE`` with a 60 s lock timeout, ``postgresql://``, ``mysql://``).

    Raises:
        ToolkitError: an unusable URL.
    """
    import optuna

    try:
        if url.startswith("journal:"):
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:"):]))
        kw = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kw)
    except Exception as e:  # SQLAlchemy's and Optuna's errors
        raise ToolkitError(f"cannot open the study storage {url}: {type(e).__name__}: {str(e).splitlines()[0]}",
                           param="storage") from None


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_dead_trials(study, requeue: bool = True) -> int:
    """Mark RUNNING trials of dead processes on this machine as failed and (``requeue``) queue their parameters
    again. Returns how many were failed."""
    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if requeue and t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)
        n += 1
    return n


def _sampler(cfg, startup: int, seed: int):
    import optuna

    return optuna.samplers.TPESampler(n_startup_trials=startup, multivariate=True, n_ei_candidates=128, seed=seed,
                                      constant_liar=True)


def _counted(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))


def run_trials(study, space: SearchSpace, state: SearchState, evaluator: TrialEvaluator, objectives, budget: int,
               timeout: float | None, kl_max: float, progress: bool) -> int:
    """Ask, evaluate and tell trials until the study holds ``budget`` finished or running trials (every worker's
    together) or ``timeout`` seconds pass. A trial asked beyond the budget (another worker took the last one
    meanwhile) is told failed and marked ``over_budget``, so the budget is never exceeded. A trial whose edit or
    evaluation raises :class:`ToolkitError` is told failed (its message kept as ``error``) and the search goes on;
    Ctrl-C fails the running trial and queues its parameters again. Returns the number of trials this process
    finished.

    Raises:
        ToolkitError: 20 trials in a row failed.
    """
    from optuna.trial import TrialState
    from tqdm import tqdm

    t_start, done, failures = time.time(), 0, 0
    bar = tqdm(total=budget, initial=min(len(_counted(study)), budget), desc="trials", unit="trial",
               disable=not progress, dynamic_ncols=True)
    try:
        while True:
            if timeout is not None and time.time() - t_start > timeout:
                break
            if len(_counted(study)) >= budget:
                break
            trial = study.ask()
            trial.set_user_attr("worker", _worker_id())
            ahead = [t for t in _counted(study) if t.number < trial.number]
            if len(ahead) >= budget:
                trial.set_user_attr("over_budget", True)
                study.tell(trial, state=TrialState.FAIL)
                break
            params = space.suggest(trial)
            trial.set_user_attr("params", params)
            t0 = time.time()
            try:
                values = evaluator(state.edit(params))
            except ToolkitError as e:
                trial.set_user_attr("error", str(e))
                study.tell(trial, state=TrialState.FAIL)
                failures += 1
                if failures >= 20:
                    raise ToolkitError(f"20 trials in a row failed; the last: {e}") from None
                continue
            except KeyboardInterrupt:  # Ctrl-C: the trial is failed and queued again for --resume
                trial.set_user_attr("interrupted", True)
                study.tell(trial, state=TrialState.FAIL)
                study.enqueue_trial(trial.params, skip_if_exists=False)
                raise
            trial.set_user_attr("seconds", round(time.time() - t0, 3))
            trial.set_user_attr("measures", values)
            study.tell(trial, [values[o] for o in objectives])
            done, failures = done + 1, 0
            bar.update(1)
            if progress:
                bar.set_postfix_str(_front_text(study, objectives, kl_max))
    finally:
        bar.close()
    return done


def _front_text(study, objectives, kl_max) -> str:
    df = trials_table(study, objectives)
    if not len(df):
        return ""
    front = df[df["pareto"]]
    ok = df[df["kl"] <= kl_max] if "refusal" in df.columns else df.iloc[0:0]
    best = f"; best refusal at KL<={kl_max:g}: {ok['refusal'].min():.2f}" if len(ok) else ""
    return f"front {len(front)}{best}"


def trials_table(study, objectives) -> pd.DataFrame:
    """One row per finished trial: number, worker, seconds, every measure, the parameters (``p.`` prefix) and whether it
    is on the Pareto front of ``objectives``."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        row = {"trial": t.number, "worker": t.user_attrs.get("worker"), "seconds": t.user_attrs.get("seconds")}
        row.update(t.user_attrs.get("measures", {}))
        row.update({f"p.{k}": v for k, v in (t.user_attrs.get("params") or t.params).items()})
        rows.append(row)
    df = pd.DataFrame(rows)
    if len(df):
        df = df.sort_values("trial").reset_index(drop=True)
        df["pareto"] = pareto_mask(df[list(objectives)].to_numpy(float), [OBJECTIVES[o][0] for o in objectives])
    return df


def _params_of(study, number: int) -> dict:
    for t in study.get_trials(deepcopy=False):
        if t.number == number:
            from optuna.trial import TrialState

            if t.state != TrialState.COMPLETE:
                raise ToolkitError(f"trial {number} did not finish ({t.state.name.lower()})", param="export")
            return dict(t.user_attrs.get("params") or t.params)
    raise ToolkitError(f"the study has no trial {number}", param="export")


def _prompt_sets(cfg):
    H, B = load_prompt_set(cfg.harmful), load_prompt_set(cfg.harmless)
    sets = [H, B]
    if cfg.borderline.lower() != "none":
        sets.append(load_prompt_set(cfg.borderline))
    sets = distinct_names(sets)
    return sets[0], sets[1], (sets[2] if len(sets) > 2 else None)


def _evaluator(cfg, ses, judge, objectives, H, B, O) -> TrialEvaluator:
    r = ses.runner
    cset = None
    if "capability" in objectives:
        from toolkit.capability import load_capability_set

        cset = load_capability_set(None)
    hv, bv = H.select("val").head(cfg.n_val), B.select("val").head(cfg.n_val)
    ov = O.select("val").head(cfg.n_val) if O is not None else None
    return TrialEvaluator(r, objectives, harmful=(r.encode(hv.prompts), hv.prompts), harmless=r.encode(bv.prompts),
                          judge=judge, refusal_ids=ses.refusal_ids, gen_tokens=cfg.gen_tokens,
                          kl_tokens=cfg.kl_tokens,
                          borderline=(r.encode(ov.prompts), ov.prompts) if ov is not None else None,
                          capability=cset)


def _study_config(cfg) -> dict:
    return {k: getattr(cfg, k) for k in STUDY_FIELDS}


def _with_study_config(cfg, recorded: dict):
    changed = [k for k in STUDY_FIELDS if k in recorded and recorded[k] != getattr(cfg, k)]
    if changed:
        console.print(f"note: the study was created with other {', '.join(changed)}; its own values are used")
    return cfg.model_copy(update={k: v for k, v in recorded.items() if k in STUDY_FIELDS})


@command(OptimizeConfig)
def optimize(cfg: OptimizeConfig):
    """Search abliteration edits with Optuna's multi-objective TPE (as Heretic), minimising refusals on harmful
    validation prompts and damage on harmless ones (first-token KL by default), over Heretic's search space and more:
    a global direction at a fractional layer index or per-layer directions, optionally orthogonal to the harmless
    mean; a weight kernel per component (o_proj, down_proj); plain, norm-preserving or affine edits; activation-scaled
    strengths. Each trial's weight edit is applied as exact hooks on the edited modules' outputs (no weight copies).

    Writes runs/optimize/NAME/ with trials.csv, pareto.csv, pareto.png, test.csv (the chosen trial on the test split
    beside random-direction controls with the same kernel, and the unedited model), profile.json (the front's
    parameters as fractions of depth, for --warm-start on another model), study.db (the Optuna study, so
    --resume can extend it), search.safetensors and run.json. A killed study resumes with --resume; more processes or
    machines join with --worker (same --name and --storage). --export TRIAL --save DIR writes a trial as a merged
    Hugging Face checkpoint (or --adapter: a PEFT LoRA adapter).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg.export is not None:
        return _export(cfg)
    if cfg.save is not None:
        raise ToolkitError("--save goes with --export TRIAL", param="save")
    if (cfg.resume or cfg.worker) and cfg.name is None:
        raise ToolkitError("name the study to continue or join", param="name")
    if cfg.resume and cfg.worker:
        raise ToolkitError("a worker joins a study; --resume continues one: choose one", param="worker")
    name = check_name(cfg.name) if cfg.name else default_name()
    work = runs_root() / "optimize" / f".{name}.study"
    final = runs_root() / "optimize" / name
    objectives = parse_objectives(cfg.objectives)
    _space(cfg)  # bad forms or scopes fail here, before the model loads
    if cfg.warm_start is not None:
        read_profile(cfg.warm_start, _space(cfg))
    if cfg.heretic is not None:
        _read_heretic(cfg.heretic)
    if cfg.storage is not None:
        open_storage(cfg.storage)
    if cfg.worker:
        return _work(cfg, name, work)
    if cfg.resume:
        if not work.exists() and cfg.storage is None:
            if not (final / "study.db").is_file():
                raise ToolkitError(f"no study named {name} to resume (neither {work} nor {final}/study.db)",
                                   param="resume")
            work.mkdir(parents=True)
            for f in ("study.db", "search.safetensors"):
                shutil.copy2(final / f, work / f)
    elif work.exists():
        if not cfg.force:
            raise ToolkitError(f"a study named {name} was started and not finished ({work}); --resume continues it, "
                               "--force starts over", param="name")
        shutil.rmtree(work)
    with Run("optimize", name, force=cfg.force or cfg.resume) as run:
        created = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
        started: list = []  # _search appends once a trial has started: from then on the study is worth resuming
        try:
            final_path = _search(cfg, run, name, work, objectives, started)
        except BaseException:
            if created and not started:
                shutil.rmtree(work, ignore_errors=True)
            raise
    shutil.rmtree(work, ignore_errors=True)
    console.print(f"wrote {final_path}")


def _search(cfg, run, name, work, objectives, started: list) -> Path:
    import optuna

    url = cfg.storage or f"sqlite:///{work / 'study.db'}"
    storage = open_storage(url)
    existing = None
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        pass
    if cfg.resume and existing is None:
        raise ToolkitError(f"the storage holds no study named {name}", param="resume")
    if not cfg.resume and existing is not None:
        raise ToolkitError(f"the storage already holds a study named {name}; --resume continues it", param="name")
    if existing is not None:
        cfg = _with_study_config(cfg, existing.user_attrs.get("config", {}))
    objectives = parse_objectives(cfg.objectives)
    space = _space(cfg)
    H, B, O = _prompt_sets(cfg)
    ses = cfg.open_session()
    judge = cfg.open_judge(quiet=cfg.quiet)
    t0 = time.time()
    if existing is None:
        ht, bt = H.select("train").head(cfg.n_train), B.select("train").head(cfg.n_train)
        state = compute_search_state(ses.runner, ses.runner.encode(ht.prompts), ses.runner.encode(bt.prompts),
                                     cfg.position, meta={"harmful": ht.describe(), "harmless": bt.describe()})
        study = optuna.create_study(study_name=name, storage=storage,
                                    directions=[OBJECTIVES[o][0] for o in objectives],
                                    sampler=_sampler(cfg, cfg.startup, cfg.seed))
        study.set_user_attr("config", _study_config(cfg))
        study.set_user_attr("search_state", base64.b64encode(state.to_bytes()).decode())
        study.set_user_attr("model", ses.lm.describe())
    else:
        study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(cfg, cfg.startup, cfg.seed + 7919))
        state = SearchState.from_bytes(base64.b64decode(study.user_attrs["search_state"]), f"study {name}")
        _check_model(study, ses.lm)
        n = _fail_dead_trials(study)
        if n:
            console.print(f"{n} trial(s) of killed processes marked failed; their parameters are tried again")
    state.save(run.path("search.safetensors"))
    run.time("search_state", time.time() - t0)
    t0 = time.time()
    evaluator = _evaluator(cfg, ses, judge, objectives, H, B, O)
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", evaluator(None))
    baseline = study.user_attrs["baseline"]
    run.time("baseline", time.time() - t0)
    if cfg.warm_start is not None and existing is None:
        for p in read_profile(cfg.warm_start, space):
            study.enqueue_trial(p, skip_if_exists=True)
    t0 = time.time()
    started.append(True)
    done = run_trials(study, space, state, evaluator, objectives, cfg.trials, cfg.timeout, cfg.kl_max,
                      progress=not cfg.quiet)
    _wait_for_workers(study)
    run.time("trials", time.time() - t0)
    df = trials_table(study, objectives)
    if not len(df):
        raise ToolkitError("no trial finished")
    front = df[df["pareto"]].sort_values(list(objectives)).reset_index(drop=True)
    run.write_csv("trials.csv", df)
    run.write_csv("pareto.csv", front)
    chosen, rule, test_rows = None, None, None
    if "refusal" in df.columns:
        chosen, rule = choose_trial(front, cfg.kl_max)
    others = {}
    if cfg.heretic is not None:
        others["Heretic trials"] = _read_heretic(cfg.heretic)
    from toolkit.plots import pareto_plot

    pareto_plot(df, front, run.path("pareto.png"), x="kl", y=objectives[0] if objectives[0] != "kl" else "refusal",
                baseline={"kl": 0.0, **baseline}, others=others,
                chosen=None if chosen is None else {"kl": chosen["kl"], "refusal": chosen["refusal"]},
                title=f"{ses.lm.model_id}: {len(df)} trials")
    profile = depth_profile([_params_of(study, int(t)) for t in front["trial"]], ses.lm.describe(), objectives)
    run.write_json("profile.json", profile)
    if cfg.test and chosen is not None:
        t0 = time.time()
        test_rows = _test(cfg, ses, judge, state, _params_of(study, int(chosen["trial"])), int(chosen["trial"]), H, B, O)
        run.write_csv("test.csv", test_rows)
        run.time("test", time.time() - t0)
    shutil.copy2(work / "study.db", run.path("study.db")) if (work / "study.db").is_file() else None
    results = {"n_trials": len(df), "finished_here": done, "front": front.to_dict(orient="records"),
               "baseline": baseline, "objectives": list(objectives),
               "chosen": None if chosen is None else {"trial": int(chosen["trial"]), "rule": rule,
                                                      **{o: float(chosen[o]) for o in objectives},
                                                      "kl": float(chosen["kl"])},
               "space": space.describe(), "storage": cfg.storage or "sqlite (study.db in the run)",
               "workers": sorted(set(df["worker"].dropna())),
               "seconds_per_trial": float(df["seconds"].mean())}
    if test_rows is not None:
        results["test"] = test_rows.to_dict(orient="records")
    sets = [p.describe() for p in (H, B, O) if p is not None]
    final = run.finish(model=ses.lm.describe(), prompt_sets=sets, seed=cfg.seed,
                       params=cfg.params(refusal_token_ids=ses.refusal_ids, objectives=list(objectives)),
                       results=results, judge=judge.describe(),
                       damage={"kl": {"set": B.name, "split": "val", "position": "last prompt token"},
                               "kl_multi": {"tokens": cfg.kl_tokens} if "kl_multi" in objectives else None})
    _print_front(front, objectives, baseline, chosen, rule)
    if test_rows is not None:
        print_summary(test_rows, f"chosen trial {int(chosen['trial'])} on the test split ({rule})",
                      extra_cols=())
    return final


def _check_model(study, lm) -> None:
    rec = study.user_attrs.get("model") or {}
    if rec.get("hash") and rec["hash"] != lm.model_hash:
        raise ToolkitError(f"the study was made on model {rec.get('id')} (hash {str(rec['hash'])[:12]}), not "
                           f"{lm.model_id} (hash {lm.model_hash[:12]})", param="model")


def _wait_for_workers(study, limit_s: float = 3600) -> None:
    from optuna.trial import TrialState

    t0 = time.time()
    while time.time() - t0 < limit_s:
        _fail_dead_trials(study, requeue=False)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        console.print(f"waiting for {len(running)} trial(s) of other workers", end="\r")
        time.sleep(2)


def _work(cfg, name, work) -> None:
    """A worker: joins the study, runs trials until the budget is spent, writes no run."""
    import optuna

    url = cfg.storage or (f"sqlite:///{work / 'study.db'}" if (work / "study.db").is_file() else None)
    if url is None:
        raise ToolkitError(f"no running study named {name} here ({work}); give its --storage", param="worker")
    storage = open_storage(url)
    try:
        probe = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ToolkitError(f"the storage holds no study named {name}", param="worker") from None
    cfg = _with_study_config(cfg, probe.user_attrs.get("config", {}))
    objectives = parse_objectives(cfg.objectives)
    seed = cfg.seed + 1 + os.getpid() % 100003
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(cfg, cfg.startup, seed))
    state = SearchState.from_bytes(base64.b64decode(study.user_attrs["search_state"]), f"study {name}")
    H, B, O = _prompt_sets(cfg)
    ses = cfg.open_session()
    _check_model(study, ses.lm)
    judge = cfg.open_judge(quiet=cfg.quiet)
    evaluator = _evaluator(cfg, ses, judge, objectives, H, B, O)
    done = run_trials(study, _space(cfg), state, evaluator, objectives, cfg.trials, cfg.timeout, cfg.kl_max,
                      progress=not cfg.quiet)
    console.print(f"worker {_worker_id()} finished {done} trial(s) of study {name}")


def _read_heretic(path: Path) -> pd.DataFrame:
    from toolkit.runs import read_run_table

    df = read_run_table(path, "Heretic trials CSV")
    if not {"refusal", "kl"} <= set(df.columns):
        raise ToolkitError(f"{path} needs columns refusal (rate) and kl", param="heretic")
    return df


def _print_front(front, objectives, baseline, chosen, rule) -> None:
    from rich.table import Table

    t = Table(title=f"Pareto front ({len(front)} trials; unedited: " +
              ", ".join(f"{k} {v:.3f}" for k, v in baseline.items()) + ")", title_justify="left")
    cols = ["trial"] + list(dict.fromkeys(list(objectives) + ["kl"])) + ["p.form", "p.scope", "p.orthogonalize",
                                                                          "p.activation_scaled", "seconds"]
    cols = [c for c in cols if c in front.columns]
    for c in cols:
        t.add_column(c.removeprefix("p."), justify="right" if c not in ("p.form", "p.scope") else "left")
    for _, r in front.iterrows():
        mark = " *" if chosen is not None and int(r["trial"]) == int(chosen["trial"]) else ""
        t.add_row(*[(f"{r[c]}{mark}" if c == "trial" else f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]))
                    for c in cols])
    out.print(t)
    if chosen is not None:
        out.print(f"chosen (*): trial {int(chosen['trial'])} — {rule}")


def _control_state(state: SearchState, seed: int) -> SearchState:
    """The search state with every layer's direction replaced by a random Gaussian direction of the same norm (the
    separation used for activation scaling is kept, so strengths stay the chosen trial's)."""
    import torch
    from dataclasses import replace

    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(state.directions.shape, generator=g, dtype=torch.float64)
    rnd = rnd / rnd.norm(dim=1, keepdim=True) * state.directions.double().norm(dim=1, keepdim=True)
    return replace(state, directions=rnd.float())


def _test(cfg, ses, judge, state, params, trial, H, B, O) -> pd.DataFrame:
    """The chosen trial, random-direction controls with its kernel and form, and the unedited model on the test split:
    judged refusal (with windows) on every set, first-token KL and multi-token KL on the harmless set."""
    from toolkit.abliteration import edit_hooks
    from toolkit.damage import forced_damage, reference_completions
    from toolkit.evaluation import evaluate, judged
    from toolkit.judges import parse_windows

    r, model = ses.runner, ses.lm.model
    windows = parse_windows(cfg.windows, cfg.gen_tokens)
    sets = [ps.select("test").head(cfg.test_limit) for ps in (H, B, O) if ps is not None]
    enc = {ps.name: r.encode(ps.prompts) for ps in sets}
    conds = [("unedited", None), (f"trial {trial}", state.edit(params))]
    conds += [(f"random control {i + 1}", _control_state(state, cfg.seed + 1000 + i).edit(params))
              for i in range(cfg.controls)]
    rows, base = [], {}
    b_name = sets[1].name
    refs = None
    for cond, edit in conds:
        for ps in sets:
            iv = edit_hooks(model, edit) if edit is not None else None
            ev = evaluate(r, enc[ps.name], judged(ses.refusal_ids, judge, ps.prompts, windows),
                          gen_tokens=cfg.gen_tokens, intervention=iv, desc=f"{cond} {ps.name}")
            if edit is None:
                base[ps.name] = ev
            kl = None if edit is None else ev.kl_from(base[ps.name])
            row = evaluation_row(ps.name, "test", cond, ev, kl)
            if ps.name == b_name:
                if edit is None:
                    toks = ev.tokens if cfg.kl_tokens <= cfg.gen_tokens else evaluate(
                        r, enc[ps.name], [], gen_tokens=cfg.kl_tokens, desc="reference completions").tokens
                    refs = reference_completions(toks, cfg.kl_tokens)
                    row["kl_multi"] = 0.0
                else:
                    row["kl_multi"] = forced_damage(r, enc[ps.name], refs, lambda e=edit: edit_hooks(model, e),
                                                    desc=f"{cond} multi-token KL").summary()["kl_multi"]
            rows.append(row)
    return pd.DataFrame(rows)


def _export(cfg) -> None:
    """``--export TRIAL --save DIR``: a trial of a finished run as a merged checkpoint or a PEFT adapter."""
    import optuna

    from toolkit.checkpoints import check_save_path, export_adapter, export_weight_edit
    from toolkit.models import dtype_from_name, load_model

    if cfg.name is None:
        raise ToolkitError("name the optimize run whose trial is exported", param="name")
    if cfg.save is None:
        raise ToolkitError("give the folder to write with --save", param="save")
    saved_as = None if cfg.save_dtype == "auto" else dtype_from_name(cfg.save_dtype, "--save-dtype")
    folder, meta = load_run(cfg.name, "optimize")
    check_save_path(cfg.save, overwrite=cfg.replace_save, what="the exported model")
    state = SearchState.load(folder / "search.safetensors")
    if not (folder / "study.db").is_file():
        raise ToolkitError(f"{folder} has no study.db (its study lives in {meta['params'].get('storage')})",
                           param="name")
    study = optuna.load_study(study_name=folder.name if meta.get("name") is None else meta["name"],
                              storage=open_storage(f"sqlite:///{folder / 'study.db'}"))
    if cfg.export.strip().lower() == "chosen":
        chosen = (meta.get("results") or {}).get("chosen")
        if not chosen:
            raise ToolkitError(f"{folder} has no chosen trial (its objectives lack refusal)", param="export")
        number = int(chosen["trial"])
    else:
        try:
            number = int(cfg.export)
        except ValueError:
            raise ToolkitError(f"must be a trial number or 'chosen', got {cfg.export!r}", param="export") from None
    params = _params_of(study, number)
    edit = state.edit(params)
    rec = meta.get("model") or {}
    with console.status("loading the source model"):
        spec = cfg.model or rec.get("id") or None  # the spec the search loaded (an alias, folder, .gguf or hub id)
        try:
            lm = load_model(spec, dtype="float32", device="cpu")
        except ToolkitError:
            if cfg.model or not rec.get("source"):
                raise
            lm = load_model(rec["source"], dtype="float32", device="cpu")  # e.g. a relative path from elsewhere
    if rec.get("hash") and lm.model_hash != rec["hash"]:
        raise ToolkitError(f"--model is not the run's model {rec.get('id')} (hash {rec['hash'][:12]})", param="model")
    source = Path(lm.source)
    provenance = json.dumps({"tool": "refusal-toolkit", "run": str(folder), "trial": number, "params": params,
                             "model": {k: rec.get(k) for k in ("id", "hash")}, "edit": edit.describe()},
                            indent=2, default=str)
    extra = {"refusal-toolkit-edit.json": provenance}
    if cfg.adapter:
        info = export_adapter(source, edit, cfg.save, rank=cfg.adapter_rank, overwrite=cfg.replace_save, extra=extra)
        what = "PEFT LoRA adapter"
    else:
        try:
            info = export_weight_edit(source, edit, cfg.save, dtype=saved_as, overwrite=cfg.replace_save, extra=extra)
        except ToolkitError as e:
            if "bias" in str(e):
                raise ToolkitError(f"{e}; pass --adapter") from None
            raise
        what = f"merged checkpoint ({info.get('saved_dtype')})"
    err = info.get("approx_rel_error")
    note = f"; low-rank approximation error {err:.2e}" if err else ""
    console.print(f"exported trial {number} ({params['form']}) of {folder} as a {what} to {cfg.save}{note}")
