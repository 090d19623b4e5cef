"""Checking YAML values against type hints and allowed values, so schema errors name the key and the fix.

A dataclass field may carry a rule in its hint, ``Annotated[int, at_least(1)]``: a ``Range`` for numbers
or ``Choices`` for names that come from a library (transformers' optimizers).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from adapterhub.errors import did_you_mean


@dataclasses.dataclass(frozen=True)
class Range:
    """Numbers from ``low`` to ``high`` (each end open or closed, either may be absent), plus ``also``.

    A list of numbers passes when every element does; ``None`` (for an optional key) always passes.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[float, ...] = ()

    def allows(self, value: Any) -> bool:
        if value is None or isinstance(value, bool) or not isinstance(value, int | float | list):
            return True  # the type check speaks for these
        if isinstance(value, list):
            return all(self.allows(item) for item in value)
        if value in self.also:
            return True
        if math.isnan(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(["[not self.low_open], ")]"[not self.high_open]
            text = f"in {opening}{_num(self.low)}, {_num(self.high)}{closing}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '≥'} {_num(self.low)}"
        else:
            text = f"{'<' if self.high_open else '≤'} {_num(self.high)}"
        return text + "".join(f" or {_num(value)}" for value in self.also)


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Range:
    return Range(low, high, low_open, high_open)


@dataclasses.dataclass(frozen=True)
class Choices:
    """Names a library defines, read when first checked (``what`` says whose they are)."""

    names: Callable[[], Sequence[str]]
    what: str

    def allows(self, value: Any) -> bool:
        return value in self.names()

    def __str__(self) -> str:
        return f"one of {self.what}"


Rule = Range | Choices


def problem(value: Any, hint: Any, rule: Rule | None = None) -> str | None:
    """Why ``value`` does not fit ``hint`` and ``rule``, as the end of an error line; None if it fits."""
    if not matches(value, hint):
        names = _choice_names(hint)
        hint_text = did_you_mean(value, names) if names and isinstance(value, str) else ""
        return f"expected {describe(hint)}, got {value!r}{hint_text}"
    if rule is None or rule.allows(value):
        return None
    if isinstance(rule, Choices):
        names = rule.names()
        return f"{value!r} is not {rule}{did_you_mean(str(value), names)}; choose from {', '.join(names)}"
    return f"must be {rule}, got {value!r}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as parsed from YAML) fits ``hint``; unfamiliar hints accept anything."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is Annotated:
        return matches(value, get_args(hint)[0])
    if origin in (Union, types.UnionType):
        named = _enum_names(hint)
        if named and isinstance(value, str):
            # ``SomeEnum | str``: PEFT takes the enum's value as a string, and nothing else.
            return value in named
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
    if origin is Annotated:
        return describe(get_args(hint)[0])
    if origin in (Union, types.UnionType):
        named = _enum_names(hint)
        if named:
            return "one of " + ", ".join(named)
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
        hints = typing.get_type_hints(cls, include_extras=True)
    except (NameError, TypeError):
        hints = {}
    return {field.name: hints.get(field.name, Any) for field in dataclasses.fields(cls)}


def field_rule(hint: Any) -> Rule | None:
    """The ``Range`` or ``Choices`` an ``Annotated`` hint carries, if any."""
    if get_origin(hint) is Annotated:
        return next((extra for extra in get_args(hint)[1:] if isinstance(extra, Range | Choices)), None)
    return None


def _choice_names(hint: Any) -> list[str]:
    """The strings a ``Literal`` or an enum in ``hint`` allows, for a "did you mean"."""
    args = get_args(get_args(hint)[0] if get_origin(hint) is Annotated else hint)
    if get_origin(hint) is Literal:
        return [str(arg) for arg in args]
    literals = [str(v) for arg in args if get_origin(arg) is Literal for v in get_args(arg)]
    return literals or _enum_names(hint) or []


def _enum_names(hint: Any) -> list[str] | None:
    """The values of an enum in ``hint`` (alone, or in a union with ``str``): the strings it accepts."""
    args = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    enums = [arg for arg in args if isinstance(arg, type) and issubclass(arg, enum.Enum)]
    if len(enums) != 1:
        return None
    return [str(member.value) for member in enums[0]]
