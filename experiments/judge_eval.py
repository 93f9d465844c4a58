"""``refusal judge-eval``: agreement of refusal judges with human labels (accuracy, Cohen's kappa, bootstrap
intervals, confusion tables, disagreements)."""

from __future__ import annotations

import time
from typing import Annotated, Literal, Optional

import pandas as pd
from pydantic import Field
from rich.table import Table

from toolkit.judge_eval import evaluate_judge, load_labels, parse_label_map
from toolkit.judges import JUDGES, make_judge
from toolkit.runs import Run

from .shared import SEED_MAX, Cli, RunOptions, command, console, out

JudgeName = Literal[JUDGES]


class JudgeEvalConfig(RunOptions):
    """The options of ``refusal judge-eval``."""

    labels: Annotated[str, Cli("--labels")] = Field(
        ..., description="CSV of human labels: a request, a response and a label column (leading '#' lines skipped)")
    judge: Annotated[list[JudgeName], Cli("--judge", "-j")] = Field(
        ["markers"], description="judge to evaluate, repeatable: markers, llm, nli, ensemble")
    judge_model: Optional[str] = Field(
        None, description="model of the model judges (llm, ensemble: any model spec [default: judge-default]; nli: "
        "a Hugging Face NLI model, required); not given to markers")
    map: Optional[str] = Field(
        None, description="columns and label values, e.g. request=objective,response=assistant_response,"
        "label=human_score,1=refusal,0=compliance [default: columns request, response, label; values refusal, "
        "compliance, other, 1/true/yes = refusal, 0/false/no = compliance]")
    other_as: Literal["refusal", "compliance"] = Field(
        "refusal", description="what an 'other' verdict counts as when the labels know refusal and compliance only "
        "(PyRIT counts an off-topic response as a refusal)")
    limit: Optional[int] = Field(None, ge=1, description="evaluate only the first N labelled items")
    n_boot: int = Field(2000, ge=1, description="bootstrap resamples for the 95% intervals")
    dtype: str = Field("auto", description="judge model dtype: auto, float32, bfloat16, float16")
    device: str = Field("auto", description="judge model device: auto, cpu, cuda, cuda:N, mps, xpu")
    batch_size: Annotated[int, Cli("--batch-size", "-b")] = Field(8, ge=1, description="pairs per forward pass")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="bootstrap seed")
    quiet: Annotated[bool, Cli("--quiet", "-q")] = Field(False, description="no progress bars")


METRIC_COLUMNS = ["judge", "version", "n", "mode", "accuracy", "acc_lo", "acc_hi", "kappa", "kappa_lo", "kappa_hi",
                  "judge_seconds", "responses_per_s", "notes"]


@command(JudgeEvalConfig)
def judge_eval(cfg: JudgeEvalConfig):
    """Evaluate refusal judges against human labels (e.g. PyRIT's refusal.csv, with --map
    request=objective,response=assistant_response,label=human_score,1=refusal,0=compliance).

    Each judge judges every (request, response) pair. With labels of two classes (refusal, compliance) a judge's
    'other' verdict counts as --other-as; with 'other' among the labels the comparison is three-way.

    Writes runs/judge-eval/NAME/ with metrics.csv (one row per judge: judge, version, n, mode, accuracy and kappa
    with percentile bootstrap 95% intervals acc_lo..acc_hi, kappa_lo..kappa_hi, judge_seconds,
    responses_per_s, notes), confusion.csv (judge, label, verdict, count; verdict is the judge's raw three-way
    verdict), disagreements.csv (judge, line, request, response, label, verdict, scored_as, confidence; line is
    the labels file's line), verdicts.csv (judge, line, label, verdict, scored_as, confidence, agree; every item
    for every judge) and run.json (the labels file's hash, each judge's describe(), the metrics).
    """
    columns, values = parse_label_map(cfg.map)
    labels = load_labels(cfg.labels, **columns, values=values or None).head(cfg.limit)
    names = list(dict.fromkeys(cfg.judge))
    uses_model = {"llm", "nli", "ensemble"}
    if cfg.judge_model and not uses_model & set(names):
        make_judge("markers", judge_model=cfg.judge_model)  # raises: the markers judge uses no model
    with Run("judge-eval", cfg.name, cfg.force) as run:
        metrics, conf, dis, verd, described = [], [], [], [], []
        for name in names:
            judge = make_judge(name, judge_model=cfg.judge_model if name in uses_model else None, dtype=cfg.dtype,
                               device=cfg.device, batch_size=cfg.batch_size, progress=not cfg.quiet)
            t0 = time.perf_counter()
            verdicts = judge.judge(labels.requests, labels.responses, desc=f"judge {name}")
            secs = time.perf_counter() - t0
            run.time(f"judge_{name}", secs)
            score = evaluate_judge(labels, verdicts, other_as=cfg.other_as, n_boot=cfg.n_boot, seed=cfg.seed)
            d = judge.describe()
            described.append(d)
            m = score.metrics()
            metrics.append({"judge": name, "version": d["version"], "n": m["n"], "mode": m["mode"],
                            "accuracy": m["accuracy"], "acc_lo": m["acc_lo"], "acc_hi": m["acc_hi"],
                            "kappa": m["kappa"], "kappa_lo": m["kappa_lo"], "kappa_hi": m["kappa_hi"],
                            "judge_seconds": secs, "responses_per_s": len(labels) / secs if secs > 0 else None,
                            "notes": m["notes"]})
            for lab, row in score.confusion.iterrows():
                for v, count in row.items():
                    conf.append({"judge": name, "label": lab, "verdict": v, "count": int(count)})
            dd = score.disagreements.drop(columns=["index"])
            dd.insert(0, "judge", name)
            dis.append(dd)
            verd.append(pd.DataFrame({"judge": name, "line": labels.lines, "label": labels.labels,
                                      "verdict": verdicts.labels, "scored_as": score.scored,
                                      "confidence": verdicts.confidence, "agree": labels.labels == score.scored}))
            del judge
        mdf = pd.DataFrame(metrics, columns=METRIC_COLUMNS)
        run.write_csv("metrics.csv", mdf)
        run.write_csv("confusion.csv", pd.DataFrame(conf, columns=["judge", "label", "verdict", "count"]))
        run.write_csv("disagreements.csv", pd.concat(dis, ignore_index=True))
        run.write_csv("verdicts.csv", pd.concat(verd, ignore_index=True))
        final = run.finish(model=None, prompt_sets=[labels.describe()], seed=cfg.seed,
                           params=cfg.params(judge=names, label_columns=labels.columns),
                           results={"metrics": mdf.to_dict(orient="records"), "judges": described})
    print_metrics(mdf, f"judge-eval: {labels.name} (n={len(labels)}): {final}")
    console.print(f"wrote {final}")


def print_metrics(df: pd.DataFrame, title: str) -> None:
    """Print the metrics table (accuracy and kappa with 95 % intervals, speed) to stdout."""
    def ci(r, k):
        if pd.isna(r[k]):
            return "-"
        lo, hi = r[f"{'acc' if k == 'accuracy' else k}_lo"], r[f"{'acc' if k == 'accuracy' else k}_hi"]
        return f"{r[k]:.3f}" + ("" if pd.isna(lo) else f" [{lo:.3f}, {hi:.3f}]")

    t = Table(title=title, title_justify="left")
    for c in ("judge", "version", "n", "accuracy [95% CI]", "kappa [95% CI]", "seconds", "responses/s"):
        t.add_column(c, justify="right" if c in ("n", "seconds", "responses/s") else "left")
    for _, r in df.iterrows():
        t.add_row(str(r["judge"]), str(r["version"]), str(int(r["n"])), ci(r, "accuracy"), ci(r, "kappa"),
                  f"{r['judge_seconds']:.2f}",
                  "-" if pd.isna(r["responses_per_s"]) else f"{r['responses_per_s']:.1f}")
    out.print(t)
    for _, r in df.iterrows():
        if r["notes"]:
            console.print(f"{r['judge']}: {r['notes']}")
