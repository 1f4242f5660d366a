"""`key=value` overrides, type-checked against the experiment's fields before any work starts."""

from __future__ import annotations

import dataclasses
import inspect
import typing

from evaluators import EVALUATORS
from harness.core.errors import ConfigError
from harness.training.experiment import Experiment, field_help
from harness.training.settings import check_settings

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def field_types(cls: type[Experiment]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "evaluator_options"}


def evaluator_option_types(name: str) -> dict[str, type]:
    """The keyword options of an evaluator's constructor, with their types."""
    hints = typing.get_type_hints(EVALUATORS[name].__init__)
    return {k: v for k, v in hints.items() if k != "return"}


def describe_fields(cls: type[Experiment]) -> str:
    """Every field with its type, default and help, one a line, then the evaluator options."""
    types = field_types(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name in types]
    decls = [f"{f.name}: {type_name(types[f.name])} = {field_default(f)!r}" for f in fields]
    width = max(map(len, decls))
    lines = [f"  {decl:<{width}}  # {field_help(f)}" for decl, f in zip(decls, fields, strict=True)]
    options = [f"{name}_<{'|'.join(evaluator_option_types(name))}>" for name in EVALUATORS
               if evaluator_option_types(name)]
    lines.append("  evaluator options (`harness show NAME` lists them; docs/reference/fields.md): "
                 + "; ".join(options))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting as `harness show` and the documentation's field reference list it: its command-line key, type
    name, default as written on the command line, and help ("" for an evaluator option, which has none)."""

    key: str
    type: str
    default: str
    help: str = ""


def field_settings(cls: type[Experiment]) -> list[Setting]:
    """Every field of `cls` that the command line sets, in declaration order."""
    types = field_types(cls)
    return [Setting(f.name, type_name(types[f.name]), cli_value(field_default(f)), field_help(f))
            for f in dataclasses.fields(cls) if f.name in types]


def evaluator_option_settings(name: str) -> list[Setting]:
    """The options of evaluator `name`, each under its command-line key `<evaluator>_<option>`."""
    defaults = inspect.signature(EVALUATORS[name].__init__).parameters
    return [Setting(f"{name}_{option}", type_name(tp), cli_value(defaults[option].default))
            for option, tp in evaluator_option_types(name).items()]


def cli_value(value) -> str:
    """A value as it is written on the command line (`key=value`)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(cli_value, value))
    return '""' if value == "" else str(value)


def field_default(f: dataclasses.Field):
    """A field's default value (a fresh one for a default factory)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp).replace("typing.", "")


def parse_value(raw: str, tp, key: str):
    args = typing.get_args(tp)
    if type(None) in args:  # Optional[X]: parse as X
        (tp,) = [a for a in args if a is not type(None)]
    if tp is bool:
        low = raw.lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(f"expects bool (true/false), got {raw!r}")
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expects int, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expects float, got {raw!r}") from None
    if tp is str:
        return raw
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return [parse_value(part.strip(), inner, key) for part in raw.split(",") if part.strip()]
    raise ValueError(f"has a type ({tp}) that cannot be set from the command line")


def apply_overrides(cls: type[Experiment], args: list[str], launch: str | None = None,
                    sweep: bool = False) -> Experiment:
    """The experiment from `key=value` strings, checked by `check_settings` for how it will be started (`launch`,
    `sweep`); raise ConfigError naming the problem (a bad key or type also lists the valid fields)."""
    return check_settings(build_experiment(cls, args), launch, sweep)


def build_experiment(cls: type[Experiment], args: list[str]) -> Experiment:
    """The experiment from typed `key=value` strings, without the settings check (a rank of a launched run: its
    parent checked the same settings)."""
    values, options = parse_overrides(cls, args)
    return cls(**values, evaluator_options=options) if options else cls(**values)


def parse_overrides(cls: type[Experiment], args: list[str]) -> tuple[dict, dict[str, dict]]:
    """Typed field values and evaluator options ({evaluator: {option: value}}) from `key=value` strings."""
    types = field_types(cls)
    values: dict = {}
    options: dict[str, dict] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {arg!r} is not key=value.\nValid fields of {cls.name()}:\n{describe_fields(cls)}"
            )
        option = _evaluator_option(key) if key not in types else None
        if key not in types and option is None:
            raise ConfigError(f"unknown field {key!r} for {cls.name()}.\nValid fields:\n{describe_fields(cls)}")
        try:
            if option is None:
                values[key] = parse_value(raw, types[key], key)
            else:
                evaluator, name, tp = option
                options.setdefault(evaluator, {})[name] = parse_value(raw, tp, key)
        except ValueError as e:
            raise ConfigError(f"field {key!r} {e}.\nValid fields of {cls.name()}:\n{describe_fields(cls)}") from None
    return values, options


def _evaluator_option(key: str) -> tuple[str, str, type] | None:
    """`humaneval_n` -> ("humaneval", "n", int) when `n` is an option of the humaneval evaluator."""
    for name in EVALUATORS:
        option = key.removeprefix(f"{name}_")
        if option != key and option in evaluator_option_types(name):
            return name, option, evaluator_option_types(name)[option]
    return None
