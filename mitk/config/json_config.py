"""The JSON round-trip every mitk config shares: frozen, validated, unknown keys refused."""

from __future__ import annotations

from dataclasses import MISSING, asdict, fields
import json
from typing import Any, ClassVar, get_args

from typing_extensions import Self

from mitk.errors import ConfigError


class JsonConfig:
    """Mixin for frozen, validated dataclass configs: dict/JSON round-trip and ``replace``.

    ``from_dict`` refuses unknown and missing required keys with ``ConfigError``,
    so a typo in a JSON file is reported instead of silently dropped. Fields in
    ``PLACEMENT_FIELDS`` describe where an object lives now, not what it is: they
    take no part in ``==`` and ``to_json`` leaves them out.
    """

    PLACEMENT_FIELDS: ClassVar[tuple[str, ...]] = ()

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated again."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self, *, placement: bool = True) -> dict[str, Any]:
        """Plain-JSON dict of every field; ``placement=False`` leaves out where it lives.

        Fingerprints (activation stores, sweeps) use ``placement=False``, so a run
        started on one device resumes on another.
        """
        data: dict[str, Any] = asdict(self)  # type: ignore[call-overload]
        if not placement:
            data = {k: v for k, v in data.items() if k not in self.PLACEMENT_FIELDS}
        return data

    def to_json(self) -> str:
        """Indented JSON without placement fields; ``from_json(cfg.to_json()) == cfg``."""
        return json.dumps(self.to_dict(placement=False), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """Build from a dict; unknown or missing required keys raise ``ConfigError``."""
        what = cls.__name__
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {what} field(s): {', '.join(unknown)}")
        required = [
            f.name
            for f in fields(cls)  # type: ignore[arg-type]
            if f.default is MISSING and f.default_factory is MISSING and f.name not in data
        ]
        if required:
            raise ConfigError(f"missing {what} field(s): {', '.join(required)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Inverse of ``to_json``."""
        return cls.from_dict(json_object(text, "config"))


def json_object(text: str, source: str) -> dict[str, Any]:
    """Parse ``text`` as a JSON object; ``ConfigError`` naming ``source`` if it is not one."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a JSON object, not {type(data).__name__}")
    return data


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` for a field that is not a positive int (a bool is not one)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive int, got {value!r}")


def check_choices(config: Any, choices: dict[str, Any]) -> None:
    """Raise ``ConfigError`` for a field whose value is not among its Literal's options."""
    for name, literal in choices.items():
        value = getattr(config, name)
        if value not in get_args(literal):
            raise ConfigError(f"{name} must be one of {get_args(literal)}, got {value!r}")
