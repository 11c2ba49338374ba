"""The options of ``recipes/evaluate.py``, parsed strictly before anything is loaded.

Every mistake raises :class:`ConfigError` whose one-line message names the key
(``models[1].path``, ``backend``) and what would be accepted. ``configs/evaluate.yaml`` documents
each key.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BACKENDS", "DTYPES", "ConfigError", "EvalConfig", "ModelSpec", "parse_eval_config"]

BACKENDS: tuple[str, ...] = ("hf", "vllm")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
# Model names become directory names and table headers.
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_TOP_LEVEL_KEYS = (
    "models",
    "model",
    "tasks",
    "primary_metrics",
    "num_fewshot",
    "limit",
    "batch_size",
    "backend",
    "dtype",
    "device",
    "model_args",
    "include_path",
    "apply_chat_template",
    "confirm_run_unsafe_code",
    "bootstrap_iters",
    "log_samples",
    "output_dir",
)
_MODEL_KEYS = ("name", "path")


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str


@dataclass(frozen=True)
class EvalConfig:
    models: tuple[ModelSpec, ...]
    tasks: tuple[str, ...]
    output_dir: str
    primary_metrics: Mapping[str, str] = field(default_factory=dict)
    num_fewshot: int | None = None
    limit: int | float | None = None
    batch_size: int | str = 8
    backend: str = "hf"
    dtype: str = "auto"
    device: str | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    include_path: tuple[str, ...] = ()
    apply_chat_template: bool = True
    confirm_run_unsafe_code: bool = False
    bootstrap_iters: int = 100000
    log_samples: bool = False


def parse_eval_config(raw: Mapping[str, Any]) -> EvalConfig:
    """Validate a plain mapping (the resolved Hydra config) into an :class:`EvalConfig`.

    Checks only what needs no lm-eval and no model: names, types, allowed values, that model
    directories and include paths exist.
    """
    _reject_unknown(raw, _TOP_LEVEL_KEYS, prefix="")
    models = _parse_models(raw.get("models"), raw.get("model"))
    tasks = _parse_tasks(raw.get("tasks"))
    output_dir = raw.get("output_dir")
    if output_dir in (None, "", "???"):
        raise ConfigError("mandatory config key 'output_dir' is not set (pass output_dir=DIR)")

    backend = str(raw.get("backend", "hf"))
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    dtype = str(raw.get("dtype", "auto"))
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")

    return EvalConfig(
        models=models,
        tasks=tasks,
        output_dir=str(output_dir),
        primary_metrics=_parse_primary_metrics(raw.get("primary_metrics")),
        num_fewshot=_optional_int(raw.get("num_fewshot"), "num_fewshot", minimum=0),
        limit=_parse_limit(raw.get("limit")),
        batch_size=_parse_batch_size(raw.get("batch_size", 8)),
        backend=backend,
        dtype=dtype,
        device=None if raw.get("device") is None else str(raw["device"]),
        model_args=_parse_mapping(raw.get("model_args"), "model_args"),
        include_path=_parse_include_path(raw.get("include_path")),
        apply_chat_template=_bool(raw.get("apply_chat_template", True), "apply_chat_template"),
        confirm_run_unsafe_code=_bool(raw.get("confirm_run_unsafe_code", False), "confirm_run_unsafe_code"),
        bootstrap_iters=_optional_int(raw.get("bootstrap_iters", 100000), "bootstrap_iters", minimum=0) or 0,
        log_samples=_bool(raw.get("log_samples", False), "log_samples"),
    )


# --------------------------------------------------------------------------- parts


def _reject_unknown(values: Mapping[str, Any], allowed: Sequence[str], *, prefix: str) -> None:
    for key in values:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}; allowed: {', '.join(allowed)}")


def _parse_models(models: Any, model: Any) -> tuple[ModelSpec, ...]:
    single = model or {}
    if not isinstance(single, Mapping):
        raise ConfigError(f"model must be a mapping with keys name, path; got {single!r}")
    _reject_unknown(single, _MODEL_KEYS, prefix="model.")
    has_single = single.get("path") not in (None, "", "???")
    models = list(models or [])
    if models and has_single:
        raise ConfigError("set either models=[...] or model.path, not both")
    if not models and not has_single:
        raise ConfigError("no model to evaluate: pass model.path=DIR or models=[{name: NAME, path: DIR}, ...]")
    entries = [(f"models[{i}].", m) for i, m in enumerate(models)] if models else [("model.", single)]

    specs: list[ModelSpec] = []
    for prefix, entry in entries:
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{prefix[:-1]} must be a mapping with keys name, path; got {entry!r}")
        _reject_unknown(entry, _MODEL_KEYS, prefix=prefix)
        path = entry.get("path")
        if path in (None, "", "???"):
            raise ConfigError(f"mandatory config key '{prefix}path' is not set")
        directory = Path(str(path))
        if not (directory / "config.json").is_file():
            raise ConfigError(f"{prefix}path: {directory} is not a Hugging Face model directory (no config.json)")
        name = str(entry.get("name") or directory.resolve().name)
        if not _NAME_PATTERN.match(name):
            raise ConfigError(f"{prefix}name must be letters, digits, '.', '_' or '-' (it names a directory); got {name!r}")
        specs.append(ModelSpec(name=name, path=str(directory)))

    names = [s.name for s in specs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"models: the name {duplicate!r} is used twice; give each model its own name")
    return tuple(specs)


def _parse_tasks(tasks: Any) -> tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    if not tasks or not isinstance(tasks, Sequence):
        raise ConfigError("tasks must be a non-empty list of lm-eval task or group names")
    names = []
    for i, task in enumerate(tasks):
        if not isinstance(task, str) or not task.strip():
            raise ConfigError(f"tasks[{i}] must be a task name, got {task!r}")
        names.append(task.strip())
    duplicate = next((t for t in names if names.count(t) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"tasks: {duplicate!r} is listed twice")
    return tuple(names)


def _parse_primary_metrics(value: Any) -> dict[str, str]:
    mapping = _parse_mapping(value, "primary_metrics")
    for task, metric in mapping.items():
        if not isinstance(metric, str) or "," not in metric:
            raise ConfigError(
                f"primary_metrics.{task} must be lm-eval's 'metric,filter' key (e.g. 'acc,none'), got {metric!r}"
            )
    return {str(k): str(v) for k, v in mapping.items()}


def _parse_limit(value: Any) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"limit must be a number of samples per task, or a fraction in (0, 1); got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            raise ConfigError(f"limit as a fraction must be in (0, 1), got {value}")
        return value
    if value < 1:
        raise ConfigError(f"limit must be >= 1 samples per task (or a fraction in (0, 1)), got {value}")
    return int(value)


def _parse_batch_size(value: Any) -> int | str:
    if isinstance(value, str) and value.startswith("auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"batch_size must be a positive integer or 'auto', got {value!r}")
    return value


def _parse_include_path(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    paths = [value] if isinstance(value, str) else list(value)
    for i, path in enumerate(paths):
        if not Path(str(path)).exists():
            key = "include_path" if isinstance(value, str) else f"include_path[{i}]"
            raise ConfigError(f"{key}: {path} does not exist (a directory of lm-eval task YAML files)")
    return tuple(str(p) for p in paths)


def _parse_mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return dict(value)


def _optional_int(value: Any, key: str, *, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum} (or null), got {value!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value
