"""``refusal judge``: re-judge an existing run's completions with another refusal judge, without regenerating."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import Field
from sklearn.metrics import cohen_kappa_score

from toolkit.errors import ToolkitError
from toolkit.prompts import load_prompt_set
from toolkit.runs import Run, judge_key, judge_of, load_run, read_run_table
from toolkit.stats import rate_summary

from .shared import Cli, JudgeOptions, RunOptions, command, console, out

#: the per-prompt table of each command whose runs hold completions
TABLES = {"score": "scores.csv", "ablate": "results.csv", "steer": "results.csv", "dose-response": "results.csv"}
#: columns that name a condition (group keys of the summary), when a table has them
GROUP_KEYS = ("set", "condition", "kind", "index", "direction", "layer", "alpha", "role", "positions", "site")


class JudgeConfig(JudgeOptions, RunOptions):
    """The options of ``refusal judge``."""

    run: Annotated[str, Cli(argument=True, env=False)] = Field(
        ..., description="a score, ablate, steer or dose-response run folder (runs/<command>/<name>)")
    dtype: str = Field("auto", description="compute dtype of the judge model: auto, float32, bfloat16, float16")
    device: str = Field("auto", description="device of the judge model: auto, cpu, cuda, cuda:N, mps")
    quiet: Annotated[bool, Cli("--quiet", "-q")] = Field(False, description="no progress bars")


def requests_of(meta: dict, table: pd.DataFrame, where) -> list[str]:
    """The request text of every row of a run's table, from the prompt files the run recorded (by name and
    SHA-256).

    Raises:
        ToolkitError: a prompt set of the table is not recorded, its file is gone or changed (hash), or an id is
            missing from it.
    """
    recorded = {p.get("name"): p for p in meta.get("prompt_sets", [])}
    column = (meta.get("params") or {}).get("column")
    texts: dict[str, dict[str, str]] = {}
    for name in table["set"].dropna().unique():
        rec = recorded.get(name)
        if rec is None:
            raise ToolkitError(f"{where}: prompt set {name!r} is not recorded in run.json")
        ps = load_prompt_set(str(rec.get("source")), column)
        if ps.sha256 != rec.get("sha256"):
            raise ToolkitError(f"{where}: prompt set {name!r} ({rec.get('source')}) changed since the run "
                               "(SHA-256 differs); its requests cannot be matched to the completions")
        texts[name] = dict(zip(ps.ids, ps.prompts))
    out_ = []
    for s, i in zip(table["set"], table["id"]):
        if i not in texts.get(s, {}):
            raise ToolkitError(f"{where}: prompt {i} of set {s!r} is not in its prompt file")
        out_.append(texts[s][i])
    return out_


@command(JudgeConfig)
def judge(cfg: JudgeConfig):
    """Re-judge the completions of a score, ablate, steer or dose-response run with another judge (markers, llm,
    nli, ensemble): the completions are read from the run, not generated again, and the requests from the prompt
    files the run recorded (checked by SHA-256).

    Writes runs/judge/NAME/ with verdicts.csv (the run's rows with the new judge's refusal, verdict and confidence
    beside the run's own refusal column), summary.csv (refusal and other rates by the new judge and the run's
    judge per group, with agreement as Cohen's kappa) and run.json (the new judge, the source run and its judge).
    Windows are not re-judged: the run stores text, not tokens.
    """
    folder, meta = load_run(cfg.run)
    command_ = meta.get("command")
    if command_ not in TABLES:
        raise ToolkitError(f"{folder} is a '{command_}' run; judge reads {', '.join(TABLES)} runs")
    path = folder / TABLES[command_]
    table = read_run_table(path, "results table")
    for c in ("set", "id", "completion"):
        if c not in table.columns:
            raise ToolkitError(f"{path}: no column {c!r}")
    table = table[table["completion"].notna() | table.get("refusal", pd.Series(dtype=object)).notna()]
    table = table.reset_index(drop=True)
    if table.empty:
        raise ToolkitError(f"{path}: no completions to judge (the run generated none)")
    requests = requests_of(meta, table, folder)
    responses = table["completion"].fillna("").astype(str).tolist()
    with Run("judge", cfg.name, cfg.force) as run:
        j = cfg.open_judge(dtype=cfg.dtype, device=cfg.device, quiet=cfg.quiet)
        t0 = time.time()
        v = j.judge(requests, responses, desc=f"judge ({j.name})")
        secs = time.time() - t0
        run.time("judge", secs)
        new = table.drop(columns=[c for c in table.columns if c.startswith(("verdict", "confidence", "refusal_",
                                                                             "refusal@"))])
        if "refusal" in new.columns:
            new = new.rename(columns={"refusal": "refusal_before"})
        new.insert(new.columns.get_loc("completion"), "refusal", v.refusals)
        new.insert(new.columns.get_loc("completion"), "verdict", v.labels)
        new.insert(new.columns.get_loc("completion"), "confidence", v.confidence)
        keys = [c for c in GROUP_KEYS if c in new.columns]
        rows = []
        for key, g in new.groupby(keys, dropna=False, sort=False):
            key = key if isinstance(key, tuple) else (key,)
            s = rate_summary(list(g["refusal"].astype(bool)))
            row = dict(zip(keys, key))
            row.update(n=s["n"], refusals=s["k"], refusal_rate=s["rate"], ci_low=s["ci_low"], ci_high=s["ci_high"],
                       other_rate=float(np.mean(g["verdict"] == "other")))
            if "refusal_before" in g.columns:
                before = g["refusal_before"].map(lambda x: str(x) == "True").to_numpy()
                row["refusal_rate_before"] = float(before.mean())
                agree = before == g["refusal"].to_numpy(dtype=bool)
                row["agreement"] = float(agree.mean())
                row["kappa"] = (float(cohen_kappa_score(before, g["refusal"].to_numpy(dtype=bool)))
                                if len(set(before)) > 1 or len(set(g["refusal"])) > 1 else float("nan"))
            rows.append(row)
        sm = pd.DataFrame(rows)
        run.write_csv("verdicts.csv", new)
        run.write_csv("summary.csv", sm)
        final = run.finish(model=meta.get("model"), prompt_sets=meta.get("prompt_sets", []), seed=meta.get("seed"),
                           params=cfg.params(),
                           results={"summary": sm.to_dict(orient="records"), "source_run": str(folder),
                                    "source_command": command_, "source_judge": judge_of(meta),
                                    "n": len(new), "responses_per_s": len(new) / secs if secs > 0 else None},
                           judge=j.describe())
    from rich.table import Table

    t = Table(title=f"{command_} run {folder.name} re-judged by {judge_key(j.describe())} "
              f"(before: {judge_key(judge_of(meta))}): {final}", title_justify="left")
    cols = keys + ["n", "refusal rate [95% CI]", "other", "before", "kappa"]
    for c in cols:
        t.add_column(c)
    for _, r in sm.iterrows():
        t.add_row(*[str(r[k]) for k in keys], str(int(r["n"])),
                  f"{r['refusal_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]", f"{r['other_rate']:.2f}",
                  "-" if pd.isna(r.get("refusal_rate_before")) else f"{r['refusal_rate_before']:.2f}",
                  "-" if pd.isna(r.get("kappa")) else f"{r['kappa']:.2f}")
    out.print(t)
    console.print(f"wrote {final}")
