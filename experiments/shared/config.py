"""One typed configuration per command: its options, their validation, and the run's ``params`` in ``run.json``.

A command's options are the fields of a pydantic model. From that model come

* the Typer options and arguments (:func:`command` builds the function signature Typer reads, so ``--help`` shows
  each field's ``description``, default and bounds);
* the validation of choices (``Literal[...]``), bounds (``Field(ge=..., le=...)``) and finiteness
  (:data:`FiniteFloat`), done by pydantic after all values are collected; a failure is one
  ``error: --flag: ...`` line and exit code 2, like every other bad input (:func:`experiments.shared.errors.handle_errors`);
* the values from a TOML file (``--config FILE.toml``, keys are the field names, ``batch_size`` or
  ``batch-size``) and from environment variables ``REFUSAL_<FIELD>`` (``REFUSAL_BATCH_SIZE=8``; list fields take
  JSON, ``REFUSAL_SETS='["harmful", "borderline"]'``), read with pydantic-settings' sources;
* the run's ``params``: :meth:`CommandConfig.params` is the model's JSON dump, every option under its field name.

Precedence, highest first: a flag given on the command line > ``REFUSAL_<FIELD>`` > ``--config`` file > the
field's default. A field can opt out of the environment (``Cli(env=False)``: ``compare``'s ``runs`` argument,
since ``$REFUSAL_RUNS`` already names the runs folder).

The idea follows Heretic's ``config.py`` ``Settings``: one pydantic-settings model feeds the command line, the
environment (``HERETIC_*``) and a TOML file, with the same order (arguments > environment > file > default). Heretic
lets pydantic-settings parse the command line and reads ``config.toml`` from the working directory; here Typer keeps
the command line (subcommands, the help and error style the toolkit already has), the file is named per invocation
(``--config``), and the models are plain :class:`pydantic.BaseModel`\\ s whose sources (pydantic-settings'
``EnvSettingsSource`` and ``TomlConfigSettingsSource``) are merged explicitly in one place, :func:`load_config`:
building a config in code or in a test never reads the environment, and an error can name where a bad value came
from.

Converting a command (a few minutes each)::

    class SteerConfig(ModelOptions, RunOptions):           # the shared options come with the bases
        layers: str | None = Field(None, description="layers steered, e.g. '12' or '8:16'")
        alpha: str = Field("0,0.2", description="steering strengths")
        top_k: Annotated[int, Cli("--top-k", "-k")] = Field(4, ge=1, description="...")   # other flag names

    @command(SteerConfig)
    def steer(cfg: SteerConfig):
        \"\"\"The command's help, as before.\"\"\"
        with Run("steer", cfg.name, cfg.force) as run:
            ses = cfg.open_session()
            ...
            run.finish(model=..., seed=cfg.seed, params=cfg.params(refusal_token_ids=ses.refusal_ids), ...)

1. Move each ``typer.Option(default, "--flag", min=..., help=...)`` to a field: ``Field(default, ge=...,
   description=help)``. The flag is ``--`` + the field name with ``-`` for ``_``; a bool field defaulting to True
   gets ``--x/--no-x``. Other names, short flags or a positional argument: ``Annotated[T, Cli(...)]``.
2. Replace ``typer.Option(..., callback=finite(gt=0))`` by ``Annotated[FiniteFloat, Field(gt=0)]``, a fixed set
   of values checked in the body by ``Literal[...]``, and delete the body's own checks of bounds and choices.
3. The body takes the config; ``params=cfg.params(**resolved)`` replaces the hand-written dict, where ``resolved``
   holds only what the command computed (token ids, a resolved layer list): those keys win over the options.
4. Register as before (``app.command("steer")(steer)``); check ``refusal steer --help`` lists the same flags.
5. A field whose ``REFUSAL_<FIELD>`` already means something else (``REFUSAL_RUNS``, ``REFUSAL_TOOLKIT_*``) gets
   ``Cli(env=False)``; a field that only says how or where a run was made joins :data:`NOT_COMPARED`.
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional, TypeVar, Union

import typer
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

from toolkit.errors import ToolkitError
from toolkit.hooks import SITES
from toolkit.steering import SCALES

from .errors import handle_errors

SEED_MAX = 2**32 - 1  # the widest range every RNG used here (torch, numpy, scipy) accepts

ENV_PREFIX = "REFUSAL_"

__all__ = ["Cli", "Invalid", "Site", "PromptPosition", "SteerSite", "SteerPositions", "SteerScale", "DirectionSpec",
           "CommandConfig", "ModelOptions", "RunOptions", "FiniteFloat", "command", "load_config", "ENV_PREFIX",
           "NOT_COMPARED"]


# ---------------------------------------------------------------------------------------------- CLI metadata
@dataclass(frozen=True, init=False)
class Cli:
    """How a config field appears on the command line, given as ``Annotated[T, Cli(...)]`` metadata.

    Attributes:
        flags: the option's names, long first (``"--batch-size", "-b"``); a bool's ``"--x/--no-x"`` pair is
            written as one string. Empty: ``--`` + the field name with ``-`` for ``_`` (``--x/--no-x`` for a
            bool that defaults to True).
        argument: a positional argument instead of an option (``flags`` is then unused).
        env: read ``REFUSAL_<FIELD>`` for this field (False where that variable means something else).
        metavar: the name ``--help`` shows for an argument (``RUN...``) [default: the field's name in capitals].
    """

    flags: tuple[str, ...] = ()
    argument: bool = False
    env: bool = True
    metavar: str | None = None

    def __init__(self, *flags: str, argument: bool = False, env: bool = True, metavar: str | None = None):
        object.__setattr__(self, "flags", flags)
        object.__setattr__(self, "argument", argument)
        object.__setattr__(self, "env", env)
        object.__setattr__(self, "metavar", metavar)


@dataclass(frozen=True)
class Invalid:
    """A field's own words for a bad value, as ``Annotated[T, Invalid("...")]`` metadata, where the generic
    ``must be >= 1, got 0`` would say less than the message users and tests already know.

    Attributes:
        message: a :meth:`str.format` template of what follows ``--flag:``, with ``{value}`` (the bad value; write
            ``{value!r}`` to quote text), ``{choices}`` (a ``Literal``'s values, comma-separated) and ``{bounds}``.
    """

    message: str


def cli_of(field: FieldInfo) -> Cli:
    """The :class:`Cli` metadata of a pydantic field (the defaults when it has none)."""
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def flag_of(name: str, field: FieldInfo) -> str:
    """The name a user knows a field by: its first flag (``--batch-size``), or an argument's name in capitals."""
    cli = cli_of(field)
    if cli.argument:
        return name.upper()
    if cli.flags:
        return cli.flags[0].split("/")[0]
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------- shared field types
# a hook site, refused in the words every command used before the configs
Site = Annotated[Literal[SITES], Invalid("unknown hook site {value!r}; choose one of {choices}")]
# a prompt position read by negative index from the end of the prompt
PromptPosition = Annotated[int, Field(lt=0), Invalid("must be a negative index from the end of the prompt (-1 = last "
                                                     "token), got {value!r}")]


# the steering options shared by ``steer`` and ``dose-response``: the site (default: the direction's), where the
# vector is added, and its scale
SteerSite = Annotated[Optional[str], Field(description=f"hook site: {', '.join(SITES)} [default: the direction's "
                                           "site, else resid_pre]")]
SteerPositions = Annotated[str, Field(description="where to add: post (post-instruction tokens of the prompt), last, "
                                      "all (every position of every pass, generated tokens included), or negative "
                                      "indices like '-1,-3'")]
SteerScale = Annotated[Literal[SCALES], Field(description="s in x + alpha*s*r_hat: unit (1), raw (the direction's "
                                              "own norm) or resid (mean residual norm at that layer over "
                                              "post-instruction tokens)")]
DirectionSpec = Annotated[str, Cli("--direction", "-d")]


# ---------------------------------------------------------------------------------------------- models
class CommandConfig(BaseModel):
    """The base of every command's configuration: frozen (the body reads it, never changes it) and closed (an
    unknown key in a TOML file is an error, not silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def params(self, **resolved: Any) -> dict:
        """The run's ``params`` for ``run.json``: every option under its field name, JSON-safe.

        Args:
            resolved: values the command computed (``refusal_token_ids``, a layer list resolved against the
                model); they are added, and replace an option of the same name (documented per command).
        """
        dump = self.model_dump(mode="json")
        return {k: dump[k] for k in field_order(type(self))} | resolved


# options that say how, where or under which name a run was made, not what it measured: ``stats seeds`` lets them
# differ between the runs it aggregates (a model's identity is checked by its hash; dtype and device were never
# compared, as they were not in params before the configs recorded every option)
NOT_COMPARED = frozenset({"model", "dtype", "device", "device_map", "name", "force", "quiet"})

# the order the shared options have always had at the end of every command's --help
_SHARED_ORDER = ("model", "dtype", "device", "device_map", "batch_size", "system", "name", "force", "seed", "quiet")


def field_order(cls: type[BaseModel]) -> list[str]:
    """A config's fields as ``--help`` and ``params`` list them: the command's own in declaration order, then the
    shared options (:class:`ModelOptions`, :class:`RunOptions`) in the order they have always had."""
    return ([n for n in cls.model_fields if n not in _SHARED_ORDER]
            + [n for n in _SHARED_ORDER if n in cls.model_fields])


class ModelOptions(CommandConfig):
    """The options of every command that loads a model (formerly ``ModelOpt``, ``DtypeOpt``, ... in
    the former ``experiments/common.py``)."""

    model: Annotated[Optional[str], Cli("--model", "-m")] = Field(
        None, description="Hugging Face id, local folder, .gguf file, PEFT adapter folder or an offline alias "
        "(`refusal models`: qwen-coder-0.5b, qwen-coder-1.5b, smollm2-135m) [default: the offline "
        "Qwen2.5-Coder-0.5B-Instruct Q4_K_M]")
    dtype: str = Field("auto", description="compute dtype: auto (bfloat16 on CUDA and on CPUs with native bfloat16, "
                       "else float32; $REFUSAL_TOOLKIT_AUTO_DTYPE overrides it), float32, bfloat16, float16. "
                       "Statistics run in float32 or wider; run.json records the dtype")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N, mps, xpu")
    device_map: Optional[str] = Field(
        None, description="spread a model larger than one device over several (accelerate): auto, balanced, "
        "balanced_low_0, sequential, or a JSON object {module: device}; --device then only chooses the dtype")
    batch_size: Annotated[int, Cli("--batch-size", "-b")] = Field(16, ge=1, description="prompts per forward pass")
    system: Optional[str] = Field(None, description="system prompt [default: the chat template's own behaviour]")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="random seed (recorded; greedy decoding is deterministic)")
    quiet: Annotated[bool, Cli("--quiet", "-q")] = Field(False, description="no progress bars")

    def open_session(self):
        """Load the model and build the runner with these options (:func:`experiments.shared.session.open_session`)."""
        from .session import open_session

        return open_session(self.model, self.dtype, self.device, self.batch_size, self.system, self.quiet,
                            self.seed, self.device_map)


class JudgeOptions(CommandConfig):
    """The options of every command that judges completions: which refusal judge, its model, and the windows
    (completion lengths) at which it also judges."""

    judge: Literal["markers", "llm", "nli", "ensemble"] = Field(
        "markers", description="refusal judge: markers (phrase list), llm (a local instruction model reads request "
        "and response), nli (zero-shot NLI model), ensemble (markers' refusals, else llm); other judges are "
        "reported with the markers beside them")
    judge_model: Optional[str] = Field(
        None, description="model of the llm/ensemble judge [default: the offline Qwen2.5-Coder-1.5B-Instruct "
        "Q4_K_M] or of the nli judge (Hugging Face id or folder; required)")
    judge_batch_size: int = Field(8, ge=1, description="pairs per forward pass of the judge model")
    windows: Optional[str] = Field(
        None, description="comma-separated completion lengths (tokens) at which the judge also judges each "
        "completion, to show whether the completion was long enough [default: a quarter, half and all of "
        "--gen-tokens]")

    def open_judge(self, *, dtype: str = "auto", device: str = "auto", quiet: bool = False):
        """Build the chosen judge (:func:`toolkit.judges.make_judge`), loading its model if it has one."""
        import sys

        from toolkit.judges import make_judge

        from .output import console

        with console.status(f"loading the {self.judge} judge"):
            j = make_judge(self.judge, judge_model=self.judge_model, dtype=dtype, device=device,
                           batch_size=self.judge_batch_size, progress=not quiet and sys.stderr.isatty())
        d = j.describe()
        console.print(f"judge {d['name']} ({d['version']}" + (f", model {d['model']}" if d.get("model") else "")
                      + ")", highlight=False)
        return j


class RunOptions(CommandConfig):
    """The options of every command that writes a run folder."""

    name: Optional[str] = Field(None, description="run name under runs/<command>/ [default: timestamp]")
    force: bool = Field(False, description="replace an existing run of the same name")


# ---------------------------------------------------------------------------------------------- sources
class _Env(EnvSettingsSource):
    """pydantic-settings' environment source, skipping fields marked ``Cli(env=False)`` and naming the variable in
    a decoding error (a list field given text that is not JSON)."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if not cli_of(field).env:
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError:
            raise ToolkitError(f"${env_name(field_name)} ({flag_of(field_name, field)}): not JSON, got {value!r} "
                               "(a list is written like '[\"a\", \"b\"]')") from None


def env_name(field_name: str) -> str:
    """The environment variable of a field: ``REFUSAL_`` + its name in capitals."""
    return ENV_PREFIX + field_name.upper()


def _from_file(cls: type[CommandConfig], path: Path) -> dict:
    """The values of a TOML file (keys: field names, ``-`` or ``_``); unknown keys are kept for pydantic to refuse.

    Raises:
        ToolkitError: no such file, unreadable, or not TOML.
    """
    try:
        import tomllib
    except ImportError:  # Python 3.10: the backport pydantic-settings reads with
        import tomli as tomllib

    if not path.is_file():
        raise ToolkitError(f"--config {path}: no such file")
    try:
        values = TomlConfigSettingsSource(cls, toml_file=path)()
    except tomllib.TOMLDecodeError as e:
        raise ToolkitError(f"--config {path}: not valid TOML ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ToolkitError(f"--config {path}: cannot be read ({e})") from None
    return {str(k).replace("-", "_"): v for k, v in values.items()}


C = TypeVar("C", bound=CommandConfig)


def load_config(cls: type[C], given: dict[str, Any], config_file: Path | None = None) -> C:
    """Collect a command's options and validate them: ``given`` (flags from the command line) over
    ``REFUSAL_<FIELD>`` variables over the ``config_file`` TOML values over the fields' defaults.

    Args:
        cls: the command's config model.
        given: values the user gave on the command line, by field name (defaults left out).
        config_file: a TOML file of values, or None.

    Returns:
        The validated config.

    Raises:
        ToolkitError: a bad value from any source, one line naming the flag (and the variable or file it came
            from) and the value; an unknown key in the file; a file that is missing or not TOML.
    """
    file_values = _from_file(cls, Path(config_file)) if config_file is not None else {}
    env_values = _Env(cls, env_prefix=ENV_PREFIX)()
    try:
        return cls.model_validate({**file_values, **env_values, **given})
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] == "extra_forbidden":
            raise ToolkitError(f"--config {config_file}: unknown option {key!r} (keys are option names: "
                               f"{', '.join(cls.model_fields)})") from None
        if key not in cls.model_fields:  # a model-level check (a ``model_validator`` over several options)
            raise ToolkitError(err["msg"].removeprefix("Value error, ")) from None
        field = cls.model_fields[key]
        where = ("" if key in given else f" (from ${env_name(key)})" if key in env_values
                 else f" (from {config_file})" if key in file_values else "")
        own = next((m for m in field.metadata if isinstance(m, Invalid)), None)
        problem = (own.message.format(value=err["input"], choices=", ".join(map(str, _choices(field.annotation))),
                                      bounds=bounds_text(field)) if own is not None
                   else f"{_problem(err, field)}, got {err['input']!r}")
        raise ToolkitError(f"{flag_of(key, field)}{where}: {problem}") from None


def _problem(err: dict, field: FieldInfo) -> str:
    """What a pydantic error says is wrong, in the toolkit's words (``must be a finite number > 0``)."""
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"):
        return "must be " + bounds_text(field)
    if err["type"] == "literal_error":
        return "must be one of " + ", ".join(map(str, _choices(field.annotation)))
    msg = err["msg"]
    return msg[:1].lower() + msg[1:]


def bounds_text(field: FieldInfo) -> str:
    """A field's bounds as the toolkit words them: ``>= 0 and <= 4294967295``, ``a finite number > 0``."""
    finite = any(getattr(m, "allow_inf_nan", True) is False for m in field.metadata)
    parts = [f"{op} {_number(getattr(m, attr))}" for m in field.metadata
             for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if hasattr(m, attr)]
    return " ".join((["a finite number"] if finite else []) + [" and ".join(parts)]).strip()


def _number(x) -> str:
    """An integer as written, a float in its shortest form (``0.5``, ``1e-09``)."""
    return str(x) if isinstance(x, int) else f"{x:g}"


def _choices(annotation) -> tuple:
    """The values of a ``Literal`` (inside an ``Optional`` too); empty when there is none."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    for arg in typing.get_args(annotation):
        if _choices(arg):
            return _choices(arg)
    return ()


# ---------------------------------------------------------------------------------------------- Typer signature
def _cli_type(annotation):
    """The type Typer converts a field's text to: ``Literal`` choices are read as their type (pydantic checks the
    choice), ``Optional`` and ``list`` are kept."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return type(args[0])
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return Optional[_cli_type(inner)]
    if origin is list:
        return list[_cli_type(args[0])]
    return annotation


def _help(field: FieldInfo) -> str:
    """The help text: the description (which names the choices of a ``Literal``), with the bounds appended (the
    checks are pydantic's, so Click does not print its own range). Square brackets are escaped: Typer renders help
    as Rich markup, which would otherwise swallow text such as ``[default: the direction's layer]``."""
    from rich.markup import escape

    bounds = bounds_text(field)
    return escape((field.description or "") + (f" ({bounds})" if bounds else ""))


def parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """The Typer parameter of one config field: its flags, the field's default (shown by ``--help``) and help."""
    cli = cli_of(field)
    default = ... if field.is_required() else field.default
    if cli.argument:
        info = typer.Argument(default, help=_help(field), show_default=False, metavar=cli.metavar)
    else:
        flags = cli.flags or (("--{0}/--no-{0}" if field.annotation is bool and default is True else "--{0}")
                              .format(name.replace("_", "-")),)
        info = typer.Option(default, *flags, help=_help(field))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=_cli_type(field.annotation))


CONFIG_HELP = ("TOML file of option values (keys: option names, e.g. batch_size = 8); flags given here override "
               "$REFUSAL_<OPTION> variables, which override the file")


def command(cls: type[C]) -> Callable[[Callable[[C], Any]], Callable[..., Any]]:
    """Decorate a command body ``fn(cfg)`` into a Typer command whose options are the fields of ``cls``.

    The returned function has a generated ``__signature__`` (each field a ``typer.Option`` or ``typer.Argument``
    with its default and description, in declaration order with the shared options last, plus ``--config``).
    When called by Typer it collects the values given on the command line (Click tells given from default), builds
    the config with :func:`load_config` and calls the body; bad values and the body's :class:`ToolkitError`\\ s
    are one ``error:`` line with exit code 2 (:func:`experiments.shared.errors.handle_errors`).

    Args:
        cls: the command's config model (a :class:`CommandConfig`).

    Raises:
        TypeError: at decoration, a field named ``config_file`` or ``typer_ctx`` (the names the wrapper uses).
    """
    reserved = {"config_file", "typer_ctx"} & set(cls.model_fields)
    if reserved:
        raise TypeError(f"{cls.__name__}: field names {sorted(reserved)} are reserved by experiments.shared.config.command")
    params = [inspect.Parameter("typer_ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
    params += [parameter(n, cls.model_fields[n]) for n in field_order(cls)]
    params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                                    default=typer.Option(None, "--config", help=CONFIG_HELP, dir_okay=False)))

    def decorate(body: Callable[[C], Any]) -> Callable[..., Any]:
        def run(typer_ctx: typer.Context, config_file: Path | None = None, **values):
            given = {k: v for k, v in values.items() if _given(typer_ctx, k)}
            return body(load_config(cls, given, config_file))

        wrapper = handle_errors(run)
        wrapper.__name__, wrapper.__qualname__ = body.__name__, body.__qualname__
        wrapper.__doc__, wrapper.__module__ = body.__doc__, body.__module__
        del wrapper.__wrapped__  # Typer must read the generated signature, not run's
        wrapper.__signature__ = inspect.Signature(params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.config_class = cls
        wrapper.body = body
        return wrapper

    return decorate


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave parameter ``name`` (on the command line, or a prompt), not Click's default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")
