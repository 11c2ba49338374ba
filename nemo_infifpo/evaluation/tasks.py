"""Task names checked against lm-eval's registry before any model or data set is loaded.

The registry is built from YAML files only (lm-eval's own tasks plus ``include_path``), so the
check needs no network. Whether a task executes model-written code is read from its YAML
(``unsafe_code``), also without importing the task's Python helpers — some of those fetch
metrics from the Hub when imported.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_infifpo.evaluation.config import ConfigError

__all__ = ["check_tasks", "task_manager"]


def task_manager(include_path: Sequence[str]) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def check_tasks(manager: Any, tasks: Sequence[str], *, confirm_run_unsafe_code: bool) -> None:
    """Raise :class:`ConfigError` for a task lm-eval does not know, or for a code-executing task
    without the explicit opt-in."""
    known = manager.all_tasks
    for i, task in enumerate(tasks):
        if task in known:
            continue
        close = difflib.get_close_matches(task, known, n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(f"tasks[{i}]: {task!r} is not an lm-eval task, group or tag{hint}; add its YAML with include_path")
    if confirm_run_unsafe_code:
        return
    for task in tasks:
        culprit = _unsafe_member(manager.task_index, task, seen=set())
        if culprit is not None:
            member = "" if culprit == task else f" (its member {culprit!r})"
            raise ConfigError(
                f"tasks: {task!r}{member} executes model-written code; set confirm_run_unsafe_code=true "
                "(and HF_ALLOW_CODE_EVAL=1) to run it"
            )


def _unsafe_member(index: dict[str, Any], name: str, *, seen: set[str]) -> str | None:
    """The first task under ``name`` (itself, a group's member, a tag's task) marked unsafe."""
    if name in seen or name not in index:
        return None
    seen.add(name)
    entry = index[name]
    config = _raw_yaml(entry.yaml_path) if entry.yaml_path else (entry.cfg or {})
    if config.get("unsafe_code"):
        return name
    members = config.get("task") if "group" in config else None
    children = [m if isinstance(m, str) else m.get("task") for m in members] if isinstance(members, list) else []
    tagged = [n for n, e in index.items() if name in (getattr(e, "tags", None) or ())]
    for child in [c for c in children if isinstance(c, str)] + tagged:
        culprit = _unsafe_member(index, child, seen=seen)
        if culprit is not None:
            return culprit
    return None


def _raw_yaml(path: str | Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(path, resolve_func=False)
