"""Checking config values against their dataclass annotations before anything computes with them.

A JSON file (or a converter fed a hostile ``config.json``) can put ``"64"``, a list,
``true`` or ``NaN`` where a size or an epsilon belongs; without this check such a
value surfaces later as a ``TypeError`` deep in the model. Sizes also get an upper
bound of plausibility, so a ``10**9``-layer config is refused by name at once.
"""

from __future__ import annotations

from functools import cache
import math
import numbers
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mitk.errors import ConfigError

MAX_SIZE = 2**26
"""Largest plausible size field (width, layers, heads, vocabulary, context): about 67M."""


@cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be resolved is not checked
        return {}


def check_types(cls: type, values: dict[str, Any], prefix: str = "") -> None:
    """Raise ``ConfigError`` naming the first field of ``values`` whose type ``cls`` refuses.

    Ints are integers but not bools; floats are finite real numbers (ints included);
    ``list[int]`` accepts lists and tuples; unknown annotations are not checked.
    """
    hints = _hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is not None and not matches(value, hint):
            raise ConfigError(f"{prefix}{name} must be {describe(hint)}, got {value!r}")


def check_sizes(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` for a size field above ``MAX_SIZE`` (an implausible model)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, int) and value > MAX_SIZE:
            raise ConfigError(f"{name}={value} is implausibly large (limit {MAX_SIZE})")


def matches(value: Any, hint: Any) -> bool:
    """True when ``value`` fits the annotation ``hint`` (see ``check_types``)."""
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return (
            isinstance(value, numbers.Real)
            and not isinstance(value, bool)
            and math.isfinite(float(value))
        )
    if hint is str:
        return isinstance(value, str)
    if hint is type(None):
        return value is None
    if origin is Literal:
        return isinstance(value, str | int | float | bool | None) and value in get_args(hint)
    if origin in (Union, types.UnionType):
        return any(matches(value, arg) for arg in get_args(hint))
    if origin in (list, tuple):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return isinstance(value, list | tuple) and all(
            matches(item, args[0]) for item in value if args
        )
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe(hint: Any) -> str:
    """A short English name for an annotation, for error messages."""
    origin = get_origin(hint)
    if hint is int:
        return "an int"
    if hint is float:
        return "a finite number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is type(None):
        return "null"
    if origin is Literal:
        return f"one of {get_args(hint)}"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in get_args(hint))
    if origin in (list, tuple):
        args = [a for a in get_args(hint) if a is not Ellipsis]
        return f"a list of {getattr(args[0], '__name__', args[0])}" if args else "a list"
    if origin is dict:
        return "an object"
    return getattr(hint, "__name__", str(hint))
