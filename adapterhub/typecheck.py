"""Checking plain YAML values against type hints, so schema errors name the key and the expected type."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML) fits ``hint``; unfamiliar hints accept anything."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if origin in (list, tuple):
        args = get_args(hint)
        return isinstance(value, list) and (not args or all(matches(item, args[0]) for item in value))
    if origin is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {member.value for member in hint} or isinstance(value, hint)
    if hint in (str, dict, list):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """A short human name for a type hint, e.g. ``int``, ``str or null``, ``one of a, b``."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(map(str, get_args(hint)))
    if hint is type(None):
        return "null"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(str(member.value) for member in hint)
    return getattr(hint, "__name__", str(hint)).replace("typing.", "")


def field_hints(cls: type) -> dict[str, Any]:
    """Type hints of a dataclass's fields, resolved (tolerating hints that fail to resolve)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(cls)}
