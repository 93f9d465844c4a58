"""A scripted bad-input run over every subcommand, through Typer's CliRunner in process.

The README promises that bad input "prints one `error:` line and exits with code 2, leaving nothing behind". Each
case below is one command line that differs from a VALID command line of its subcommand (``BASE``, checked by
``test_base_command_is_valid``) by one bad argument or one bad input file, run in a scratch folder (the working
directory) that holds the tiny Qwen2 checkpoint, prompt files, a few real finished runs (made once per module) and
hand-broken inputs. :func:`check_promise` then checks, mechanically:

* exit code 2 and ``SystemExit`` as the exception (any other exception object is a traceback in real use);
* exactly one output line starting with ``error:`` (and the case's needles in it), no ``Traceback``;
* the snapshot of the whole scratch folder (every path, recursively, hidden ones included; type, size and mtime of
  files, type and permission bits of folders) identical before and after: no run folder, no hidden temporary
  folder, no empty ``runs/<command>/`` folder, no ``--save`` target, nothing changed in the model folder or in the
  runs given as input. Folder mtimes are not compared: they change when something is created and removed again
  (a run's temporary folder removed on error), which leaves nothing behind.

Click/Typer's own usage errors (an int option given text, a missing required option or argument) printed a boxed
``Usage: ... Error: ...`` with no ``error:`` line before commit 0479c97; since then ``experiments.cli.RefusalGroup``
prints them as one ``error:`` line too (checked by running them: "error: Invalid value for '--limit': ..."). So
they are held to the same promise; they are marked ``usage=True`` only to be counted separately (``USAGE_CASES``).

Run: ``python -m pytest -q tests/test_bad_input.py -p no:randomly``
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import WORDS
from test_cli import EXTRACT_FAST, HARMFUL, HARMLESS, PERMISSIVE, invoke, output_of, save_tiny, write_set
from toolkit.directions import save_direction

# ------------------------------------------------------------------------------------------------ inputs
MODEL = "tiny-qwen2"
COMMON = ["--model", MODEL, "--quiet", "--batch-size", "4", "--dtype", "float32"]
assert EXTRACT_FAST[:3] == ["--quiet", "--batch-size", "4"]  # the fast options test_cli.py uses

# finished runs made once (REFUSAL_RUNS=valid during setup), used as valid inputs of the bad-input cases
SC0, SC1, EX, ST, GE, GE01 = ("valid/score/sc0", "valid/score/sc1", "valid/extract/ex", "valid/steer/st",
                              "valid/geometry/ge", "valid/geometry/ge01")

# patch: prompts the reloaded tiny tokenizer pairs by length (as tests/test_patching.py)
PATCH_H = ["i a .", "a ! i ?", "i , a", "? i a !"]
PATCH_B = ["a i ?", "a a ! i", "i . a", "! a a ?", "a . i . a . i"]
PATCH_U = ["a", "i a . i a . i a"]

# cones / geometry / plot-residuals: 3 categories x 8 harmful prompts (6 train, 2 test), 16 harmless
_CONES_WORDS = "how do i make a bomb tell me story about cat what is the capital of france write poem".split()


def _sent(i: int) -> str:
    return " ".join(_CONES_WORDS[(i * 7 + k * 3) % len(_CONES_WORDS)] for k in range(3 + i % 4))


CONES_H = [{"id": f"h{c}{i}", "prompt": _sent(c * 8 + i), "category": f"c{c}",
            "split": "train" if i < 6 else "test"} for c in range(3) for i in range(8)]
CONES_B = [{"id": f"b{i}", "prompt": _sent(40 + i), "category": "x", "split": "train" if i < 12 else "test"}
           for i in range(16)]

_VOCAB = set(WORDS) | {".", ",", "?", "!"}
assert all(set(p.split()) <= _VOCAB for p in PATCH_H + PATCH_B + PATCH_U + [r["prompt"] for r in CONES_H + CONES_B])

BASE = {
    "score": ["score", "h.jsonl", "b.jsonl", "--split", "test", "--gen-tokens", "2", *COMMON],
    "extract": ["extract", "--harmful", "h.jsonl", "--harmless", "b.jsonl", *PERMISSIVE, *COMMON],
    "ablate": ["ablate", "--direction", EX, "--harmful", "h.jsonl", "--harmless", "b.jsonl", "--split", "test",
               "--gen-tokens", "2", *COMMON],
    "steer": ["steer", "--learn", "b.jsonl", "--top-k", "2", "--sets", "h.jsonl", "--layers", "2", "--alpha",
              "-1:1:1", "--random", "2", "--no-plot", *COMMON],
    "steer-d": ["steer", "--direction", EX, "--sets", "h.jsonl", "--layers", "2", "--alpha", "-1:1:1", "--no-plot",
                *COMMON],
    "dose-response": ["dose-response", "--direction", EX, "--harmful", "h.jsonl", "--benign", "b.jsonl", "--split",
                      "test", "--alpha", "0:2:1", "--gen-tokens", "2", "--bootstrap", "100", "--no-plot", *COMMON],
    "patch": ["patch", "--harmful", "ph.jsonl", "--harmless", "pb.jsonl", "--layers", "1", "--bootstrap", "0",
              *COMMON],
    "cones": ["cones", "--harmful", "ch.jsonl", "--harmless", "cb.jsonl", "--min-per-category", "3", "--boot", "20",
              "--null", "20", "--k-max", "4", "--no-plot", *COMMON],
    "geometry": ["geometry", "--harmful", "ch.jsonl", "--harmless", "cb.jsonl", *COMMON],
    "plot-residuals": ["plot-residuals", "--sets", "cb.jsonl,ch.jsonl", "--method", "pca", "--no-gif", *COMMON],
    "imprint": ["imprint", GE, EX, "--no-plot"],
    "depth": ["depth", EX],
    "compare": ["compare", SC0, EX],
    "judge": ["judge", SC0],
    "judge-eval": ["judge-eval", "--labels", "labels.csv"],
    "optimize": ["optimize", "--harmful", "h.jsonl", "--harmless", "b.jsonl", "--borderline", "none", "--trials", "2",
                 "--startup", "1", "--gen-tokens", "2", "--kl-tokens", "2", "--no-test", *COMMON],
    "models": ["models", "smollm2-135m", "--json-out"],
    "stats seeds": ["stats", "seeds", SC0, SC1],
    "stats ttest": ["stats", "ttest", SC0, SC1],
    "stats control": ["stats", "control", ST],
    "export": ["export", EX, "--format", "safetensors", "--out", "ex.safetensors", "--force"],
}
MODEL_COMMANDS = ("score", "extract", "ablate", "steer", "dose-response", "patch", "cones", "geometry",
                  "plot-residuals", "optimize")
SUBCOMMANDS = MODEL_COMMANDS + ("compare", "judge", "judge-eval", "imprint", "depth", "models", "stats seeds",
                                 "stats ttest", "stats control", "export")


# ------------------------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    """One bad command line.

    Attributes:
        id: test id.
        args: the command line (after ``refusal``).
        setup: ``setup(env, monkeypatch)`` run before the 'before' snapshot; may return a teardown callable, run
            after the 'after' snapshot.
        needles: strings the ``error:`` line must contain.
        usage: a Click/Typer usage error (counted separately; the same promise is checked).
        skip_root: skipped when running as root (file permissions do not bind root).
    """

    id: str
    args: tuple
    setup: Callable | None = None
    needles: tuple = ()
    usage: bool = False
    skip_root: bool = False

    @property
    def command(self) -> str:
        return " ".join(self.args[:2]) if self.args[0] == "stats" else self.args[0]


CASES: list[Case] = []


def case(id_: str, args, *needles, setup=None, usage=False, skip_root=False):
    CASES.append(Case(id_, tuple(str(a) for a in args), setup, tuple(needles), usage, skip_root))


def base(cmd: str, *extra):
    return [*BASE[cmd], *extra]


# setups -------------------------------------------------------------------------------------------------
def runs_env(value: str):
    """REFUSAL_RUNS set to ``value`` for one case."""
    def setup(env, mp):
        mp.setenv("REFUSAL_RUNS", value)
    return setup


def read_only_runs(env, mp):
    """The runs folder made read-only (0o555)."""
    runs = env["base"] / "runs"
    runs.chmod(0o555)
    return lambda: runs.chmod(0o755)


def taken(command: str, source: str):
    """runs/<command>/taken exists (a copy of a finished run)."""
    def setup(env, mp):
        folder = env["base"] / "runs" / command
        shutil.copytree(env["base"] / source, folder / "taken")
        return lambda: shutil.rmtree(folder)
    return setup


def read_only_folder(rel: str):
    def setup(env, mp):
        p = env["base"] / rel
        p.mkdir()
        p.chmod(0o555)

        def teardown():
            p.chmod(0o755)
            shutil.rmtree(p)
        return teardown
    return setup


NAME300 = "n" * 300
HUGE = str(2 ** 64)
MARKUP_MISSING = "in/prompts[test].jsonl"  # does not exist: the error line must name it exactly
MARKUP_CLOSE = "in/old[/v1].jsonl"  # does not exist; '[/v1]' is a closing tag to Rich
MARKUP_BAD = "in/bad[red].jsonl"  # exists, line 2 malformed: the error line must name it exactly

# common bad options of every model command ----------------------------------------------------------
for c in MODEL_COMMANDS:
    case(f"{c}-dtype-bogus", base(c, "--dtype", "bogus"), "bogus")
    case(f"{c}-device-bogus", base(c, "--device", "bogus"), "bogus")
    case(f"{c}-device-cuda99", base(c, "--device", "cuda:99"), "cuda:99")
    case(f"{c}-device-meta", base(c, "--device", "meta"))
    case(f"{c}-batch-size-0", base(c, "--batch-size", "0"), "--batch-size")
    case(f"{c}-seed-2**64", base(c, "--seed", HUGE), "--seed")
    case(f"{c}-model-missing", base(c, "--model", "nope/missing-model"), "nope/missing-model")
    case(f"{c}-name-dotdot", base(c, "--name", ".."))
for cmd in ("score", "extract", "ablate", "steer", "cones", "plot-residuals"):
    case(f"{cmd}-device-mps", base(cmd, "--device", "mps"), "mps")
    case(f"{cmd}-batch-size--1", base(cmd, "--batch-size", "-1"), "--batch-size")
    case(f"{cmd}-seed--1", base(cmd, "--seed", "-1"), "--seed")
for cmd in ("score", "geometry", "patch"):
    case(f"{cmd}-name-slash", base(cmd, "--name", "a/b"), "a/b")
    case(f"{cmd}-name-hidden", base(cmd, "--name", ".hidden"), ".hidden")
    case(f"{cmd}-name-300", base(cmd, "--name", NAME300))
case("score-name-empty", base("score", "--name", ""))
case("score-dtype-float64", base("score", "--dtype", "float64"), "float64")
case("score-dtype-empty", base("score", "--dtype", ""), "dtype")
case("score-device-empty", base("score", "--device", ""), "device")
case("score-device-cuda--1", base("score", "--device", "cuda:-1"), "cuda:-1")
case("score-device-xpu", base("score", "--device", "xpu"), "xpu")
case("extract-device-xpu", base("extract", "--device", "xpu"), "xpu")
case("score-auto-dtype-env-bogus", base("score", "--dtype", "auto"), "bogus",
     setup=lambda env, mp: mp.setenv("REFUSAL_TOOLKIT_AUTO_DTYPE", "bogus"))
case("score-model-missing-gguf", base("score", "--model", "nope.gguf"), "nope.gguf")
case("score-model-bad-config", base("score", "--model", "models/badconfig"), "models/badconfig")
case("score-model-config-only", base("score", "--model", "models/configonly"), "models/configonly")
case("geometry-model-config-only", base("geometry", "--model", "models/configonly"), "models/configonly")
case("score-model-folder-without-config", base("score", "--model", "in"), "in")
case("score-model-is-a-prompt-file", base("score", "--model", "h.jsonl"))
case("score-model-bad-gguf", base("score", "--model", "in/bad.gguf"), "bad.gguf")

# runs folder problems and existing runs -----------------------------------------------------------------
for cmd, args in (("score", base("score")), ("geometry", base("geometry")), ("compare", base("compare")),
                  ("imprint", base("imprint")), ("stats-seeds", base("stats seeds"))):
    case(f"{cmd}-runs-is-a-file", args, "afile", setup=runs_env("afile"))
    case(f"{cmd}-runs-below-a-file", args, "afile", setup=runs_env("afile/runs"))
    case(f"{cmd}-runs-read-only", args, setup=read_only_runs, skip_root=True)
case("score-existing-name", base("score", "--name", "taken"), "taken", "already exists", "--force",
     setup=taken("score", SC0))
case("geometry-existing-name", base("geometry", "--name", "taken"), "already exists",
     setup=taken("geometry", GE))
case("compare-existing-name", base("compare", "--name", "taken"), "already exists", setup=taken("compare", SC0))
case("imprint-existing-name", base("imprint", "--name", "taken"), "already exists", setup=taken("imprint", GE))
case("stats-seeds-existing-name", base("stats seeds", "--name", "taken"), "already exists",
     setup=taken("stats", SC0))

# score: prompt files ----------------------------------------------------------------------------------
SCORE_OPTS = ["--split", "test", "--gen-tokens", "2", *COMMON]
for cid, spec, *needles in (
        ("missing-file", "missing.jsonl", "missing.jsonl"),
        ("empty-file", "in/empty.jsonl", "in/empty.jsonl"),
        ("blank-lines-only", "in/blank.jsonl", "in/blank.jsonl"),
        ("bad-json-line", "in/badline.jsonl", "in/badline.jsonl", "line 2"),
        ("no-prompt-field", "in/nofield.jsonl", "in/nofield.jsonl", "line 1"),
        ("json-line-not-object", "in/list.jsonl", "in/list.jsonl", "line 1"),
        ("empty-prompt-text", "in/emptyprompt.jsonl", "in/emptyprompt.jsonl", "line 1"),
        ("unknown-split-in-file", "in/badsplit.jsonl", "in/badsplit.jsonl", "testing"),
        ("duplicate-ids", "in/dup.jsonl", "in/dup.jsonl"),
        ("csv-without-prompt-column", "in/text.csv", "in/text.csv"),
        ("json-not-a-list", "in/obj.json", "in/obj.json"),
        ("not-utf8", "in/latin1.txt", "in/latin1.txt"),
        ("unsupported-type", "in/prompts.xml", ".xml"),
        ("folder-as-prompt-file", "in", "in"),
        ("markup-missing", MARKUP_MISSING, MARKUP_MISSING),
        ("markup-closing-tag", MARKUP_CLOSE, MARKUP_CLOSE),
        ("markup-malformed", MARKUP_BAD, MARKUP_BAD)):
    case(f"score-{cid}", ["score", spec, *SCORE_OPTS], *needles)
case("score-csv-column-missing", ["score", "in/x.csv", "--column", "question", *SCORE_OPTS], "question")
case("score-jsonl-column-missing", ["score", "h.jsonl", "--column", "question", *SCORE_OPTS], "question")
case("score-second-set-bad", ["score", "h.jsonl", "in/badline.jsonl", *SCORE_OPTS], "badline.jsonl")
case("score-split-bogus", base("score", "--split", "bogus"), "bogus")
case("score-split-empty", base("score", "--split", ""), "split")
case("score-hf-dataset", ["score", "hf:nobody/nothing", *SCORE_OPTS])  # offline, or no 'datasets' package


def unreadable_file(env, mp):
    p = env["base"] / "in" / "unreadable.jsonl"
    p.write_text('{"prompt": "hello world"}\n')
    p.chmod(0)

    def teardown():
        p.chmod(0o644)
        p.unlink()
    return teardown


case("score-unreadable-file", ["score", "in/unreadable.jsonl", *SCORE_OPTS], "unreadable.jsonl",
     setup=unreadable_file, skip_root=True)
case("score-split-absent", ["score", "in/onlytrain.jsonl", *SCORE_OPTS], "test")
case("score-limit-0", base("score", "--limit", "0"), "--limit")
case("score-limit--1", base("score", "--limit", "-1"), "--limit")
case("score-gen-tokens--1", base("score", "--gen-tokens", "-1"), "--gen-tokens")
case("score-limit-text", base("score", "--limit", "x"), usage=True)
case("score-seed-text", base("score", "--seed", "x"), usage=True)

# extract --------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-3:1", ["--layers", "3:1"], "--layers"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers--99", ["--layers", "-99"], "-99"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("layers-empty", ["--layers", ""], "--layers"),
        ("positions-0", ["--positions", "0"], "0"),
        ("positions-3", ["--positions", "3"], "3"),
        ("positions--99", ["--positions", "-99"], "-99"),
        ("positions-a", ["--positions", "a"], "--positions"),
        ("kl-max-nan", ["--kl-max", "nan"], "--kl-max"),
        ("kl-max-inf", ["--kl-max", "inf"], "--kl-max"),
        ("kl-max--1", ["--kl-max", "-1"], "--kl-max"),
        ("kl-max-0", ["--kl-max", "0"]),
        ("max-layer-frac-0", ["--max-layer-frac", "0"]),
        ("max-layer-frac-1.5", ["--max-layer-frac", "1.5"]),
        ("max-layer-frac-nan", ["--max-layer-frac", "nan"]),
        ("screen-n-0", ["--screen-n", "0"], "screen-n"),
        ("keep-0", ["--keep", "0"], "keep"),
        ("judge-tokens-0", ["--judge-tokens", "0"], "judge-tokens"),
        ("induce-min-text", ["--induce-min", "abc"], "--induce-min"),
        ("induce-min-nan", ["--induce-min", "nan"], "--induce-min"),
        ("filter-bogus", ["--filter", "bogus"], "bogus"),
        ("select-by-bogus", ["--select-by", "bogus"], "bogus"),
        ("n-train-0", ["--n-train", "0"], "--n-train"),
        ("n-train--1", ["--n-train", "-1"], "--n-train"),
        ("n-val-0", ["--n-val", "0"], "--n-val"),
        ("harmful-missing", ["--harmful", "missing.jsonl"], "missing.jsonl"),
        ("harmful-empty", ["--harmful", "in/empty.jsonl"], "in/empty.jsonl"),
        ("harmless-bad-json", ["--harmless", "in/badline.jsonl"], "in/badline.jsonl", "line 2"),
        ("harmful-no-train-split", ["--harmful", "in/onlytest.jsonl"], "train"),
        ("harmful-no-val-split", ["--harmful", "in/onlytrain.jsonl"], "val"),
        ("harmful-markup-missing", ["--harmful", MARKUP_MISSING], MARKUP_MISSING),
        ("harmless-markup-closing", ["--harmless", MARKUP_CLOSE], MARKUP_CLOSE),
        ("existing-name", ["--name", "taken"], "already exists")):
    case(f"extract-{cid}", base("extract", *extra), *needles,
         setup=taken("extract", EX) if cid == "existing-name" else None)
case("extract-keep-text", base("extract", "--keep", "many"), usage=True)

# ablate ---------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("direction-missing-run", ["--direction", "valid/extract/missing"], "valid/extract/missing"),
        ("direction-missing-name", ["--direction", "nosuchrun"], "nosuchrun"),
        ("direction-score-run", ["--direction", SC0], "score"),
        ("direction-steer-run", ["--direction", ST], "steer"),
        ("direction-run-without-file", ["--direction", "fake/ex-nodirection"], "direction"),
        ("direction-truncated", ["--direction", "dirs/truncated.safetensors"], "truncated.safetensors"),
        ("direction-garbage", ["--direction", "dirs/garbage.safetensors"], "garbage.safetensors"),
        ("direction-empty-file", ["--direction", "dirs/empty.safetensors"], "empty.safetensors"),
        ("direction-meta-list", ["--direction", "dirs/meta-list.safetensors"], "meta-list.safetensors"),
        ("direction-meta-null", ["--direction", "dirs/meta-null.safetensors"], "meta-null.safetensors"),
        ("direction-meta-bad-json", ["--direction", "dirs/meta-bad.safetensors"], "meta-bad.safetensors"),
        ("direction-no-tensor", ["--direction", "dirs/nokey.safetensors"], "nokey.safetensors"),
        ("direction-2d", ["--direction", "dirs/d2d.safetensors"], "d2d.safetensors"),
        ("direction-width-7", ["--direction", "dirs/d7.safetensors"], "d_model 7"),
        ("direction-zero", ["--direction", "dirs/zero.safetensors"], "zero"),
        ("direction-nan", ["--direction", "dirs/nan.safetensors"]),
        ("direction-inf", ["--direction", "dirs/inf.safetensors"]),
        ("direction-other-model", ["--direction", "dirs/other.safetensors"], "ffffffffffff"),
        ("direction-markup-missing", ["--direction", "in/dir[test].safetensors"], "in/dir[test].safetensors"),
        ("save-model-folder", ["--save", MODEL], MODEL),
        ("save-model-folder-replace", ["--save", MODEL, "--replace-save"], MODEL),
        ("save-inside-model", ["--save", f"{MODEL}/sub"], MODEL),
        ("save-around-model", ["--save", "."]),
        ("save-existing-folder", ["--save", "in"], "in"),
        ("save-existing-folder-replace", ["--save", "in", "--replace-save"], "in"),
        ("save-is-a-file", ["--save", "h.jsonl"], "h.jsonl"),
        ("save-below-a-file", ["--save", "afile/out"], "afile"),
        ("save-dtype-int4", ["--save", "out", "--save-dtype", "int4"], "--save-dtype", "int4"),
        ("save-with-wrong-width", ["--save", "out", "--direction", "dirs/d7.safetensors"], "d_model 7"),
        ("baseline-missing", ["--baseline", "valid/score/missing"], "valid/score/missing"),
        ("baseline-extract-run", ["--baseline", EX], "extract"),
        ("baseline-other-settings", ["--baseline", SC0, "--gen-tokens", "3"], "--gen-tokens"),
        ("baseline-empty-scores", ["--baseline", "fake/emptyscores"], "scores.csv"),
        ("baseline-without-scores", ["--baseline", "fake/noscores"], "scores.csv"),
        ("baseline-scores-without-columns", ["--baseline", "fake/scores-nocols"], "fake/scores-nocols"),
        ("baseline-model-not-object", ["--baseline", "fake/modelstr"], "fake/modelstr"),
        ("direction-model-hash-int", ["--direction", "dirs/hash-int.safetensors"], "hash-int.safetensors"),
        ("harmful-markup-malformed", ["--harmful", MARKUP_BAD], MARKUP_BAD),
        ("split-bogus", ["--split", "bogus"], "bogus"),
        ("limit-0", ["--limit", "0"], "--limit"),
        ("limit--1", ["--limit", "-1"], "--limit"),
        ("gen-tokens--1", ["--gen-tokens", "-1"], "--gen-tokens"),
        ("form-unknown", ["--form", "rotate"], "--form", "rotate"),
        ("form-with-heads", ["--form", "projection", "--heads", "1.0"], "--form", "--heads"),
        ("activation-scaled-without-form", ["--activation-scaled"], "--activation-scaled", "--form"),
        ("form-affine-save-without-bias", ["--form", "affine", "--save", "out"], "--save", "no bias"),
        ("form-train-limit-0", ["--form", "projection", "--train-limit", "0"], "--train-limit")):
    case(f"ablate-{cid}", base("ablate", *extra), *needles)
case("ablate-save-read-only-parent", base("ablate", "--save", "ro/out"), setup=read_only_folder("ro"),
     skip_root=True)
case("ablate-missing-direction-option", ["ablate", "--harmful", "h.jsonl", *COMMON], usage=True)

# steer ----------------------------------------------------------------------------------------------------
case("steer-neither-direction-nor-learn", ["steer", "--sets", "h.jsonl", "--layers", "2", "--alpha", "-1:1:1",
                                           "--no-plot", *COMMON], "--direction", "--learn")
case("steer-both-direction-and-learn", base("steer", "--direction", EX), "--direction", "--learn")
for cid, extra, *needles in (
        ("alpha-empty", ["--alpha", ""], "--alpha"),
        ("alpha-text", ["--alpha", "a"], "--alpha"),
        ("alpha-wrong-sign", ["--alpha", "1:0:1"], "--alpha"),
        ("alpha-zero-step", ["--alpha", "0:1:0"], "--alpha"),
        ("alpha-not-dividing", ["--alpha", "0:1:0.3"], "--alpha"),
        ("alpha-two-colons", ["--alpha", "0:1"], "--alpha"),
        ("alpha-nan", ["--alpha", "0,nan"], "--alpha"),
        ("alpha-inf", ["--alpha", "0:inf:1"], "--alpha"),
        ("alpha-duplicates", ["--alpha", "1,1"], "--alpha"),
        ("alpha-too-many", ["--alpha", "0:1000000:1"], "--alpha"),
        ("site-bogus", ["--site", "bogus"], "bogus"),
        ("scale-bogus", ["--scale", "bogus"], "bogus"),
        ("positions-0", ["--positions", "0"], "--positions"),
        ("positions-3", ["--positions", "3"], "--positions"),
        ("positions-first", ["--positions", "first"], "--positions"),
        ("positions--99", ["--positions", "-99"], "-99"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers--99", ["--layers", "-99"], "-99"),
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("layers-empty", ["--layers", ""], "--layers"),
        ("top-k-0", ["--top-k", "0"], "--top-k"),
        ("top-k-100", ["--top-k", "100"], "--top-k"),
        ("holdout-frac-0", ["--holdout-frac", "0"], "--holdout-frac"),
        ("holdout-frac-1", ["--holdout-frac", "1"], "--holdout-frac"),
        ("holdout-frac-1.5", ["--holdout-frac", "1.5"], "--holdout-frac"),
        ("holdout-frac-nan", ["--holdout-frac", "nan"], "--holdout-frac"),
        ("random--1", ["--random", "-1"], "--random"),
        ("orthogonal--1", ["--orthogonal", "-1"], "--orthogonal"),
        ("gen-tokens--1", ["--gen-tokens", "-1"], "--gen-tokens"),
        ("limit-0", ["--limit", "0"], "--limit"),
        ("learn-split-bogus", ["--learn-split", "bogus"], "bogus"),
        ("split-bogus", ["--split", "bogus"], "bogus"),
        ("learn-missing", ["--learn", "missing.jsonl"], "missing.jsonl"),
        ("sets-markup-missing", ["--sets", MARKUP_MISSING], MARKUP_MISSING),
        ("sets-markup-closing", ["--sets", f"h.jsonl,{MARKUP_CLOSE}"], MARKUP_CLOSE)):
    case(f"steer-{cid}", base("steer", *extra), *needles)
for cid, extra, *needles in (
        ("direction-score-run", ["--direction", SC0], "score"),
        ("direction-garbage", ["--direction", "dirs/garbage.safetensors"], "garbage.safetensors"),
        ("direction-width-7", ["--direction", "dirs/d7.safetensors"], "d_model 7"),
        ("direction-zero", ["--direction", "dirs/zero.safetensors"], "zero"),
        ("direction-nan", ["--direction", "dirs/nan.safetensors"]),
        ("direction-meta-list", ["--direction", "dirs/meta-list.safetensors"], "meta-list.safetensors"),
        ("direction-no-sets", ["--sets", ""], "--sets"),
        ("direction-model-hash-int", ["--direction", "dirs/hash-int.safetensors"], "hash-int.safetensors")):
    case(f"steer-d-{cid}", base("steer-d", *extra), *needles)
case("steer-top-k-text", base("steer", "--top-k", "1.5"), usage=True)
case("steer-learn-split-too-small", base("steer", "--learn-split", "test"), "--top-k")
case("steer-d-direction-layer-text", ["steer", "--direction", "dirs/layer-text.safetensors", "--sets", "h.jsonl",
                                      "--alpha", "-1:1:1", "--no-plot", *COMMON], "layer-text.safetensors")

# dose-response ------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("alpha-two-doses", ["--alpha", "0,1"], "--alpha"),
        ("alpha-text", ["--alpha", "a:b:c"], "--alpha"),
        ("alpha-wrong-sign", ["--alpha", "2:0:1"], "--alpha"),
        ("site-bogus", ["--site", "bogus"], "bogus"),
        ("scale-bogus", ["--scale", "bogus"], "bogus"),
        ("gen-tokens-0", ["--gen-tokens", "0"], "--gen-tokens"),
        ("gen-tokens--1", ["--gen-tokens", "-1"], "--gen-tokens"),
        ("bootstrap-10", ["--bootstrap", "10"], "--bootstrap"),
        ("limit-1", ["--limit", "1"], "--limit"),
        ("limit-0", ["--limit", "0"], "--limit"),
        ("layer-99", ["--layer", "99"], "99"),
        ("layer--99", ["--layer", "-99"], "-99"),
        ("positions-0", ["--positions", "0"], "--positions"),
        ("positions--99", ["--positions", "-99"], "-99"),
        ("direction-missing", ["--direction", "valid/extract/missing"], "valid/extract/missing"),
        ("direction-score-run", ["--direction", SC0], "score"),
        ("direction-garbage", ["--direction", "dirs/garbage.safetensors"], "garbage.safetensors"),
        ("direction-without-layer", ["--direction", "dirs/nolayer.safetensors"], "--layer"),
        ("direction-layer-text", ["--direction", "dirs/layer-text.safetensors"], "layer-text.safetensors"),
        ("direction-layer-99", ["--direction", "dirs/layer-99.safetensors"], "99"),
        ("direction-model-hash-int", ["--direction", "dirs/hash-int.safetensors"], "hash-int.safetensors"),
        ("benign-empty", ["--benign", "in/empty.jsonl"], "in/empty.jsonl"),
        ("harmful-markup-missing", ["--harmful", MARKUP_MISSING], MARKUP_MISSING),
        ("split-bogus", ["--split", "bogus"], "bogus")):
    case(f"dose-response-{cid}", base("dose-response", *extra), *needles)
case("dose-response-missing-direction-option", ["dose-response", *COMMON], usage=True)

# patch ----------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("sites-bogus", ["--sites", "resid_pre,bogus"], "bogus"),
        ("sites-empty", ["--sites", ""], "--sites"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers--99", ["--layers", "-99"], "-99"),
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-3:1", ["--layers", "3:1"], "--layers"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("layers-empty", ["--layers", ""], "--layers"),
        ("direction-sideways", ["--direction", "sideways"], "--direction"),
        ("positions-0", ["--positions", "0"], "--positions"),
        ("positions-3", ["--positions", "3"], "--positions"),
        ("positions--99", ["--positions", "-99"], "-99"),
        ("positions-all", ["--positions", "all"], "--positions"),
        ("head-positions-first", ["--head-positions", "first"], "--head-positions"),
        ("head-positions-0", ["--head-positions", "0"], "--head-positions"),
        ("head-positions--99", ["--head-positions", "-99"], "-99"),
        ("pairs-0", ["--pairs", "0"], "--pairs"),
        ("max-len-diff--1", ["--max-len-diff", "-1"], "--max-len-diff"),
        ("last-k--1", ["--last-k", "-1"], "--last-k"),
        ("last-k-0", ["--last-k", "0"], "--last-k"),
        ("top--1", ["--top", "-1"], "--top"),
        ("bootstrap--1", ["--bootstrap", "-1"], "--bootstrap"),
        ("harmless-unpairable", ["--harmless", "pu.jsonl"]),
        ("harmful-empty", ["--harmful", "in/empty.jsonl"], "in/empty.jsonl"),
        ("harmful-markup-missing", ["--harmful", MARKUP_MISSING], MARKUP_MISSING),
        ("harmless-markup-malformed", ["--harmless", MARKUP_BAD], MARKUP_BAD),
        ("column-missing", ["--column", "question"], "question"),
        ("split-bogus", ["--split", "bogus"], "bogus")):
    case(f"patch-{cid}", base("patch", *extra), *needles)
case("patch-pairs-text", base("patch", "--pairs", "ten"), usage=True)

# cones ----------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("min-per-category-1", ["--min-per-category", "1"], "--min-per-category"),
        ("boot--1", ["--boot", "-1"], "--boot"),
        ("boot-5", ["--boot", "5"], "--boot"),
        ("null--1", ["--null", "-1"], "--null"),
        ("site-bogus", ["--site", "bogus"], "bogus"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("layers-empty", ["--layers", ""], "--layers"),
        ("position-0", ["--position", "0"], "--position"),
        ("position-5", ["--position", "5"], "--position"),
        ("position--99", ["--position", "-99"], "-99"),
        ("k-max-1", ["--k-max", "1"], "--k-max"),
        ("k-max-0", ["--k-max", "0"], "--k-max"),
        ("report-layer-99", ["--report-layer", "99"], "99"),
        ("max-per-category-0", ["--max-per-category", "0"], "--max-per-category"),
        ("max-per-category--1", ["--max-per-category", "-1"], "--max-per-category"),
        ("eval-harmless--1", ["--ablate-test", "--eval-harmless", "-1"], "--eval-harmless"),
        ("eval-split-bogus", ["--ablate-test", "--eval-split", "bogus"], "bogus"),
        ("one-category", ["--harmful", "in/onecat.jsonl"], "onecat", "c0: 18"),  # counts as numbers, not np.int64(18)
        ("harmful-markup-missing", ["--harmful", MARKUP_MISSING], MARKUP_MISSING),
        ("harmless-markup-closing", ["--harmless", MARKUP_CLOSE], MARKUP_CLOSE),
        ("split-bogus", ["--split", "bogus"], "bogus")):
    case(f"cones-{cid}", base("cones", *extra), *needles)
case("cones-position-text", base("cones", "--position", "last"), usage=True)

# geometry -------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("site-bogus", ["--site", "bogus"], "bogus"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers--99", ["--layers", "-99"], "-99"),
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-3:1", ["--layers", "3:1"], "--layers"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("layers-empty", ["--layers", ""], "--layers"),
        ("position-0", ["--position", "0"], "--position"),
        ("position-3", ["--position", "3"], "--position"),
        ("position--99", ["--position", "-99"], "-99"),
        ("limit-1", ["--limit", "1"]),
        ("limit-0", ["--limit", "0"], "--limit"),
        ("limit--1", ["--limit", "-1"], "--limit"),
        ("split-bogus", ["--split", "bogus"], "bogus"),
        ("harmful-missing", ["--harmful", "missing.jsonl"], "missing.jsonl"),
        ("harmless-markup-missing", ["--harmless", MARKUP_MISSING], MARKUP_MISSING),
        ("harmful-markup-malformed", ["--harmful", MARKUP_BAD], MARKUP_BAD)):
    case(f"geometry-{cid}", base("geometry", *extra), *needles)

# plot-residuals -----------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("one-set", ["--sets", "cb.jsonl"], "--sets"),
        ("labels-count", ["--labels", "a,b,c"], "--labels"),
        ("labels-duplicate", ["--labels", "x,x"], "labels"),
        ("colors-count", ["--colors", "red"], "--colors"),
        ("colors-bogus", ["--colors", "red,notacolour"], "notacolour"),
        ("method-bogus", ["--method", "tsne"], "tsne"),
        ("site-bogus", ["--site", "bogus"], "bogus"),
        ("position-0", ["--position", "0"], "--position"),
        ("position--99", ["--position", "-99"], "-99"),
        ("limit-0", ["--limit", "0"], "--limit"),
        ("neighbors-0", ["--neighbors", "0"], "--neighbors"),
        ("fps-nan", ["--gif", "--fps", "nan"], "--fps"),
        ("fps-inf", ["--gif", "--fps", "inf"], "--fps"),
        ("fps-0", ["--gif", "--fps", "0"], "--fps"),
        ("fps--1", ["--gif", "--fps", "-1"], "--fps"),
        ("layers-99", ["--layers", "99"], "99"),
        ("layers-5:5", ["--layers", "5:5"], "--layers"),
        ("layers-a", ["--layers", "a"], "--layers"),
        ("pacmap-too-few-points", ["--method", "pacmap", "--limit", "2"], "pacmap"),
        ("pca-too-few-points", ["--limit", "1"], "pca"),
        ("same-set-twice", ["--sets", "cb.jsonl,cb.jsonl"], "--labels"),
        ("split-bogus", ["--split", "bogus"], "bogus"),
        ("sets-markup-missing", ["--sets", f"cb.jsonl,{MARKUP_MISSING}"], MARKUP_MISSING),
        ("sets-markup-closing", ["--sets", f"{MARKUP_CLOSE},ch.jsonl"], MARKUP_CLOSE)):
    case(f"plot-residuals-{cid}", base("plot-residuals", *extra), *needles)
case("plot-residuals-fps-text", base("plot-residuals", "--fps", "fast"), usage=True)

# imprint --------------------------------------------------------------------------------------------------
for cid, args, *needles in (
        ("missing-run", ["imprint", "valid/geometry/missing"], "valid/geometry/missing"),
        ("score-run", ["imprint", SC0], "score"),
        ("steer-run", ["imprint", GE, ST], "steer"),
        ("same-run-twice", ["imprint", GE, GE]),
        ("position-not-in-extract", ["imprint", EX, "--position", "-7"], "-7"),
        ("position-not-in-geometry", ["imprint", GE, "--position", "-2"], "-2"),
        ("one-live-layer", ["imprint", GE01], "ge01"),
        ("run-without-directions", ["imprint", "fake/geo-nodirs"], "directions.safetensors"),
        ("garbage-directions", ["imprint", "fake/geo-garbage"], "directions.safetensors"),
        ("directions-without-layers", ["imprint", "fake/geo-nolayers"], "directions.safetensors"),
        ("extract-without-candidates", ["imprint", "fake/ex-nocands"], "candidates.safetensors"),
        ("malformed-run-json", ["imprint", "fake/badjson"], "run.json"),
        ("run-json-a-list", ["imprint", "fake/listjson"], "run.json"),
        ("run-json-model-not-object", ["imprint", "fake/modelstr-geo"], "fake/modelstr-geo"),
        ("directions-meta-not-object", ["imprint", "fake/geo-metalist"], "directions.safetensors"),
        ("directions-layers-mismatch", ["imprint", "fake/geo-mismatch"], "directions.safetensors"),
        ("garbage-candidates", ["imprint", "fake/ex-garbagecands"], "candidates.safetensors"),
        ("templates-sd-nan", ["imprint", GE, "--classify", "--templates", "tpl/sdnan.json"], "sdnan.json"),
        ("templates-empty", ["imprint", GE, "--classify", "--templates", "tpl/empty.json"], "empty.json"),
        ("templates-short-pair", ["imprint", GE, "--classify", "--templates", "tpl/short.json"], "short.json"),
        ("templates-missing", ["imprint", GE, "--classify", "--templates", "tpl/missing.json"], "missing.json"),
        ("templates-bad-json", ["imprint", GE, "--classify", "--templates", "tpl/bad.json"], "bad.json"),
        ("templates-list", ["imprint", GE, "--classify", "--templates", "tpl/list.json"], "list.json"),
        ("templates-sd-0", ["imprint", GE, "--classify", "--templates", "tpl/sd0.json"], "'gini'"),
        ("templates-unknown-figure", ["imprint", GE, "--classify", "--templates", "tpl/unknown.json"], "nope"),
        ("markup-missing-run", ["imprint", "in/run[test]"], "in/run[test]"),
        ("name-slash", ["imprint", GE, EX, "--name", "a/b"], "a/b")):
    case(f"imprint-{cid}", [*args, "--no-plot"] if "--no-plot" not in args else args, *needles)
case("imprint-no-runs", ["imprint"], "at least one run")
case("imprint-spread-not-a-pair", ["imprint", "--spread", GE, "--no-plot"], "RUN_A:RUN_B")
case("imprint-spread-three-parts", ["imprint", "--spread", f"{GE}:{GE01}:{EX}", "--no-plot"], "RUN_A:RUN_B")
case("imprint-spread-layers-differ", ["imprint", "--spread", f"{GE}:{EX}", "--no-plot"], "--spread", "differ in")

# depth ----------------------------------------------------------------------------------------------------
for cid, args, *needles in (
        ("missing-run", ["depth", "valid/extract/missing"], "valid/extract/missing"),
        ("score-run", ["depth", SC0], "'score'"),
        ("geometry-run", ["depth", GE], "'geometry'"),
        ("same-extract-twice", ["depth", EX, EX], "two extract runs"),
        ("sites-empty", ["depth", EX, "--sites", ","], "--sites"),
        ("direction-bogus", ["depth", EX, "--direction", "sideways"], "sideways"),
        ("malformed-run-json", ["depth", "fake/badjson"], "run.json"),
        ("run-without-n-layers", ["depth", "fake/ex-nolayercount"], "n_layers"),
        ("patch-without-sites", ["depth", "fake/patch-residonly"], "attn_out", "resid_pre"),
        ("patch-without-summary", ["depth", "fake/patch-nosummary"], "summary"),
        ("name-slash", ["depth", EX, "--name", "a/b"], "a/b")):
    case(f"depth-{cid}", args, *needles)
case("depth-no-runs", ["depth"], usage=True)

# compare --------------------------------------------------------------------------------------------------
for cid, args, *needles in (
        ("missing-run", ["compare", SC0, "valid/score/missing"], "valid/score/missing"),
        ("folder-without-run-json", ["compare", "in"], "in"),
        ("run-without-summary", ["compare", "fake/nosummary"], "summary.csv"),
        ("empty-summary", ["compare", "fake/emptysummary"], "summary.csv"),
        ("binary-summary", ["compare", "fake/binsummary"], "summary.csv"),
        ("steer-run", ["compare", SC0, ST]),
        ("malformed-run-json", ["compare", "fake/badjson"], "run.json"),
        ("run-json-a-list", ["compare", "fake/listjson"], "run.json"),
        ("run-json-without-command", ["compare", "fake/nocommand"], "fake/nocommand"),
        ("run-json-not-utf8", ["compare", "fake/binjson"], "run.json"),
        ("run-json-model-not-object", ["compare", "fake/modelstr"], "fake/modelstr"),
        ("run-json-schema-text", ["compare", "fake/schemastr"], "schema"),
        ("summary-without-columns", ["compare", "fake/summary-nocols"], "summary.csv"),
        ("summary-n-text", ["compare", "fake/summary-textn"], "summary.csv"),
        ("newer-schema", ["compare", "fake/newschema"], "schema"),
        ("markup-missing-run", ["compare", "in/run[test]"], "in/run[test]"),
        ("markup-closing-run", ["compare", "in/old[/v1]"], "in/old[/v1]"),
        ("name-slash", ["compare", SC0, "--name", "a/b"], "a/b"),
        ("name-hidden", ["compare", SC0, "--name", ".hidden"], ".hidden"),
        ("name-300", ["compare", SC0, "--name", NAME300])):
    case(f"compare-{cid}", args, *needles)
case("compare-no-runs", ["compare"], usage=True)

# judge ----------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("missing-run", ["valid/score/missing"], "valid/score/missing"),
        ("geometry-run", [GE], "'geometry'"),
        ("extract-run", [EX], "'extract'"),
        ("malformed-run-json", ["fake/badjson"], "run.json"),
        ("unknown-judge", [SC0, "--judge", "gpt"], "--judge"),
        ("markers-with-model", [SC0, "--judge-model", "x"], "--judge-model"),
        ("nli-without-model", [SC0, "--judge", "nli"], "--judge-model"),
        ("llm-missing-model", [SC0, "--judge", "llm", "--judge-model", "nomodel/"], "nomodel"),
        ("batch-zero", [SC0, "--judge-batch-size", "0"], "--judge-batch-size"),
        ("name-slash", [SC0, "--name", "a/b"], "a/b")):
    case(f"judge-{cid}", ["judge", *extra], *needles)
case("judge-no-run", ["judge"], usage=True)

# judge-eval -----------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("missing-file", ["--labels", "nolabels.csv"], "nolabels.csv"),
        ("empty-file", ["--labels", "in/empty.csv"], "in/empty.csv"),
        ("bad-label", ["--labels", "in/badlabel.csv"], "line 3", "maybe"),
        ("missing-column", ["--labels", "in/nolabelcol.csv"], "'label'"),
        ("empty-request", ["--labels", "in/emptyrequest.csv"], "line 2"),
        ("bad-map", ["--labels", "labels.csv", "--map", "nokey"], "--map", "nokey"),
        ("map-unknown-verdict", ["--labels", "labels.csv", "--map", "1=yes"], "--map"),
        ("unknown-judge", ["--labels", "labels.csv", "--judge", "gpt"], "--judge"),
        ("markers-with-model", ["--labels", "labels.csv", "--judge-model", "x"], "--judge-model"),
        ("limit-zero", ["--labels", "labels.csv", "--limit", "0"], "--limit"),
        ("other-as-other", ["--labels", "labels.csv", "--other-as", "other"], "--other-as")):
    case(f"judge-eval-{cid}", ["judge-eval", *extra], *needles)
case("judge-eval-no-labels", ["judge-eval"], usage=True)

# optimize -------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("objective-unknown", ["--objectives", "speed"], "--objectives", "speed"),
        ("objective-twice", ["--objectives", "kl,kl"], "--objectives"),
        ("form-unknown", ["--forms", "rotate"], "--forms", "rotate"),
        ("scope-unknown", ["--scopes", "layerwise"], "--scopes", "layerwise"),
        ("trials-zero", ["--trials", "0"], "--trials"),
        ("kl-max-negative", ["--kl-max", "-1"], "--kl-max"),
        ("kl-max-nan", ["--kl-max", "nan"], "--kl-max"),
        ("position-zero", ["--position", "0"], "--position"),
        ("orthogonalize-bogus", ["--orthogonalize", "maybe"], "--orthogonalize"),
        ("warm-start-missing", ["--warm-start", "noprofile.json"], "--warm-start", "noprofile.json"),
        ("heretic-missing", ["--heretic", "noheretic.csv"], "noheretic.csv"),
        ("worker-without-study", ["--worker", "--name", "nostudy"], "nostudy"),
        ("resume-without-study", ["--resume", "--name", "nostudy"], "nostudy"),
        ("resume-without-name", ["--resume"], "--name"),
        ("save-without-export", ["--save", "out"], "--export"),
        ("export-missing-run", ["--export", "0", "--name", "nothere", "--save", "out"], "nothere"),
        ("export-not-a-number", ["--export", "best", "--name", "nothere", "--save", "out"], "nothere"),
        ("storage-bogus", ["--storage", "bogus://x"], "--storage")):
    case(f"optimize-{cid}", base("optimize", *extra), *needles)

# models ---------------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("unknown-alias", ["gpt-9"], "gpt-9", "aliases"),
        ("hub-id", ["Qwen/Qwen2.5-0.5B-Instruct"], "Qwen/Qwen2.5-0.5B-Instruct"),
        ("path", ["in/model.gguf"], "in/model.gguf"),
        ("one-bad-of-two", ["smollm2-135m", "smollm"], "'smollm'"),
        ("empty-alias", [""], "''"),
        ("config-missing", ["--config", "nomodels.toml"], "nomodels.toml")):
    case(f"models-{cid}", ["models", *extra], *needles)
for cid, extra in (("unknown-option", ["--bogus"]), ("json-value", ["--json-out=maybe"]),
                   ("model-option", ["--model", "default"])):
    case(f"models-{cid}", ["models", *extra], usage=True)

# stats seeds ----------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("one-run", [SC0]),
        ("missing-run", [SC0, "valid/score/missing"], "valid/score/missing"),
        ("different-commands", [SC0, EX], "'score'", "'extract'"),
        ("same-seed", [SC0, SC0], "same seed 0"),
        ("file-path", [SC0, SC1, "--file", "../summary.csv"], "--file"),
        ("file-missing", [SC0, SC1, "--file", "nope.csv"], "nope.csv"),
        ("file-run-json", [SC0, SC1, "--file", "run.json"], "run.json"),
        ("keys-missing", [SC0, SC1, "--keys", "nocol"], "nocol"),
        ("empty-summary", ["fake/emptysummary", SC1], "summary.csv"),
        ("malformed-run-json", [SC0, "fake/badjson"], "run.json"),
        ("run-json-a-list", [SC0, "fake/listjson"], "run.json"),
        ("run-json-params-a-list", ["fake/paramslist", SC1], "fake/paramslist"),
        ("run-json-schema-text", [SC0, "fake/schemastr"], "schema"),
        ("run-json-not-utf8", [SC0, "fake/binjson"], "run.json"),
        ("markup-missing-run", [SC0, "in/run[test]"], "in/run[test]"),
        ("name-hidden", [SC0, SC1, "--name", ".hidden"], ".hidden"),
        ("vary-unknown-param", [SC0, SC1, "--vary", "nosuchparam"], "--vary:", "nosuchparam")):
    case(f"stats-seeds-{cid}", ["stats", "seeds", *extra], *needles)
case("stats-seeds-no-runs", ["stats", "seeds"], usage=True)

# stats ttest ----------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("missing-run", ["valid/score/missing"], "valid/score/missing"),
        ("no-per-prompt-table", [EX], "results.csv"),
        ("metric-missing", [SC0, SC1, "--metric", "nocol"], "nocol"),
        ("metric-text", [SC0, SC1, "--metric", "category"], "category"),
        ("where-without-equals", [SC0, "--where-a", "set"], "--where-a"),
        ("where-unknown-column", [SC0, "--where-a", "nocol=1"], "nocol"),
        ("where-no-rows", [SC0, SC1, "--where-a", "set=zzz"], "zzz"),
        ("set-missing", [SC0, SC1, "--set", "bogus"], "bogus"),
        ("by-missing", [SC0, SC1, "--by", "nocol"], "nocol"),
        ("correction-bogus", [SC0, SC1, "--correction", "bonferroni"], "bonferroni"),
        ("welch-boolean", [SC0, SC1, "--metric", "refusal", "--welch"], "--welch"),
        ("empty-scores", ["fake/emptyscores", SC1], "scores.csv"),
        ("run-json-not-utf8", ["fake/binjson", SC1], "run.json"),
        ("markup-missing-run", ["in/run[test]"], "in/run[test]"),
        ("name-dotdot", [SC0, SC1, "--name", ".."], "..")):
    case(f"stats-ttest-{cid}", ["stats", "ttest", *extra], *needles)
case("stats-ttest-no-runs", ["stats", "ttest"], usage=True)

# stats control --------------------------------------------------------------------------------------------
for cid, extra, *needles in (
        ("score-run", [SC0], "'score'", "'steer'"),
        ("missing-run", ["missing-steer"], "missing-steer"),
        ("metric-bogus", [ST, "--metric", "bogus"], "--metric"),
        ("kind-bogus", [ST, "--kind", "bogus"], "--kind"),
        ("kind-absent", [ST, "--kind", "orthogonal"], "orthogonal"),
        ("correction-bogus", [ST, "--correction", "sidak"], "sidak"),
        ("metric-refusal-without-generation", [ST, "--metric", "refusal"], "refusal"),
        ("run-without-results", ["fake/steer-noresults"], "results.csv"),
        ("empty-results", ["fake/steer-emptyresults"], "results.csv"),
        ("results-without-columns", ["fake/steer-nocols"], "results.csv"),
        ("results-only-alpha-0", ["fake/steer-alpha0"], "alpha"),
        ("markup-missing-run", ["in/run[test]"], "in/run[test]"),
        ("name-300", [ST, "--name", NAME300])):
    case(f"stats-control-{cid}", ["stats", "control", *extra], *needles)
case("stats-control-no-run", ["stats", "control"], usage=True)

# export ---------------------------------------------------------------------------------------------------
def existing_file(rel: str):
    """A file at ``rel`` that must stay untouched."""
    def setup(env, mp):
        p = env["base"] / rel
        p.write_bytes(b"keep me")
        return lambda: p.unlink()
    return setup


for cid, extra, *needles in (
        ("format-bogus", ["--format", "onnx"], "--format", "onnx"),
        ("layers-out-of-range", ["--layers", "9"], "--layers", "9"),
        ("layers-text", ["--layers", "abc"], "--layers"),
        ("scale-zero", ["--scale", "0"], "--scale"),
        ("scale-nan", ["--scale", "nan"], "--scale"),
        ("n-layers-zero", ["--n-layers", "0"], "--n-layers"),
        ("model-hint-empty", ["--model-hint", " "], "--model-hint"),
        ("out-folder-missing", ["--out", "nodir/x.safetensors"], "--out", "nodir"),
        ("out-is-a-folder", ["--out", "dirs"], "--out", "dirs"),
        ("markup-missing-out-folder", ["--out", "in/x[test]/v.gguf"], "in/x[test]")):
    case(f"export-{cid}", base("export", *extra), *needles)
for cid, args, *needles in (
        ("missing-direction", ["dirs/missing.safetensors"], "dirs/missing.safetensors"),
        ("garbage-direction", ["dirs/garbage.safetensors"], "dirs/garbage.safetensors"),
        ("truncated-direction", ["dirs/truncated.safetensors"], "dirs/truncated.safetensors"),
        ("nan-direction", ["dirs/nan.safetensors"], "dirs/nan.safetensors"),
        ("no-layer", ["dirs/nolayer.safetensors"], "--layers", "records no layer"),
        ("site-mlp-out", ["dirs/mlp-out.safetensors"], "mlp_out"),
        ("resid-pre-0", ["dirs/pre0.safetensors"], "--layers", "resid_pre of layer 0"),
        ("resid-pre-1-llama-cpp", ["dirs/pre1.safetensors"], "--layers", "resid_pre of layer 1"),
        ("resid-post-0-llama-cpp", ["dirs/post0.safetensors"], "--layers", "resid_post of layer 0"),
        ("no-model-hint", ["dirs/nolayer.safetensors", "--layers", "2"], "--model-hint"),
        ("per-layer-of-a-file", ["dirs/other.safetensors", "--per-layer"], "--per-layer"),
        ("score-run", [SC0], "'score'"),
        ("geometry-run-without-directions", ["fake/geo-nodirs"], "directions.safetensors"),
        ("geometry-layer-absent", [GE01, "--layers", "3"], "--layers", "layer 3"),
        ("markup-missing-run", ["in/run[test]"], "in/run[test]")):
    case(f"export-{cid}", ["export", *args, "--out", "x.gguf"], *needles)
case("export-existing-out", ["export", EX, "-f", "safetensors", "--out", "taken.gguf"], "--out", "taken.gguf",
     "already exists", "--force", setup=existing_file("taken.gguf"))
case("export-read-only-folder", base("export", "--out", "ro/x.safetensors"), "ro/x.safetensors",
     setup=read_only_folder("ro"), skip_root=True)
case("export-no-out", ["export", EX], usage=True)
case("export-no-direction", ["export", "--out", "x.gguf"], usage=True)

USAGE_CASES = [c for c in CASES if c.usage]
ERROR_CASES = [c for c in CASES if not c.usage]


# ------------------------------------------------------------------------------------------------ checks
def snapshot(root: Path) -> dict:
    """Every path under ``root`` (hidden ones included) -> (kind, size, mtime_ns) for files and links, (kind,
    permission bits) for folders."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            st = p.lstat()
            snap[str(p.relative_to(root))] = ("link" if stat.S_ISLNK(st.st_mode) else "dir",
                                              stat.S_IMODE(st.st_mode))
        for f in filenames:
            p = Path(dirpath, f)
            st = p.lstat()
            snap[str(p.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns)
    return snap


def snapshot_diff(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    parts = []
    for label, keys in (("added", added), ("removed", removed), ("changed", changed)):
        if keys:
            parts.append(f"{label}: {keys[:8]}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""))
    return "; ".join(parts)


def describe(result) -> str:
    """Exit code, exception, the end of its traceback and of the output, for a failure message."""
    out = output_of(result)
    text = f"exit code {result.exit_code}; exception {result.exception!r}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        tb = "".join(traceback.format_exception(*result.exc_info)).rstrip().splitlines()
        text += "\n  traceback (last lines):\n    " + "\n    ".join(tb[-6:])
    tail = out.rstrip().splitlines()[-8:]
    text += "\n  output (last lines):\n    " + "\n    ".join(tail)
    return text


def check_promise(result, before: dict, after: dict, needles=(), cmdline: str = "") -> str:
    """The README's promise for bad input: exit 2, no traceback, one ``error:`` line (holding each needle), nothing
    new or changed on disk. Returns the error line."""
    out = output_of(result)
    what = f"`refusal {cmdline}`: {describe(result)}"
    assert result.exit_code == 2, what
    assert isinstance(result.exception, SystemExit), what
    assert "Traceback" not in out, what
    errs = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errs) == 1, f"{len(errs)} 'error:' lines; {what}"
    for n in needles:
        assert n in errs[0], f"needle {n!r} not in {errs[0]!r}; {what}"
    diff = snapshot_diff(before, after)
    assert not diff, f"disk changed: {diff}; {what}"
    return errs[0]


# ------------------------------------------------------------------------------------------------ setup
def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _copy_run(src: Path, dst: Path, drop=(), replace: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    for name, content in (replace or {}).items():
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def _make_valid_runs(base: Path) -> dict:
    """The finished runs other cases read (REFUSAL_RUNS=valid while they are made)."""
    made = {}
    for key, args in (
            ("sc0", ["score", "h.jsonl", "b.jsonl", *SCORE_OPTS, "--name", "sc0"]),
            ("sc1", ["score", "h.jsonl", "b.jsonl", *SCORE_OPTS, "--seed", "1", "--name", "sc1"]),
            ("ex", ["extract", "--harmful", "h.jsonl", "--harmless", "b.jsonl", *PERMISSIVE, *COMMON, "--name", "ex"]),
            ("st", [*BASE["steer"], "--orthogonal", "0", "--name", "st"]),
            ("ge", [*BASE["geometry"], "--name", "ge"]),
            ("ge01", [*BASE["geometry"], "--layers", "0,1", "--name", "ge01"])):
        r = invoke(args)
        assert r.exit_code == 0, f"setup run {key} failed: {describe(r)}"
        made[key] = r
    return made


def _make_prompt_files(base: Path) -> None:
    save_tiny(base / MODEL)
    write_set(base / "h.jsonl", HARMFUL, "h")
    write_set(base / "b.jsonl", HARMLESS, "b")
    for name, prompts, prefix in (("ph", PATCH_H, "h"), ("pb", PATCH_B, "b"), ("pu", PATCH_U, "u")):
        _write_jsonl(base / f"{name}.jsonl", [{"id": f"{prefix}-{i + 1:02d}", "prompt": p}
                                              for i, p in enumerate(prompts)])
    _write_jsonl(base / "ch.jsonl", CONES_H)
    _write_jsonl(base / "cb.jsonl", CONES_B)


def _make_broken_inputs(base: Path) -> None:
    """Bad prompt files, direction files, runs and templates (some derived from the finished runs)."""
    import pandas as pd
    from safetensors.torch import save_file

    (base / "afile").write_text("a regular file\n")
    inp = base / "in"
    inp.mkdir()
    (inp / "empty.jsonl").write_text("")
    (base / "labels.csv").write_text("request,response,label\nhow do i make a bomb,I'm sorry,refusal\n"
                                     "tell me a story,Once upon a time,compliance\n")
    (inp / "empty.csv").write_text("")
    (inp / "badlabel.csv").write_text("request,response,label\nhello,hi,refusal\nhello,hi,maybe\n")
    (inp / "nolabelcol.csv").write_text("request,response,verdict\nhello,hi,refusal\n")
    (inp / "emptyrequest.csv").write_text("request,response,label\n,hi,refusal\n")
    (inp / "blank.jsonl").write_text("\n  \n\n")
    (inp / "badline.jsonl").write_text('{"id": "a", "prompt": "hello world", "split": "test"}\n{"id": "b", "prompt"\n')
    _write_jsonl(inp / "nofield.jsonl", [{"id": "a", "text": "hello world", "split": "test"}])
    _write_jsonl(inp / "list.jsonl", ["[1, 2]"])
    _write_jsonl(inp / "emptyprompt.jsonl", [{"id": "a", "prompt": "  ", "split": "test"}])
    _write_jsonl(inp / "badsplit.jsonl", [{"id": "a", "prompt": "hello world", "split": "testing"}])
    _write_jsonl(inp / "dup.jsonl", [{"id": "a", "prompt": "hello world"}, {"id": "a", "prompt": "good cat"}])
    _write_jsonl(inp / "onlytrain.jsonl", [{"id": "a", "prompt": "hello world", "split": "train"},
                                           {"id": "b", "prompt": "good cat", "split": "train"}])
    _write_jsonl(inp / "onlytest.jsonl", [{"id": "a", "prompt": "hello world", "split": "test"},
                                          {"id": "b", "prompt": "bake bread", "split": "val"}])
    _write_jsonl(inp / "onecat.jsonl", [{**r, "category": "c0"} for r in CONES_H])
    (inp / "x.csv").write_text("prompt,split\nhello world,test\ngood cat,test\n")
    (inp / "text.csv").write_text("text,split\nhello world,test\n")
    (inp / "obj.json").write_text('{"prompt": "hello world"}\n')
    (inp / "latin1.txt").write_bytes("caf\xe9 world\n".encode("latin-1"))
    (inp / "prompts.xml").write_text("<prompts><p>hello world</p></prompts>\n")
    (inp / "bad.gguf").write_bytes(b"not a gguf file at all" * 4)
    (inp / "bad[red].jsonl").write_text('{"id": "a", "prompt": "hello world", "split": "test"}\n{oops\n')

    # direction files
    d = base / "dirs"
    d.mkdir()
    good = (base / EX / "direction.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (d / "garbage.safetensors").write_bytes(b"\x00\xffgarbage" * 16)
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"direction": torch.ones(32)}, str(d / "meta-list.safetensors"), metadata={"meta": "[1, 2]"})
    save_file({"direction": torch.ones(32)}, str(d / "meta-null.safetensors"), metadata={"meta": "null"})
    save_file({"direction": torch.ones(32)}, str(d / "meta-bad.safetensors"), metadata={"meta": "{oops"})
    save_file({"x": torch.ones(32)}, str(d / "nokey.safetensors"))
    save_file({"direction": torch.ones(2, 32)}, str(d / "d2d.safetensors"))
    save_direction(d / "inf.safetensors", torch.full((32,), float("inf")), {"d_model": 32, "layer": 2})
    save_direction(d / "layer-text.safetensors", torch.ones(32), {"d_model": 32, "layer": "abc"})
    save_direction(d / "layer-99.safetensors", torch.ones(32), {"d_model": 32, "layer": 99})
    save_direction(d / "hash-int.safetensors", torch.ones(32), {"d_model": 32, "layer": 2, "model_hash": 123})
    save_direction(d / "d7.safetensors", torch.ones(7), {"d_model": 7})
    save_direction(d / "zero.safetensors", torch.zeros(32), {"d_model": 32, "layer": 2})
    save_direction(d / "nan.safetensors", torch.full((32,), float("nan")), {"d_model": 32, "layer": 2})
    save_direction(d / "other.safetensors", torch.ones(32), {"d_model": 32, "layer": 2, "model_hash": "f" * 64,
                                                             "model_id": "other"})
    save_direction(d / "nolayer.safetensors", torch.ones(32), {"d_model": 32})
    for name, layer, site in (("mlp-out", 2, "mlp_out"), ("pre0", 0, "resid_pre"), ("pre1", 1, "resid_pre"),
                              ("post0", 0, "resid_post")):
        save_direction(d / f"{name}.safetensors", torch.ones(32), {"d_model": 32, "layer": layer, "site": site,
                                                                   "model_id": "x"})

    # hand-broken runs
    f = base / "fake"
    f.mkdir()
    sc0, st, ge, ex = base / SC0, base / ST, base / GE, base / EX
    _copy_run(sc0, f / "nosummary", drop=["summary.csv"])
    _copy_run(sc0, f / "emptysummary", replace={"summary.csv": ""})
    _copy_run(sc0, f / "binsummary", replace={"summary.csv": bytes(range(256)) * 4})
    _copy_run(sc0, f / "emptyscores", replace={"scores.csv": ""})
    _copy_run(sc0, f / "badjson", replace={"run.json": "{"})
    _copy_run(sc0, f / "listjson", replace={"run.json": "[1, 2]"})
    _copy_run(sc0, f / "nocommand", replace={"run.json": '{"schema_version": 1}'})
    meta = json.loads((sc0 / "run.json").read_text())
    _copy_run(sc0, f / "newschema", replace={"run.json": json.dumps({**meta, "schema_version": 99})})
    _copy_run(st, f / "steer-noresults", drop=["results.csv"])
    _copy_run(st, f / "steer-emptyresults", replace={"results.csv": ""})
    _copy_run(st, f / "steer-nocols", replace={"results.csv": "a,b\n1,2\n"})
    _copy_run(ge, f / "geo-nodirs", drop=["directions.safetensors"])
    _copy_run(ge, f / "geo-garbage", replace={"directions.safetensors": b"\x00\xffgarbage" * 16})
    _copy_run(ge, f / "geo-nolayers")
    save_file({"directions": torch.ones(4, 32)}, str(f / "geo-nolayers" / "directions.safetensors"),
              metadata={"meta": json.dumps({"position": -1, "site": "resid_pre"})})
    _copy_run(ex, f / "ex-nocands", drop=["candidates.safetensors"])
    _copy_run(ex, f / "ex-garbagecands", replace={"candidates.safetensors": b"\x00\xffgarbage" * 16})
    _copy_run(sc0, f / "binjson", replace={"run.json": b"\xff\xfe\x00\x81garbage"})
    _copy_run(sc0, f / "modelstr", replace={"run.json": json.dumps({**meta, "model": "x"})})
    _copy_run(sc0, f / "schemastr", replace={"run.json": json.dumps({**meta, "schema_version": "abc"})})
    _copy_run(sc0, f / "paramslist", replace={"run.json": json.dumps({**meta, "params": [1]})})
    _copy_run(sc0, f / "noscores", drop=["scores.csv"])
    scores = pd.read_csv(sc0 / "scores.csv", keep_default_na=False)
    _copy_run(sc0, f / "scores-nocols",  # every prompt, but neither score nor refusal
              replace={"scores.csv": scores.drop(columns=["score", "refusal"]).to_csv(index=False)})
    _copy_run(sc0, f / "summary-nocols", replace={"summary.csv": "set,split,condition\nh,test,baseline\n"})
    _copy_run(sc0, f / "summary-textn", replace={"summary.csv": "set,split,condition,n\nh,test,baseline,many\n"})
    gmeta = json.loads((ge / "run.json").read_text())
    _copy_run(ge, f / "modelstr-geo", replace={"run.json": json.dumps({**gmeta, "model": "x"})})
    _copy_run(ge, f / "geo-metalist")
    save_file({"directions": torch.ones(4, 32), "layers": torch.arange(4), "resid_norm": torch.ones(4)},
              str(f / "geo-metalist" / "directions.safetensors"), metadata={"meta": "[1]"})
    _copy_run(ge, f / "geo-mismatch")
    save_file({"directions": torch.randn(4, 32), "layers": torch.arange(2), "resid_norm": torch.ones(4)},
              str(f / "geo-mismatch" / "directions.safetensors"),
              metadata={"meta": json.dumps({"position": -1, "site": "resid_pre"})})
    emeta = json.loads((ex / "run.json").read_text())
    _copy_run(ex, f / "ex-nolayercount", replace={"run.json": json.dumps(
        {**emeta, "model": {k: v for k, v in emeta["model"].items() if k != "n_layers"}})})
    _copy_run(ex, f / "patch-residonly", replace={
        "run.json": json.dumps({**emeta, "command": "patch"}),
        "summary.csv": "direction,site,layer,positions,head,effect\ndenoise,resid_pre,1,-1,,0.5\n"})
    _copy_run(ex, f / "patch-nosummary", drop=["summary.csv"],
              replace={"run.json": json.dumps({**emeta, "command": "patch"})})
    res = pd.read_csv(st / "results.csv")
    _copy_run(st, f / "steer-alpha0", replace={"results.csv": res[res.alpha == 0].to_csv(index=False)})

    # broken model folders
    (base / "models" / "badconfig").mkdir(parents=True)
    (base / "models" / "badconfig" / "config.json").write_text("{")
    (base / "models" / "configonly").mkdir()
    shutil.copy(base / MODEL / "config.json", base / "models" / "configonly" / "config.json")
    _copy_run(ex, f / "ex-nodirection", drop=["direction.safetensors"])

    # imprint templates
    t = base / "tpl"
    t.mkdir()
    (t / "bad.json").write_text("{")
    (t / "list.json").write_text("[1, 2]")
    (t / "sd0.json").write_text(json.dumps({"X": {"gini": [0.2, 0]}}))
    (t / "unknown.json").write_text(json.dumps({"X": {"nope": [1, 1]}}))
    (t / "sdnan.json").write_text('{"X": {"gini": [0.2, NaN]}}')
    (t / "empty.json").write_text("{}")
    (t / "short.json").write_text(json.dumps({"X": {"gini": [0.2]}}))

    (base / "runs").mkdir()  # the runs folder of the cases ($REFUSAL_RUNS), empty


@pytest.fixture(scope="module")
def env(tmp_path_factory, one_thread):
    """The scratch folder (working directory): model, prompt files, finished runs, broken inputs; REFUSAL_RUNS is
    its empty ``runs`` folder. Returns a dict with ``base`` and ``baseline`` (its snapshot after setup)."""
    base = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        mp.setenv("TQDM_DISABLE", "1")
        mp.delenv("REFUSAL_TOOLKIT_AUTO_DTYPE", raising=False)
        _make_prompt_files(base)
        mp.setenv("REFUSAL_RUNS", str(base / "valid"))
        _make_valid_runs(base)
        _make_broken_inputs(base)
        mp.setenv("REFUSAL_RUNS", "runs")
        yield {"base": base, "baseline": snapshot(base)}


def _restore(env) -> None:
    """Remove whatever a case left behind, so that the next case starts from the baseline."""
    base, baseline = env["base"], env["baseline"]
    for rel, entry in baseline.items():  # permission bits first (a read-only folder blocks removal)
        p = base / rel
        if entry[0] == "dir" and p.is_dir() and stat.S_IMODE(p.stat().st_mode) != entry[1]:
            p.chmod(entry[1])
    now = snapshot(base)
    for rel in sorted(set(now) - set(baseline), key=lambda r: -r.count(os.sep)):
        p = base / rel
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            for sub in [p, *p.rglob("*")]:
                if sub.is_dir() and not sub.is_symlink():
                    sub.chmod(0o755)
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ tests
def test_case_list_covers_every_subcommand():
    from experiments.cli import app
    from experiments.stats import stats_app

    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    assert len(CASES) >= 160, len(CASES)
    counts = {cmd: sum(c.command == cmd for c in CASES) for cmd in SUBCOMMANDS}
    assert all(n >= 8 for n in counts.values()), counts
    # every registered command (and every stats subcommand) has cases
    registered = {c.name for c in app.registered_commands} | {f"stats {c.name}" for c in stats_app.registered_commands}
    assert registered == set(SUBCOMMANDS), registered ^ set(SUBCOMMANDS)
    assert {g.name for g in app.registered_groups} == {"stats"}


@pytest.mark.parametrize("cmd", list(BASE))
def test_base_command_is_valid(env, cmd, tmp_path, monkeypatch):
    """Each case's command line is one of these valid ones with one bad argument: they must succeed."""
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path / "runs"))
    r = invoke(BASE[cmd])
    assert r.exit_code == 0, f"`refusal {' '.join(BASE[cmd])}`: {describe(r)}"


def _timeout(signum, frame):
    raise TimeoutError("bad-input case ran over 120 s")


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(env, c, monkeypatch):
    if c.skip_root and os.geteuid() == 0:
        pytest.skip("root ignores file permissions")
    teardown = c.setup(env, monkeypatch) if c.setup else None
    try:
        before = snapshot(env["base"])
        old = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(120)
        try:
            result = invoke(list(c.args))
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        after = snapshot(env["base"])
    finally:
        if teardown:
            teardown()
        monkeypatch.undo()
        _restore(env)
    cmdline = " ".join(repr(a) if (not a or " " in a) else a for a in c.args)
    check_promise(result, before, after, c.needles, cmdline)
