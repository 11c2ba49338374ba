"""Reading the nested Hydra options of the data-construction stages, with errors naming the key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemo_infifpo.data.errors import ConfigError
from nemo_infifpo.option_values import as_boolean, as_number, as_optional_integer

__all__ = ["Options"]

_MISSING = (None, "", "???")


class Options:
    """A plain-dict view of a stage's config; every accessor names the dotted key on error."""

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.cfg
        parts = key.split(".")
        for depth, part in enumerate(parts):
            if node is None:
                return default
            if not isinstance(node, Mapping):
                raise ConfigError(f"{'.'.join(parts[:depth])} must be a mapping of options, got {node!r}")
            if part not in node:
                return default
            node = node[part]
        return default if node is None else node

    def required(self, *keys: str) -> None:
        missing = [key for key in keys if self.get(key) in _MISSING]
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, default)
        return None if value is None else str(value)

    def integer(self, key: str, default: int | None = None) -> int | None:
        return as_optional_integer(key, self.get(key, default))

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key, default)
        return None if value is None else as_number(key, value)

    def boolean(self, key: str, default: bool) -> bool:
        return as_boolean(key, self.get(key, default))

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a mapping, e.g. {key}={{name:value}}, got {value!r}")
        return dict(value)

    def paths(self, key: str) -> list[str]:
        value = self.get(key, [])
        if isinstance(value, (str, Path)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"{key} must be a non-empty list of directories, e.g. {key}=[DIR,DIR], got {value!r}")
        return [str(v) for v in value]

    def shard(self) -> tuple[int | None, int]:
        count = self.integer("shard.count", 1)
        index = self.integer("shard.index")
        assert count is not None
        if count < 1:
            raise ConfigError(f"shard.count must be >= 1, got {count}")
        if index is not None and not 0 <= index < count:
            raise ConfigError(f"shard.index must be in [0, {count}), got {index}")
        return index, count
