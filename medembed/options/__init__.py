"""Option dataclasses as the one description of what a command can be told.

Each field is declared with `option(default, "help")`: the CLI builds its flags from these fields (name, type,
default, help), so `--help` and the code cannot disagree. `parse_key_values` is the one `key=value` parser for
open-ended parameters (head hyperparameters, encoder options).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

from medembed.errors import MedembedError

HELP = "help"
FLAG = "flag"  # a short flag such as "-p"
HIDDEN = "cli"  # False: the field is library-only (not a CLI flag)


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, cli: bool = True, factory: Any = None) -> Any:
    """A dataclass field with its CLI help text (and optional short flag); `factory` for mutable defaults."""
    metadata = {HELP: help, FLAG: flag, HIDDEN: cli}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def long_flags(field: dataclasses.Field) -> list[str]:
    """The option's long CLI flags: those its `flag` declares, or `--field-name` (what the CLI, the API's keyword
    names and the help all derive from)."""
    declared = (field.metadata.get(FLAG) or "").split()
    return [flag for flag in declared if flag.startswith("--")] or ["--" + field.name.replace("_", "-")]


def parse_value(text: str) -> Any:
    """A `key=value` value typed as JSON where it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_key_values(items: Iterable[str], what: str = "parameter", *, typed: bool = True) -> dict[str, Any]:
    """`["a=1", "b=[2,3]", "c=x"]` -> `{"a": 1, "b": [2, 3], "c": "x"}` (values kept as text when not `typed`,
    e.g. column names); a malformed item is a MedembedError."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise MedembedError(f"{what} {item!r}: expected key=value")
        parsed[key.strip()] = parse_value(value) if typed else value
    return parsed


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise MedembedError unless `value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise MedembedError(f"option {name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_positive(name: str, value: Any, *, minimum: float = 1, allow_none: bool = False, integer: bool = True) -> None:
    """Raise MedembedError unless `value` is a number >= minimum (an int when `integer`), or None when allowed."""
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value < minimum:
        noun = "an integer" if integer else "a number"
        raise MedembedError(f"option {name} must be {noun} >= {minimum}; got {value!r}")


def replace_options(options: Any, **changes: Any) -> Any:
    """`dataclasses.replace`, which re-runs the options' validation."""
    return dataclasses.replace(options, **changes)


def from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Options of dataclass `cls` from a stored dict (e.g. run.json); unknown or invalid keys name `where`."""
    if not isinstance(values, dict):
        raise MedembedError(f"{where}: expected an object of options, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise MedembedError(f"{where}: unknown option(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, MedembedError) as error:
        raise MedembedError(f"{where}: {error}") from None
