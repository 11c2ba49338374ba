"""Checking single option values of a stage's config, with errors naming the dotted key.

Shared by the scoring job's options and the data-construction stages' :class:`~nemo_infifpo.
generation.options.Options`, so the same value is accepted, and refused with the same
message, by every stage.
"""

from __future__ import annotations

from typing import Any

from nemo_infifpo.data.errors import ConfigError

__all__ = ["as_boolean", "as_integer", "as_number", "as_optional_integer"]


def as_integer(key: str, value: Any) -> int:
    # bool is an int subclass; "8" from a shell is fine, "eight" is not.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {value!r}") from None


def as_optional_integer(key: str, value: Any) -> int | None:
    return None if value is None else as_integer(key, value)


def as_number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}") from None


def as_boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
