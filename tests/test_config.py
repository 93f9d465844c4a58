"""The typed command configs (:mod:`experiments.shared.config`): the generated Typer signature, validation through the
command line (one ``error:`` line, exit 2, nothing written), the TOML file and ``REFUSAL_<FIELD>`` sources and their
precedence, and ``params`` in run.json equal to the config's dump.

Validation cases need no model (the config is checked before anything loads); the end-to-end cases run ``score``,
``compare``, ``extract`` and ``ablate`` on the tiny Qwen2 checkpoint of ``tests/test_cli.py``.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Annotated, Literal, Optional

import pytest
import typer
from pydantic import Field

from experiments.ablate import AblateConfig
from experiments.cli import app
from experiments.compare import CompareConfig
from experiments.shared.config import (Cli, CommandConfig, FiniteFloat, ModelOptions, RunOptions, command, env_name,
                                load_config)
from experiments.extract import ExtractConfig
from experiments.geometry import GeometryConfig
from experiments.imprint import ImprintConfig
from experiments.patch import PatchConfig
from experiments.plot_residuals import PlotResidualsConfig
from experiments.score import ScoreConfig
from experiments.stats import ControlConfig, SeedsConfig, TtestConfig
from test_cli import EXTRACT_FAST, PERMISSIVE, assert_ok, assert_usage_error, invoke, tiny_files
from toolkit.errors import ToolkitError

CONVERTED = {"score": ScoreConfig, "compare": CompareConfig, "patch": PatchConfig, "geometry": GeometryConfig,
             "plot-residuals": PlotResidualsConfig, "ablate": AblateConfig, "extract": ExtractConfig,
             "imprint": ImprintConfig, "stats seeds": SeedsConfig, "stats ttest": TtestConfig,
             "stats control": ControlConfig}
SHARED = ["--model", "--dtype", "--device", "--device-map", "--batch-size", "--system", "--name", "--force", "--seed",
          "--quiet"]


def click_command(cmd: str):
    """The Click command of a subcommand (``score``, or ``stats seeds`` for a command of a sub-app)."""
    command_ = typer.main.get_command(app)
    for part in cmd.split():
        command_ = command_.commands[part]
    return command_


def click_params(cmd: str) -> dict:
    """The Click parameters of a subcommand by their first name (``--batch-size``, or an argument's name)."""
    return {(p.opts[0] if p.opts else p.name): p for p in click_command(cmd).params}


@pytest.fixture(autouse=True)
def no_refusal_env(monkeypatch):
    """No stray ``REFUSAL_<FIELD>`` variable from the caller's shell changes these tests' values."""
    import os

    for key in list(os.environ):
        if key.startswith("REFUSAL_") and not key.startswith("REFUSAL_TOOLKIT_") and key != "REFUSAL_RUNS":
            monkeypatch.delenv(key)


# ------------------------------------------------------------------------------------------------ signature
@pytest.mark.parametrize("cmd", sorted(CONVERTED))
def test_generated_signature_has_every_field_then_config(cmd):
    cls = CONVERTED[cmd]
    fn = click_command(cmd).callback
    names = [n for n in inspect.signature(fn.__wrapped__ if hasattr(fn, "__wrapped__") else fn).parameters]
    params = click_params(cmd)
    assert "--config" in params and params["--config"].default is None
    fields = {n for n in params if n != "--config"}
    assert len(fields) == len(cls.model_fields), names
    if issubclass(cls, ModelOptions):
        # the shared options, in the order --help has always listed them (--device-map after --device), at the end
        assert [n for n in params if n in SHARED] == SHARED
        assert list(params)[-len(SHARED) - 1:-1] == SHARED
    else:  # RunOptions only (compare, imprint, stats): --name and --force last, no model option
        assert list(params)[-3:-1] == ["--name", "--force"] and "--model" not in params


def test_shared_options_are_the_common_ones():
    shared = [f"--{n.replace('_', '-')}" for n in list(ModelOptions.model_fields) + list(RunOptions.model_fields)]
    assert sorted(shared) == sorted(SHARED)


def test_signature_flags_defaults_and_help_come_from_the_fields():
    p = click_params("score")
    assert p["--batch-size"].opts == ["--batch-size", "-b"] and p["--batch-size"].default == 16
    assert p["--batch-size"].help == "prompts per forward pass (>= 1)"
    assert p["--model"].opts == ["--model", "-m"] and p["--model"].default is None
    assert p["--quiet"].opts == ["--quiet", "-q"] and p["--quiet"].is_flag and p["--quiet"].secondary_opts == []
    assert p["--seed"].help.endswith("(>= 0 and <= 4294967295)") and p["--seed"].default == 0
    assert p["--gen-tokens"].default == 12 and "(>= 0)" in p["--gen-tokens"].help
    assert p["sets"].param_type_name == "argument" and p["sets"].default is None and not p["sets"].required
    assert p["--split"].help == ScoreConfig.model_fields["split"].description
    g = click_params("geometry")
    assert g["--silhouette"].secondary_opts == ["--no-silhouette"] and g["--silhouette"].default is True
    assert g["--site"].default == "resid_pre" and "(< 0)" in g["--position"].help
    assert click_params("patch")["--heads"].secondary_opts == ["--no-heads"]
    assert "a finite number > 0" in click_params("plot-residuals")["--fps"].help
    c = click_params("compare")
    assert c["runs"].param_type_name == "argument" and c["runs"].required
    a = click_params("ablate")
    assert a["--direction"].opts == ["--direction", "-d"] and a["--direction"].required
    assert a["--limit"].help.endswith("(>= 1)") and a["--gen-tokens"].default == 12
    x = click_params("extract")
    assert x["--filter"].default == "judge" and x["--kl-max"].help.endswith("(a finite number > 0)")
    assert "(a finite number > 0 and <= 1)" in x["--max-layer-frac"].help and "(>= 1)" in x["--judge-tokens"].help
    i = click_params("imprint")
    # imprint's runs are optional since --spread A:B can name every run (the command checks that one is given)
    assert i["runs"].metavar == "[RUN...]" and not i["runs"].required and i["--plot"].secondary_opts == ["--no-plot"]
    t = click_params("stats ttest")
    assert (t["run_a"].metavar, t["run_b"].metavar, t["run_b"].required) == ("RUN_A", "[RUN_B]", False)
    assert t["--set"].default is None and t["--correction"].default == "holm"


@pytest.mark.parametrize("cmd", sorted(CONVERTED))
def test_help_lists_each_flag_with_its_description(cmd):
    r = invoke([*cmd.split(), "--help"])
    out = assert_ok(r)
    for name, p in click_params(cmd).items():
        if p.param_type_name == "option":
            assert name in out, name
    assert "--config" in out and "TOML" in out


def test_reserved_field_names_are_refused_at_decoration():
    class Bad(RunOptions):
        config_file: str = "x"

    with pytest.raises(TypeError, match="config_file"):
        command(Bad)(lambda cfg: None)


def test_cli_metadata_flags_arguments_and_bool_pairs():
    class Demo(CommandConfig):
        top_k: Annotated[int, Cli("--top-k", "-k")] = Field(3, ge=1, description="how many")
        paths: Annotated[list[str], Cli(argument=True)] = Field(..., description="inputs")
        plot: bool = Field(True, description="draw")
        verbose: bool = Field(False, description="talk")
        mode: Literal["a", "b"] = Field("a", description="a or b")

    seen = {}
    fn = command(Demo)(lambda cfg: seen.setdefault("cfg", cfg))
    sig = inspect.signature(fn)
    assert list(sig.parameters) == ["typer_ctx", "top_k", "paths", "plot", "verbose", "mode", "config_file"]
    assert sig.parameters["top_k"].default.param_decls == ("--top-k", "-k")
    assert sig.parameters["plot"].default.param_decls == ("--plot/--no-plot",)
    assert sig.parameters["verbose"].default.param_decls == ("--verbose",)
    assert sig.parameters["mode"].annotation is str  # Typer reads text, pydantic checks the choice
    demo = typer.Typer()
    demo.command()(fn)
    from typer.testing import CliRunner

    r = CliRunner().invoke(demo, ["p1", "p2", "-k", "2", "--no-plot"])
    assert r.exit_code == 0, r.output
    assert seen["cfg"] == Demo(top_k=2, paths=["p1", "p2"], plot=False)
    r = CliRunner().invoke(demo, ["p1", "--mode", "c"])
    assert r.exit_code == 2 and "error: --mode: must be one of a, b, got 'c'" in r.output


# ------------------------------------------------------------------------------------------------ validation
BAD = [
    (["score", "h.jsonl", "--limit", "0"], "--limit", "must be >= 1", "got 0"),
    (["score", "--gen-tokens", "-1"], "--gen-tokens", "got -1"),
    (["score", "--seed", str(2**64)], "--seed", "<= 4294967295", str(2**64)),
    (["score", "--seed", "-1"], "--seed", ">= 0"),
    (["score", "--batch-size", "0"], "--batch-size", "got 0"),
    (["geometry", "--site", "bogus"], "--site", "bogus", "resid_pre"),
    (["geometry", "--position", "0"], "--position: must be a negative index", "got 0"),
    (["geometry", "--site", "hook_z"], "--site: unknown hook site 'hook_z'; choose one of resid_pre, resid_mid"),
    (["geometry", "--limit", "-1"], "--limit"),
    (["patch", "--direction", "sideways"], "--direction", "sideways", "denoise"),
    (["patch", "--pairs", "0"], "--pairs"),
    (["patch", "--last-k", "-1"], "--last-k"),
    (["patch", "--top", "-1"], "--top"),
    (["patch", "--bootstrap", "-1"], "--bootstrap"),
    (["patch", "--max-len-diff", "-1"], "--max-len-diff"),
    (["plot-residuals", "--fps", "nan"], "--fps", "a finite number > 0", "nan"),
    (["plot-residuals", "--fps", "inf"], "--fps", "inf"),
    (["plot-residuals", "--fps", "0"], "--fps"),
    (["plot-residuals", "--method", "tsne"], "--method: unknown projection method 'tsne'; choose one of pacmap, pca"),
    (["plot-residuals", "--neighbors", "0"], "--neighbors"),
    (["plot-residuals", "--position", "1"], "--position"),
    (["ablate", "-d", "x", "--limit", "0"], "--limit: must be >= 1", "got 0"),
    (["ablate", "-d", "x", "--gen-tokens", "-1"], "--gen-tokens", "got -1"),
    (["extract", "--n-train", "0"], "--n-train", "got 0"),
    (["extract", "--screen-n", "0"], "--screen-n"),
    (["extract", "--filter", "bogus"], "--filter: must be one of judge, score, none", "bogus"),
    (["extract", "--select-by", "bogus"], "--select-by", "bogus"),
    (["extract", "--kl-max", "nan"], "--kl-max: must be a finite number > 0", "nan"),
    (["extract", "--max-layer-frac", "1.5"], "--max-layer-frac", "<= 1", "1.5"),
    (["stats", "ttest", "x", "--correction", "bonferroni"],
     "--correction: unknown correction 'bonferroni': use one of holm, bh, none"),
    (["stats", "control", "x", "--metric", "bogus"], "--metric: must be one of score, refusal", "bogus"),
    (["stats", "control", "x", "--kind", "bogus"], "--kind: must be one of random, orthogonal", "bogus"),
    (["stats", "control", "x", "--correction", "sidak"], "--correction", "sidak"),
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a[0]) for a in BAD])
def test_bounds_and_choices_are_one_error_line_and_nothing_written(args, env):
    cmdline, *needles = args
    before = sorted(p.name for p in env.parent.iterdir())
    # a model (or run) that does not exist: the config is checked first, so its error is the one reported
    cls = CONVERTED[" ".join(cmdline[:2]) if cmdline[0] == "stats" else cmdline[0]]
    model = ["--model", "nope/missing-model", "--quiet"] if issubclass(cls, ModelOptions) else []
    assert_usage_error(invoke([*cmdline, *model]), *needles)
    assert sorted(p.name for p in env.parent.iterdir()) == before and not env.exists()


# ------------------------------------------------------------------------------------------------ sources
def test_precedence_flag_over_env_over_file_over_default(tmp_path, monkeypatch):
    f = tmp_path / "c.toml"
    f.write_text('limit = 3\nbatch-size = 5\ngen_tokens = 7\nsplit = "val"\nsets = ["a", "b"]\n')
    assert load_config(ScoreConfig, {}).limit is None  # default
    cfg = load_config(ScoreConfig, {}, f)
    assert (cfg.limit, cfg.batch_size, cfg.gen_tokens, cfg.split, cfg.sets) == (3, 5, 7, "val", ["a", "b"])
    monkeypatch.setenv("REFUSAL_BATCH_SIZE", "8")
    monkeypatch.setenv("REFUSAL_GEN_TOKENS", "9")
    monkeypatch.setenv("REFUSAL_SETS", '["c"]')
    monkeypatch.setenv("REFUSAL_QUIET", "1")
    cfg = load_config(ScoreConfig, {"gen_tokens": 2}, f)
    assert (cfg.limit, cfg.batch_size, cfg.gen_tokens, cfg.split, cfg.sets, cfg.quiet) == (3, 8, 2, "val", ["c"], True)
    assert env_name("batch_size") == "REFUSAL_BATCH_SIZE"


def test_building_a_config_in_code_reads_no_environment(monkeypatch):
    monkeypatch.setenv("REFUSAL_BATCH_SIZE", "8")
    assert ScoreConfig().batch_size == 16 and load_config(ScoreConfig, {}).batch_size == 8


def test_env_opt_out_keeps_refusal_runs_for_the_runs_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_RUNS", str(tmp_path))  # the runs folder, not compare's RUNS argument
    assert load_config(CompareConfig, {"runs": ["x"]}).runs == ["x"]
    with pytest.raises(ToolkitError, match="RUNS"):
        load_config(CompareConfig, {})  # required, and not taken from $REFUSAL_RUNS


@pytest.mark.parametrize("text,needles", [
    ("limit = 0\n", ["--limit (from ", "c.toml)", "must be >= 1", "got 0"]),
    ("bogus = 1\n", ["--config", "c.toml", "unknown option 'bogus'", "batch_size"]),
    ("limit = \n", ["--config", "c.toml", "not valid TOML"]),
    ('site = "x"\n', ["unknown option 'site'"]),
    ('split = 3\n', ["--split (from ", "string", "got 3"]),
])
def test_bad_file_values_name_the_file_and_the_option(tmp_path, text, needles):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ToolkitError) as e:
        load_config(ScoreConfig, {}, f)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_bad_env_values_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("REFUSAL_SEED", "-3")
    with pytest.raises(ToolkitError, match=r"--seed \(from \$REFUSAL_SEED\): must be >= 0 .*got '-3'"):
        load_config(GeometryConfig, {})
    monkeypatch.setenv("REFUSAL_SEED", "1")
    monkeypatch.setenv("REFUSAL_SETS", "a,b")
    with pytest.raises(ToolkitError, match=r"SETS \(from \$REFUSAL_SETS\): input should be a valid list, got 'a,b'"):
        load_config(ScoreConfig, {})  # an Optional list: pydantic-settings passes the text on, pydantic refuses it

    class L(CommandConfig):
        items: list[str] = []

    monkeypatch.setenv("REFUSAL_ITEMS", "a,b")  # a plain list: pydantic-settings' JSON decoding fails
    with pytest.raises(ToolkitError, match=r"\$REFUSAL_ITEMS \(--items\): not JSON, got 'a,b'"):
        load_config(L, {})
    with pytest.raises(ToolkitError, match="no such file"):
        load_config(ScoreConfig, {}, tmp_path / "missing.toml")


def test_config_file_and_env_errors_through_the_command_line(env, monkeypatch):
    Path("c.toml").write_text("limit = 0\n")
    assert_usage_error(invoke(["score", "--config", "c.toml", "--model", "nope/missing"]), "--limit", "c.toml")
    assert_usage_error(invoke(["score", "--config", "missing.toml"]), "missing.toml")
    monkeypatch.setenv("REFUSAL_FPS", "nan")
    assert_usage_error(invoke(["plot-residuals", "--model", "nope/missing"]), "--fps", "$REFUSAL_FPS", "nan")
    assert not env.exists()


def test_params_is_the_json_dump_with_resolved_values_on_top():
    cfg = PlotResidualsConfig(layers="1:3", fps=4.0)
    assert cfg.params() == json.loads(json.dumps(cfg.model_dump()))
    assert list(cfg.params())[:2] == ["sets", "labels"] and list(cfg.params())[-1] == "quiet"  # as --help lists them
    p = cfg.params(layers=[1, 2], refusal_token_ids=[3])
    assert p["layers"] == [1, 2] and p["refusal_token_ids"] == [3] and p["fps"] == 4.0
    with pytest.raises(Exception):
        cfg.fps = 1.0  # frozen: the body reads its options, never changes them
    assert math.isfinite(PlotResidualsConfig().fps)


def test_a_check_over_several_options_is_one_line_too():
    from pydantic import model_validator

    class Pair(CommandConfig):
        lo: int = 0
        hi: int = 1

        @model_validator(mode="after")
        def ordered(self):
            if self.hi <= self.lo:
                raise ValueError(f"--hi must be above --lo, got {self.hi} <= {self.lo}")
            return self

    with pytest.raises(ToolkitError, match=r"^--hi must be above --lo, got 1 <= 2$"):
        load_config(Pair, {"lo": 2})


def test_finite_float_alias_refuses_nan():
    class F(CommandConfig):
        x: Annotated[FiniteFloat, Field(ge=0)] = 1.0
        y: Optional[int] = None

    with pytest.raises(ToolkitError, match=r"--x: must be a finite number >= 0, got nan"):
        load_config(F, {"x": float("nan")})


# ------------------------------------------------------------------------------------------------ end to end
def test_score_and_compare_record_the_config_as_params(env, monkeypatch):
    model, h, b = tiny_files(env.parent)
    Path("score.toml").write_text(f'sets = ["{h}", "{b}"]\nlimit = 1\ngen_tokens = 5\nquiet = true\n'
                                  'batch_size = 2\n')
    monkeypatch.setenv("REFUSAL_GEN_TOKENS", "3")  # over the file's 5 ...
    monkeypatch.setenv("REFUSAL_LIMIT", "0")  # ... and a bad value the flag below replaces
    r = invoke(["score", "--config", "score.toml", "--model", model, "--limit", "2", "--dtype", "float32",
                "--name", "s"])
    assert_ok(r)
    meta = json.loads((env / "score" / "s" / "run.json").read_text())
    want = ScoreConfig(sets=[str(h), str(b)], limit=2, gen_tokens=3, quiet=True, batch_size=2, model=str(model),
                       dtype="float32", name="s")
    # windows: recorded resolved (the default is a quarter, half and all of gen_tokens 3)
    assert meta["params"] == want.params(refusal_token_ids=meta["params"]["refusal_token_ids"], windows=[1, 3])
    # the keys score wrote by hand before the config, with the same values
    old = {"split": "test", "gen_tokens": 3, "system": None, "batch_size": 2, "limit": 2}
    assert {k: meta["params"][k] for k in old} == old and meta["params"]["refusal_token_ids"]
    assert meta["seed"] == 0 and len(meta["params"]) == len(ScoreConfig.model_fields) + 1

    # stats seeds: the options that only say how or where a run was made may differ, the others may not
    assert_ok(invoke(["score", "--config", "score.toml", "--model", model, "--limit", "2", "--dtype", "float32",
                      "--name", "s1", "--seed", "1", "--device", "cpu"]))
    assert_ok(invoke(["stats", "seeds", env / "score" / "s", env / "score" / "s1", "--name", "agg"]))
    assert_ok(invoke(["score", "--config", "score.toml", "--model", model, "--limit", "1", "--dtype", "float32",
                      "--name", "s2", "--seed", "2"]))
    assert_usage_error(invoke(["stats", "seeds", env / "score" / "s", env / "score" / "s2"]), "param 'limit'")

    r = invoke(["compare", env / "score" / "s", "--name", "c"])
    assert_ok(r)
    meta = json.loads((env / "compare" / "c" / "run.json").read_text())
    assert meta["params"] == CompareConfig(runs=[str(env / "score" / "s")], name="c").params()
    assert meta["params"]["runs"] == [str(env / "score" / "s")]


def test_device_map_option_places_the_model_and_is_recorded(env):
    """``--device-map`` takes accelerate's strategies or a JSON object; the map is recorded in run.json's model,
    the run's scores equal a run without it, and a malformed map is one error line before any run is made."""
    model, h, b = tiny_files(env.parent)
    common = ["score", str(h), "--model", model, "--dtype", "float32", "--limit", "3", "--gen-tokens", "0", "-q"]
    assert_ok(invoke(common + ["--name", "plain"]))
    assert_ok(invoke(common + ["--name", "placed", "--device-map", '{"": "cpu"}']))
    placed = json.loads((env / "score" / "placed" / "run.json").read_text())
    assert placed["model"]["device_map"] == {"": "cpu"} and placed["params"]["device_map"] == '{"": "cpu"}'
    assert json.loads((env / "score" / "plain" / "run.json").read_text())["model"]["device_map"] is None
    a = (env / "score" / "plain" / "scores.csv").read_text()
    assert a == (env / "score" / "placed" / "scores.csv").read_text()
    for bad in ("everywhere", "{not json", "[1]"):
        assert_usage_error(invoke(common + ["--name", "bad", "--device-map", bad]), "--device-map: ", bad)
    assert not (env / "score" / "bad").exists()


def test_extract_and_ablate_record_the_config_as_params(env):
    """extract and ablate write every option as params, with what they resolved on top (the layer and position
    lists, the parsed --induce-min, the direction's source, the refusal token ids), and keep every key they wrote by
    hand before the configs, with the same values."""
    from toolkit.directions import Direction

    model, h, b = tiny_files(env.parent)
    common = ["--model", model, *EXTRACT_FAST, "--dtype", "float32"]
    assert_ok(invoke(["extract", "--harmful", h, "--harmless", b, *common, *PERMISSIVE, "--layers", "1:3",
                      "--n-train", "4", "--name", "ex"]))
    meta = json.loads((env / "extract" / "ex" / "run.json").read_text())
    p = meta["params"]
    want = ExtractConfig(harmful=str(h), harmless=str(b), model=str(model), quiet=True, batch_size=4, dtype="float32",
                         filter="none", select_by="score", kl_max=1e9, induce_min="-1e9", screen_n=2, keep=2,
                         judge_tokens=3, layers="1:3", n_train=4, name="ex")
    assert p == want.params(induce_min=-1e9, layers=[1, 2], positions=p["positions"],
                            refusal_token_ids=p["refusal_token_ids"])
    old = {"filter": "none", "max_layer_frac": 0.8, "kl_max": 1e9, "screen_n": 2, "keep": 2, "max_full": 12,
           "judge_top": 3, "judge_tokens": 3, "select_by": "score", "induce_min": -1e9, "n_train": 4, "n_val": None,
           "layers": [1, 2], "system": None}
    assert {k: p[k] for k in old} == old and p["positions"] and p["refusal_token_ids"]
    assert len(p) == len(ExtractConfig.model_fields) + 1  # + refusal_token_ids

    assert_ok(invoke(["ablate", "-d", env / "extract" / "ex", "--harmful", h, "--harmless", b, *common,
                      "--limit", "2", "--gen-tokens", "2", "--no-capability", "--name", "ab"]))
    p = json.loads((env / "ablate" / "ab" / "run.json").read_text())["params"]
    direction = Direction.resolve(str(env / "extract" / "ex")).source
    want = AblateConfig(direction=str(env / "extract" / "ex"), harmful=str(h), harmless=str(b), model=str(model),
                        quiet=True, batch_size=4, dtype="float32", limit=2, gen_tokens=2, name="ab",
                        capability=False)
    assert p == want.params(direction=direction, refusal_token_ids=p["refusal_token_ids"], windows=[1, 2])
    old = {"direction": direction, "split": "test", "gen_tokens": 2, "limit": 2, "system": None, "save": None,
           "save_dtype": "auto", "baseline": None}
    assert {k: p[k] for k in old} == old and p["refusal_token_ids"]


def test_help_keeps_bracketed_text():
    """Typer renders help as Rich markup; a field's ``[default: ...]`` text is escaped, not swallowed."""
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, ["steer", "--help"], env={"COLUMNS": "250"})
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code == 0
    assert "[default: the direction's layer, or the middle layer]" in text
    assert "[default: the offline Qwen2.5-Coder-0.5B-Instruct Q4_K_M]" in text
