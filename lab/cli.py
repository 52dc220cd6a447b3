"""The command line's one vocabulary: a verb's flags are its config dataclass's fields.

Each field declared with `param(default, "help")` becomes `--field-name` with that help: a bool is
`--flag` / `--no-flag`, a tuple takes a comma list (`--seeds 1,2,3`), `none` gives an optional field
None, and a field with choices lists them. A field that holds another config (the experiment's
`pretrain` and `finetune`) gives dotted flags, one per field of that config: `--pretrain.steps 300`.
`--config FILE.json` supplies values that flags override, nested configs as nested objects
(`{"pretrain": {"steps": 300}}`). A field's resume rule is written on it too:
`param(..., may_change_on_resume=True)` marks a setting a run may be resumed or reused with after a
change (`may_change_on_resume(cls)` lists them for the resume checks).
A verb runs through `run_verb`: an error a user can cause (a bad value, a missing file) exits
USER_ERROR with one `error:` line, an interrupt exits INTERRUPTED.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lab.util import replace_strict

T = TypeVar("T")
USER_ERROR = 2  # argparse's own code for a bad command line; every verb uses it for a user's error
INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C
_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def param(
    default: Any = dataclasses.MISSING,
    help: str = "",
    choices: Sequence | None = None,
    may_change_on_resume: bool = False,
) -> Any:
    """A config field with its command-line help (and, optionally, its allowed values, and whether a
    finished or interrupted run may be resumed or reused after it changed):
    `steps: int = param(2000, "optimizer steps", may_change_on_resume=True)`."""
    metadata = {"help": help, "choices": choices, "may_change_on_resume": may_change_on_resume}
    return dataclasses.field(default=default, metadata=metadata)


def may_change_on_resume(cls: Any) -> frozenset[str]:
    """The fields of a config (class or instance) marked `may_change_on_resume`."""
    return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("may_change_on_resume"))


def check_choices(cfg: Any) -> None:
    """Raise ValueError, naming the field and its allowed values, for a value outside its `choices`."""
    for field in dataclasses.fields(cfg):
        allowed = field.metadata.get("choices")
        if allowed is not None and getattr(cfg, field.name) not in allowed:
            raise ValueError(
                f"{type(cfg).__name__}.{field.name}={getattr(cfg, field.name)!r}; choose one of {tuple(allowed)}"
            )


def _converter(field: dataclasses.Field) -> Callable[[str], Any] | None:
    """str -> the field's value, from its annotation (a string under `from __future__ import annotations`);
    None for a field the command line does not set (a nested config)."""
    text = str(field.type).replace(" ", "")
    optional = text.endswith("|None")
    text = text.removesuffix("|None")
    many = text.startswith("tuple[")
    scalar = _SCALARS.get(text[len("tuple[") :].split(",")[0].rstrip("]") if many else text)
    if scalar is None:
        return None

    def convert(value: str) -> Any:
        if optional and value.lower() == "none":
            return None
        if many:
            return tuple(scalar(v.strip()) for v in value.split(",") if v.strip())
        return scalar(value)

    convert.__name__ = text  # argparse names the type in its "invalid value" message
    return convert


def config_parser(
    cls: type, prog: str, description: str, per_run: Sequence[str] = ()
) -> argparse.ArgumentParser:
    """An argparse parser with one --flag per field of the dataclass `cls` (unknown flags are rejected).
    A flag not given leaves the field out of the parsed namespace, so the config's default stands.
    `per_run`: dotted names of nested fields the verb sets itself for each run (no flag)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="JSON", help="JSON file of field values (flags override it)")
    _add_flags(parser, cls, None, "", set(per_run))
    return parser


def _add_flags(parser, cls: type, defaults: Any, prefix: str, per_run: set[str]) -> None:
    """One flag per field of `cls`; a field whose default is a config gets a group of dotted flags.
    `defaults`: the instance whose values the help shows (a nested config's are its parent's)."""
    for field in dataclasses.fields(cls):
        default = field.default if defaults is None else getattr(defaults, field.name)
        if prefix + field.name in per_run:
            continue
        if dataclasses.is_dataclass(default):
            group = parser.add_argument_group(f"--{prefix}{field.name}.*", field.metadata.get("help"))
            _add_flags(group, type(default), default, f"{prefix}{field.name}.", per_run)
            continue
        convert = _converter(field)
        if convert is None:
            continue
        flag = "--" + prefix + field.name.replace("_", "-")
        dest = prefix + field.name
        help_ = field.metadata.get("help") or None
        choices = field.metadata.get("choices")
        if help_ and default is not dataclasses.MISSING:
            help_ += f" [{_shown(default)}]"
        if convert.__name__ == "bool":
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, help=help_)
        else:
            metavar = "|".join(choices) if choices else convert.__name__.split("[")[0].upper()
            parser.add_argument(flag, dest=dest, type=convert, choices=choices, metavar=metavar, help=help_)


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default)) or "none"
    return repr(default) if default == "" else str(default)


def parse_values(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    """The field values `argv` gives: --config's JSON, then the flags given on top; a nested config's
    values under dotted keys ("pretrain.steps")."""
    values = vars(parser.parse_args(argv))
    path = values.pop("config", None)
    if path is None:
        return values
    try:
        return {**dotted(json.loads(Path(path).read_text())), **values}
    except (OSError, ValueError) as err:
        parser.error(f"--config {path}: {err}")


def dotted(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested values as dotted keys: {"pretrain": {"steps": 3}} -> {"pretrain.steps": 3}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(dotted(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def parse_config(cls: type[T], parser: argparse.ArgumentParser, argv: list[str], base: T | None = None) -> T:
    """The config that `argv` describes: `base` (default: cls()) with --config's JSON and the flags on top.
    A value the config refuses ends in parser.error (exit USER_ERROR, the refusal as its message)."""
    values = parse_values(parser, argv)
    try:
        return replace_strict(cls() if base is None else base, **values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))


def run_verb(action: Callable[[], int | None], errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run a verb's `action` under the one exit-code convention: its own code (None = 0), USER_ERROR with
    an `error:` line for ValueError, FileNotFoundError or one of `errors`, INTERRUPTED on Ctrl-C."""
    try:
        return action() or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except (ValueError, FileNotFoundError, *errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR
