"""Typer commands generated from the library's option dataclasses, so help and code cannot drift apart.

A command function declares its positional arguments as usual and takes each options dataclass as one parameter
annotated with that class; `command` replaces such a parameter by one flag per dataclass field (name, type,
default and help from `medembed.options.option`) and rebuilds the dataclass, whose own validation then runs,
before calling the function.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable

import typer

from medembed.options import FLAG, HELP, HIDDEN, long_flags, parse_key_values, parse_value

_SIMPLE = (bool, int, float, str, Path)


def _flags(field: dataclasses.Field, kind: Any = None) -> list[str]:
    long = long_flags(field)
    if kind is bool:  # every switch can be turned both ways, whatever its default: --augment/--no-augment
        long = [f"{flag}/--no-{flag.removeprefix('--')}" for flag in long]
    return long + [flag for flag in (field.metadata.get(FLAG) or "").split() if not flag.startswith("--")]


def _cli_type(annotation: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(the type typer parses, a converter to the dataclass field's value) for a field annotation."""
    if annotation in _SIMPLE:
        return annotation, lambda value: value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is dict:
        return list[str] | None, lambda items: parse_key_values(items or [])
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if len(members) == 1 and members[0] in _SIMPLE:
            return members[0] | None, lambda value: value
        # e.g. float | str: given as text, typed as JSON where it parses ("1.5" -> 1.5, "balanced" stays)
        return str | None if type(None) in args else str, lambda value: None if value is None else parse_value(value)
    raise TypeError(f"no CLI type for option annotation {annotation!r}")


def option_parameters(cls: type, skip: tuple[str, ...] = ()) -> tuple[list[inspect.Parameter], dict[str, Callable]]:
    """One keyword parameter (a typer Option) per CLI field of dataclass `cls`, and each field's converter."""
    hints = typing.get_type_hints(cls)
    parameters, converters = [], {}
    for field in dataclasses.fields(cls):
        if not field.metadata.get(HIDDEN, True) or field.name in skip:
            continue
        kind, convert = _cli_type(hints[field.name])
        default = None if field.default is dataclasses.MISSING else field.default
        info = typer.Option(default, *_flags(field, kind), help=field.metadata.get(HELP, ""), show_default=field.default is not dataclasses.MISSING)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=kind))
        converters[field.name] = convert
    return parameters, converters


def command(group: typer.Typer, name: str | None = None, skip: dict[type, tuple[str, ...]] | None = None) -> Callable:
    """Register `function` on `group` with its dataclass-typed parameters expanded into flags (see the module doc).

    `skip` names fields of an options class that the command sets itself (they get no flag)."""

    def register(function: Callable) -> Callable:
        signature = inspect.signature(function, eval_str=True)
        parameters: list[inspect.Parameter] = []
        groups: dict[str, tuple[type, dict[str, Callable]]] = {}
        for parameter in signature.parameters.values():
            if dataclasses.is_dataclass(parameter.annotation):
                cls = parameter.annotation
                expanded, converters = option_parameters(cls, (skip or {}).get(cls, ()))
                clash = {p.name for p in expanded} & {p.name for p in parameters}
                if clash:
                    raise TypeError(f"{function.__name__}: options {sorted(clash)} appear twice")
                parameters += expanded
                groups[parameter.name] = (cls, converters)
            else:  # keyword-only like the generated flags, so a dataclass group may stand anywhere in the signature
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(function)
        def run(**values: Any) -> Any:
            for parameter_name, (cls, converters) in groups.items():
                values[parameter_name] = cls(**{field: convert(values.pop(field)) for field, convert in converters.items()})
            return function(**values)

        run.__signature__ = signature.replace(parameters=parameters)
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must see the generated signature, not the function's own
        group.command(name)(run)
        return function

    return register
