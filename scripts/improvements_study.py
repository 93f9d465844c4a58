"""The improvements study: each proposed improvement against plain difference-in-means ablation, over seeds.

For every model (``--models``: offline aliases or checkpoint folders) and seed ``s`` (``--seeds``) the script chains
the ``refusal`` command line:

1. ``refusal extract --sample --n-train N --n-val V --seed s --method M`` for M in diff-means, probe, caa (run
   ``study-<model>-<method>-s<seed>``; the training prompts are drawn with the seed, so the seed-to-seed spread
   includes the direction estimate's);
2. ``refusal ablate --split test --limit L --gen-tokens G --no-capability --kl-tokens K --seed s`` for the arms
   (run ``study-<model>-<arm>-s<seed>``):

   * ``dim``: the difference-in-means direction, full directional ablation (the baseline every arm is tested
     against; Arditi et al. 2024);
   * ``probe``, ``caa``: the probe's and CAA's directions, full ablation;
   * ``heads``: the dim direction ablated from the ``--top-heads`` heads of a ``refusal patch`` run
     (``--heads-from MODEL=RUN``; skipped with a note for a model without one);
   * ``act-scaled``: dim, ``--form projection --activation-scaled``;
   * ``norm-preserving``: dim, ``--form norm-preserving``;
   * ``affine``: dim, ``--form affine``.

   A run that already exists is skipped (a killed study resumes) unless ``--force``.
3. The toolkit's own statistics commands: ``refusal stats seeds --vary direction`` over each arm's seed runs
   (``study-<model>-<arm>-seeds``) and, per seed, ``refusal stats ttest`` of the arm's per-prompt harmful refusals
   against dim's (exact McNemar test on the same test prompts; ``study-<model>-<arm>-vs-dim-s<seed>``).

Then, per model x arm, the seed-level values read from each ablate run's ``summary.csv`` (condition ``ablated``):
harmful refusal rate (``refusal``), borderline over-refusal (``over_refusal``, when evaluated) and harmless
first-token KL (``kl``, nats); their mean and SD (ddof 1) over seeds; a paired t-test over seeds of the arm's refusal
against dim's (pairs = same seed; :func:`toolkit.stats.paired_ttest`, whose effect size is Cohen's d_z of the
paired differences); the p-values Holm-corrected across a model's arms (:func:`toolkit.stats.adjust_pvalues`).

Survival rule (column ``survives``): an arm survives on a model when (a) its mean refusal is lower than dim's,
(b) its Holm-adjusted paired p < 0.05, and (c) its mean KL is no worse than dim's mean KL plus dim's SD over seeds.
Where dim already removes every refusal an arm cannot beat it on refusal, so a second rule (column
``survives_kl``) asks the other question: (a) its mean refusal is no higher than dim's mean plus dim's SD, and (b)
its harmless KL is lower than dim's in a paired t-test over seeds with Holm-adjusted p < 0.05 (columns
``kl_diff``, ``kl_d_z``, ``kl_p``, ``kl_p_holm``).
With 3 seeds the paired t-test has 2 degrees of freedom, so only large, consistent effects survive; an arm with a
failed or missing run on some seed is tested on the seeds both it and dim have (at least 2).

Writes ``runs/study/<name>/table.csv`` (one row per model x arm), ``per_seed.csv`` (one row per model x arm x
seed, with the per-seed McNemar p against dim) and ``table.md`` (printed with ``--markdown``).

    python scripts/improvements_study.py --models qwen-coder-0.5b --seeds 0,1,2 --limit 40 --markdown

Bad input (an unknown model or arm, bad seeds or sizes) is one ``error:`` line and exit code 2, before any run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.default_model import offline_model  # noqa: E402
from toolkit.errors import ToolkitError  # noqa: E402
from toolkit.runs import runs_root  # noqa: E402
from toolkit.stats import adjust_pvalues, paired_ttest  # noqa: E402

BASELINE = "dim"
#: arm -> (extract method of its direction, extra ablate options)
ARMS = {
    "dim": ("diff-means", []),
    "probe": ("probe", []),
    "caa": ("caa", []),
    "heads": ("diff-means", None),  # --heads-from per model
    "act-scaled": ("diff-means", ["--form", "projection", "--activation-scaled"]),
    "norm-preserving": ("diff-means", ["--form", "norm-preserving"]),
    "affine": ("diff-means", ["--form", "affine"]),
}
METRICS = ("refusal", "over_refusal", "kl")
ALPHA = 0.05

Invoke = Callable[[list[str]], int]


class StudyError(Exception):
    """Bad input of the study (exit code 2)."""


def subprocess_invoke(args: list[str]) -> int:
    """Run ``refusal ARGS`` as a subprocess (as the Justfile recipes do); returns its exit code."""
    print("+ refusal " + shlex.join(args), flush=True)
    return subprocess.run(["refusal", *args]).returncode


def model_label(spec: str) -> str:
    """The model's name in run names: its alias, or a folder's name (characters outside ``[A-Za-z0-9._-]`` as -).

    Raises:
        StudyError: neither an offline alias nor an existing folder or .gguf file.
    """
    if offline_model(spec) is not None:
        return spec
    p = Path(spec).expanduser()
    if p.is_dir() or (p.is_file() and p.suffix == ".gguf"):
        return re.sub(r"[^A-Za-z0-9._-]", "-", p.stem if p.is_file() else p.resolve().name)
    raise StudyError(f"--models: {spec!r} is neither an offline model alias (`refusal models`) nor a checkpoint "
                     "folder or .gguf file")


def parse_list(text: str, option: str) -> list[str]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise StudyError(f"{option}: give at least one value")
    if len(set(items)) != len(items):
        raise StudyError(f"{option}: a value is given twice")
    return items


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen-coder-0.5b", help="comma-separated offline aliases or checkpoint folders")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 2)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms among {', '.join(ARMS)} "
                    f"({BASELINE} is always run)")
    ap.add_argument("--n-train", type=int, default=64, help="training prompts per set drawn per seed (extract)")
    ap.add_argument("--n-val", type=int, default=32, help="validation prompts per set (extract's selection)")
    ap.add_argument("--limit", type=int, default=40, help="test prompts per set (ablate)")
    ap.add_argument("--gen-tokens", type=int, default=12, help="greedy tokens judged per completion (ablate)")
    ap.add_argument("--kl-tokens", type=int, default=0, help="ablate's multi-token KL length (0: off, cheaper)")
    ap.add_argument("--heads-from", action="append", default=[], metavar="MODEL=RUN",
                    help="a `refusal patch` run per model for the heads arm (repeatable; a bare RUN with one model)")
    ap.add_argument("--top-heads", type=int, default=None, help="heads taken from the patch run [ablate's default]")
    ap.add_argument("--harmful", default="harmful")
    ap.add_argument("--harmless", default="harmless")
    ap.add_argument("--over-refusal", default="borderline", help="ablate's over-refusal set, or none")
    ap.add_argument("--judge", default="markers", help="ablate's refusal judge")
    ap.add_argument("--dtype", default=None, help="--dtype of every command")
    ap.add_argument("--batch-size", type=int, default=None, help="--batch-size of every command")
    ap.add_argument("--extract-args", default="", help="more options for every extract, one shell-quoted string")
    ap.add_argument("--ablate-args", default="", help="more options for every ablate, one shell-quoted string")
    ap.add_argument("--name", default="improvements", help="the table's folder: runs/study/NAME")
    ap.add_argument("--force", action="store_true", help="redo runs that exist (default: skip them, to resume)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--quiet", action="store_true", help="pass --quiet to every command")
    return ap.parse_args(argv)


def check(a: argparse.Namespace) -> dict:
    """Validated settings: ``models`` (spec -> label), ``seeds``, ``arms``, ``heads`` (spec -> patch run).

    Raises:
        StudyError: unknown model or arm, bad seeds or sizes, a --heads-from that names no given model.
    """
    models = {}
    for spec in parse_list(a.models, "--models"):
        models[spec] = model_label(spec)
    if len(set(models.values())) != len(models):
        raise StudyError("--models: two models have the same name in run names")
    try:
        seeds = [int(s) for s in parse_list(a.seeds, "--seeds")]
    except ValueError:
        raise StudyError(f"--seeds: integers, got {a.seeds!r}") from None
    if len(seeds) < 2 or min(seeds) < 0:
        raise StudyError(f"--seeds: at least 2 distinct non-negative seeds, got {a.seeds!r}")
    arms = parse_list(a.arms, "--arms")
    bad = [x for x in arms if x not in ARMS]
    if bad:
        raise StudyError(f"--arms: unknown arm {bad[0]!r}; choose from {', '.join(ARMS)}")
    arms = [BASELINE] + [x for x in ARMS if x in arms and x != BASELINE]
    for opt in ("n_train", "n_val", "limit", "gen_tokens"):
        if getattr(a, opt) < 1:
            raise StudyError(f"--{opt.replace('_', '-')}: must be >= 1, got {getattr(a, opt)}")
    if a.kl_tokens < 0 or (a.top_heads is not None and a.top_heads < 1):
        raise StudyError("--kl-tokens must be >= 0 and --top-heads >= 1")
    heads = {}
    for item in a.heads_from:
        spec, sep, run = item.rpartition("=")
        if not sep:
            if len(models) != 1:
                raise StudyError(f"--heads-from {item!r}: name the model (MODEL=RUN) when several are studied")
            spec, run = next(iter(models)), item
        if spec not in models:
            raise StudyError(f"--heads-from {item!r}: {spec!r} is not one of --models")
        heads[spec] = run
    try:
        extra = {"extract": shlex.split(a.extract_args), "ablate": shlex.split(a.ablate_args)}
    except ValueError as e:
        raise StudyError(f"--extract-args/--ablate-args: {e}") from None
    return {"models": models, "seeds": seeds, "arms": arms, "heads": heads, "extra": extra}


def exists(command: str, name: str) -> bool:
    return (runs_root() / command / name / "run.json").is_file()


def common(a, spec: str) -> list[str]:
    out = ["--model", spec]
    if a.dtype:
        out += ["--dtype", a.dtype]
    if a.batch_size:
        out += ["--batch-size", str(a.batch_size)]
    if a.quiet:
        out += ["--quiet"]
    return out


def run_step(invoke: Invoke, command: str, name: str, args: list[str], force: bool, log: list) -> bool:
    """Run one command unless its run exists (and not ``force``); True when the run is there afterwards."""
    if exists(command, name) and not force:
        log.append({"command": command, "run": name, "status": "skipped (exists)"})
        return True
    rc = invoke([command, *args, "--name", name] + (["--force"] if force else []))
    ok = rc == 0 and exists(command, name)
    log.append({"command": command, "run": name, "status": "ran" if ok else f"failed (exit {rc})"})
    return ok


def seed_values(folder: Path) -> dict:
    """The seed-level values of one ablate run from its summary.csv (condition ``ablated``) and run.json: harmful
    refusal rate, over-refusal rate (NaN when not evaluated), harmless mean first-token KL, and the set names."""
    meta = json.loads((folder / "run.json").read_text())
    names = [p["name"] for p in meta["prompt_sets"]]
    sm = pd.read_csv(folder / "summary.csv")
    ab = sm[sm.condition == "ablated"].set_index("set")
    return {"refusal": float(ab.loc[names[0], "refusal_rate"]),
            "over_refusal": float(ab.loc[names[2], "refusal_rate"]) if len(names) > 2 else float("nan"),
            "kl": float(ab.loc[names[1], "mean_kl"]), "sets": names}


def study_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """One row per model x arm from the seed-level values (columns model, arm, seed, refusal, over_refusal, kl):
    mean and SD (ddof 1) of each metric, the paired t-test over seeds of refusal against dim (same seeds), its
    d_z, the Holm-adjusted p across each model's arms, and ``survives`` (the rule of the module docstring)."""
    rows = []
    for (model, arm), g in per_seed.groupby(["model", "arm"], sort=False):
        row = {"model": model, "arm": arm, "n_seeds": len(g)}
        for m in METRICS:
            v = g[m].to_numpy(dtype=float)
            row[f"{m}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"{m}_sd"] = float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else float("nan")
        base = per_seed[(per_seed.model == model) & (per_seed.arm == BASELINE)].set_index("seed")
        row.update({"refusal_diff": float("nan"), "t": float("nan"), "df": float("nan"), "p": float("nan"),
                    "d_z": float("nan"), "n_pairs": 0, "kl_diff": float("nan"), "kl_d_z": float("nan"),
                    "kl_p": float("nan")})
        if arm != BASELINE:
            common = [s for s in g.seed if s in base.index]
            row["n_pairs"] = len(common)
            if len(common) >= 2:
                mine = g.set_index("seed").loc[common]
                t = paired_ttest(mine["refusal"].to_numpy(dtype=float), base.loc[common, "refusal"].to_numpy(dtype=float))
                row.update({"refusal_diff": t["mean_diff"], "t": t["statistic"], "df": t["df"],
                            "p": t["p_value"], "d_z": t["effect_size"]})
                k = paired_ttest(mine["kl"].to_numpy(dtype=float), base.loc[common, "kl"].to_numpy(dtype=float))
                row.update({"kl_diff": k["mean_diff"], "kl_d_z": k["effect_size"], "kl_p": k["p_value"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table["p_holm"] = float("nan")
    table["kl_p_holm"] = float("nan")
    for model, g in table.groupby("model", sort=False):
        idx = g.index[g.arm != BASELINE]
        if len(idx):
            table.loc[idx, "p_holm"] = adjust_pvalues(table.loc[idx, "p"].to_numpy(dtype=float), "holm")[0]
            table.loc[idx, "kl_p_holm"] = adjust_pvalues(table.loc[idx, "kl_p"].to_numpy(dtype=float), "holm")[0]
    surv, surv_kl = [], []
    for _, r in table.iterrows():
        if r.arm == BASELINE:
            surv.append("baseline")
            surv_kl.append("baseline")
            continue
        b = table[(table.model == r.model) & (table.arm == BASELINE)].iloc[0]
        kl_bound = b.kl_mean + (b.kl_sd if np.isfinite(b.kl_sd) else 0.0)
        ok = (r.refusal_mean < b.refusal_mean and np.isfinite(r.p_holm) and r.p_holm < ALPHA
              and r.kl_mean <= kl_bound)
        surv.append("yes" if ok else "no")
        refusal_bound = b.refusal_mean + (b.refusal_sd if np.isfinite(b.refusal_sd) else 0.0)
        ok_kl = (r.refusal_mean <= refusal_bound and r.kl_mean < b.kl_mean and np.isfinite(r.kl_p_holm)
                 and r.kl_p_holm < ALPHA)
        surv_kl.append("yes" if ok_kl else "no")
    table["survives"] = surv
    table["survives_kl"] = surv_kl
    return table


def run_study(a: argparse.Namespace, cfg: dict, invoke: Invoke) -> tuple[pd.DataFrame, pd.DataFrame, list, list]:
    """Extract, ablate and the stats commands for every model x seed x arm; returns (table, per-seed values,
    log of steps, notes)."""
    log, notes, rows, pvals = [], [], [], []
    methods = sorted({ARMS[x][0] for x in cfg["arms"]}, key=lambda m: ["diff-means", "probe", "caa"].index(m))
    for spec, label in cfg["models"].items():
        arms = [x for x in cfg["arms"] if x != "heads" or spec in cfg["heads"]]
        if "heads" in cfg["arms"] and spec not in cfg["heads"]:
            notes.append(f"{label}: heads arm skipped (no --heads-from patch run for it)")
        done = {x: [] for x in arms}
        for s in cfg["seeds"]:
            ex = {}
            for m in methods:
                name = f"study-{label}-{m}-s{s}"
                args = ["--harmful", a.harmful, "--harmless", a.harmless, "--sample", "--n-train", str(a.n_train),
                        "--n-val", str(a.n_val), "--seed", str(s), "--method", m, *common(a, spec),
                        *cfg["extra"]["extract"]]
                if run_step(invoke, "extract", name, args, a.force, log):
                    ex[m] = name
            for arm in arms:
                method, extra = ARMS[arm]
                if method not in ex:
                    notes.append(f"{label} seed {s}: {arm} skipped (its {method} extract run failed)")
                    continue
                if extra is None:
                    extra = ["--heads-from", cfg["heads"][spec]] + (
                        ["--top-heads", str(a.top_heads)] if a.top_heads else [])
                name = f"study-{label}-{arm}-s{s}"
                args = ["--direction", str(runs_root() / "extract" / ex[method]), "--harmful", a.harmful,
                        "--harmless", a.harmless, "--over-refusal", a.over_refusal, "--split", "test", "--limit",
                        str(a.limit), "--gen-tokens", str(a.gen_tokens), "--kl-tokens", str(a.kl_tokens),
                        "--no-capability", "--judge", a.judge, "--seed", str(s), *extra, *common(a, spec),
                        *cfg["extra"]["ablate"]]
                if run_step(invoke, "ablate", name, args, a.force, log):
                    done[arm].append(s)
                    v = seed_values(runs_root() / "ablate" / name)
                    rows.append({"model": label, "arm": arm, "seed": s, "run": name,
                                 **{k: v[k] for k in METRICS}})
                    if arm != BASELINE and s in done[BASELINE]:
                        pvals.append(per_prompt_test(invoke, label, arm, s, v["sets"][0], log))
                else:
                    notes.append(f"{label} seed {s}: {arm} ablate run failed")
        for arm in arms:  # the toolkit's own seed aggregation of each arm
            seeds = done[arm]
            if len(seeds) >= 2:
                runs = [str(runs_root() / "ablate" / f"study-{label}-{arm}-s{s}") for s in seeds]
                rc = invoke(["stats", "seeds", *runs, "--vary", "direction", "--name", f"study-{label}-{arm}-seeds",
                             "--force"])
                log.append({"command": "stats seeds", "run": f"study-{label}-{arm}-seeds",
                            "status": "ran" if rc == 0 else f"failed (exit {rc})"})
    per_seed = pd.DataFrame(rows, columns=["model", "arm", "seed", "run", *METRICS])
    if pvals:
        per_seed = per_seed.merge(pd.DataFrame(pvals), on=["model", "arm", "seed"], how="left")
    else:
        per_seed["mcnemar_p_vs_dim"] = float("nan")
    if per_seed.empty:
        return pd.DataFrame(), per_seed, log, notes
    return study_table(per_seed), per_seed, log, notes


def per_prompt_test(invoke: Invoke, label: str, arm: str, seed: int, harmful_set: str, log: list) -> dict:
    """``refusal stats ttest`` of an arm's per-prompt harmful refusals against dim's at one seed (exact McNemar);
    returns ``{model, arm, seed, mcnemar_p_vs_dim}`` (NaN when the command failed)."""
    name = f"study-{label}-{arm}-vs-dim-s{seed}"
    root = runs_root()
    rc = invoke(["stats", "ttest", str(root / "ablate" / f"study-{label}-{arm}-s{seed}"),
                 str(root / "ablate" / f"study-{label}-{BASELINE}-s{seed}"), "--metric", "refusal", "--set",
                 harmful_set, "--where-a", "condition=ablated", "--where-b", "condition=ablated", "--name", name,
                 "--force"])
    p = float("nan")
    if rc == 0:
        p = float(pd.read_csv(root / "stats" / name / "ttest.csv")["p_value"].iloc[0])
    log.append({"command": "stats ttest", "run": name, "status": "ran" if rc == 0 else f"failed (exit {rc})"})
    return {"model": label, "arm": arm, "seed": seed, "mcnemar_p_vs_dim": p}


def markdown(table: pd.DataFrame) -> str:
    """The README table: mean +- SD per metric, the paired differences (refusal with d_z and Holm p; KL with Holm p)
    and both survival columns."""
    def ms(r, m):
        mean, sd = r[f"{m}_mean"], r[f"{m}_sd"]
        if not np.isfinite(mean):
            return "-"
        return f"{mean:.3f} ± {sd:.3f}" if np.isfinite(sd) else f"{mean:.3f}"

    def num(x, fmt=".3f"):
        return "-" if x is None or not np.isfinite(x) else format(x, fmt)

    show = pd.DataFrame({
        "model": table.model, "arm": table.arm, "seeds": table.n_seeds,
        "refusal": [ms(r, "refusal") for _, r in table.iterrows()],
        "over-refusal": [ms(r, "over_refusal") for _, r in table.iterrows()],
        "KL": [ms(r, "kl") for _, r in table.iterrows()],
        "Δ refusal vs dim": [num(x, "+.3f") for x in table.refusal_diff],
        "d_z": [num(x, ".2f") for x in table.d_z],
        "p (Holm)": [num(x, ".3g") for x in table.p_holm],
        "survives": table.survives,
        "Δ KL vs dim": [num(x, "+.3f") for x in table.kl_diff],
        "KL p (Holm)": [num(x, ".3g") for x in table.kl_p_holm],
        "survives on KL": table.survives_kl})
    return show.to_markdown(index=False)


def main(argv: Sequence[str] | None = None, invoke: Invoke | None = None) -> int:
    """Run the study; returns 0, 1 (some run failed: the table holds the rest) or 2 (bad input)."""
    a = parse_args(argv)
    try:
        cfg = check(a)
        out = runs_root() / "study" / a.name
        if "/" in a.name or a.name.startswith(".") or not a.name:
            raise StudyError(f"--name: a plain folder name, got {a.name!r}")
    except (StudyError, ToolkitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table, per_seed, log, notes = run_study(a, cfg, invoke or subprocess_invoke)
    out.mkdir(parents=True, exist_ok=True)
    per_seed.to_csv(out / "per_seed.csv", index=False)
    pd.DataFrame(log).to_csv(out / "steps.csv", index=False)
    for n in notes:
        print(f"note: {n}")
    failed = [x for x in log if x["status"].startswith("failed")]
    if table.empty:
        print("error: no ablate run finished; nothing to tabulate", file=sys.stderr)
        return 1
    table.to_csv(out / "table.csv", index=False)
    md = markdown(table)
    (out / "table.md").write_text(md + "\n")
    print(md if a.markdown else table.to_string(index=False))
    print(f"wrote {out}/table.csv, per_seed.csv, table.md ({sum(x['status'] == 'ran' for x in log)} run(s) made, "
          f"{sum(x['status'].startswith('skipped') for x in log)} skipped as existing, {len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
