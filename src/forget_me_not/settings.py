"""Config dataclasses that carry their own help, and reading them from recipes and `--set`.

A method's config is a dataclass whose fields are declared with `setting(default, help)`. This
module turns a mapping (a recipe's YAML, `--set KEY=VALUE` pairs) into such a config, checking
each key and type first, with errors that name the key, the source and the valid keys.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import yaml

from forget_me_not.errors import FmnError

T = TypeVar("T")


def setting(default: Any, help: str, choices: Iterable[str] = ()) -> Any:
    """A config field with its help text (and the strings it may take)."""
    meta = {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: tuple(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) for every field of a config class, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return out


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    options = tuple(choices)
    if value not in options:
        raise FmnError(f"unknown {name} {value!r}: use one of {', '.join(options)}")


def check_number(name: str, value: float | None, *, low: float = 0.0, strict: bool = False,
                 high: float | None = None, optional: bool = False) -> None:
    """A finite number >= low (> low with `strict`, <= high when given); None if `optional`."""
    if value is None and optional:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        sign = ">" if strict else ">="
        top = f" and <= {high}" if high is not None else ""
        raise FmnError(f"{name} must be a number {sign} {low}{top}, got {value}")


def build(cls: type[T], values: Mapping[str, Any], source: str) -> T:
    """`cls(**values)` with every key and type checked first; errors name `source`."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints or key not in names:
            raise FmnError(f"{source}: unknown setting {key!r} for {cls.__name__}; valid keys: "
                           f"{', '.join(names)}")
        kwargs[key] = coerce(key, value, hints[key], source)
    try:
        return cls(**kwargs)
    except FmnError as err:
        if str(err).startswith(source):
            raise
        raise FmnError(f"{source}: {err}") from None


def override(config: T, pairs: Iterable[str], source: str = "--set") -> T:
    """A copy of `config` with `KEY=VALUE` pairs applied (values read as YAML scalars/lists)."""
    values = dict(parse_pair(p, source) for p in pairs)
    if not values:
        return config
    current = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return build(type(config), {**current, **values}, source)


def parse_pair(pair: str, source: str = "--set") -> tuple[str, Any]:
    key, sep, text = pair.partition("=")
    if not sep or not key.strip():
        raise FmnError(f"{source} {pair!r} is not KEY=VALUE: write e.g. --set lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """`value` as the field's type, or a one-line error naming the key and the source."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0], source)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(coerce(key, v, args[0] if args else str, source) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise FmnError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
