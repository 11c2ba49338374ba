"""The comparison table: a column per model, a row per task metric, the average, and each
model's difference to the first one (the baseline, e.g. the initial pivot).

Values are lm-eval's own (fractions for accuracies); the Markdown shows fractions in [0, 1] as
percentages, like the paper. The average is over one *primary* metric per task — the
``primary_metrics`` entry for the task, else the first metric lm-eval reports for it — and
only over tasks every model has, so models stay comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["build_summary", "render_markdown"]


def build_summary(
    results: Mapping[str, Mapping[str, Any]],
    tasks: Sequence[str],
    primary_metrics: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``results``: model name -> lm-eval results dict, in column order (the first is the baseline)."""
    primary_metrics = primary_metrics or {}
    models = list(results)
    baseline = models[0]
    rows: list[dict[str, Any]] = []
    primaries: dict[str, str] = {}
    for task in tasks:
        per_model = {m: _task_metrics(results[m], task) for m in models}
        keys: list[str] = []
        for metrics in per_model.values():
            keys += [k for k in metrics if k not in keys]
        if not keys:
            continue
        primaries[task] = primary_metrics.get(task, keys[0])
        for key in keys:
            values = {m: per_model[m].get(key, {}).get("value") for m in models}
            rows.append(
                {
                    "task": task,
                    "metric": key,
                    "primary": key == primaries[task],
                    "values": values,
                    "stderr": {m: per_model[m].get(key, {}).get("stderr") for m in models},
                    "delta": _deltas(values, baseline),
                }
            )

    averaged = [
        t for t, key in primaries.items() if all(_task_metrics(results[m], t).get(key) for m in models)
    ]
    average_values = {
        m: (
            sum(_task_metrics(results[m], t)[primaries[t]]["value"] for t in averaged) / len(averaged)
            if averaged
            else None
        )
        for m in models
    }
    return {
        "models": models,
        "baseline": baseline,
        "tasks": list(tasks),
        "primary_metrics": primaries,
        "rows": rows,
        "average": {"tasks": averaged, "values": average_values, "delta": _deltas(average_values, baseline)},
        "missing_tasks": [t for t in tasks if t not in primaries],
    }


def render_markdown(summary: Mapping[str, Any], *, title: str = "Evaluation") -> str:
    models = summary["models"]
    others = models[1:]
    header = ["task", "metric", *models, *[f"Δ {m}" for m in others]]
    lines = [
        f"# {title}",
        "",
        f"lm-eval results; Δ = difference to `{summary['baseline']}`. Fractions are shown as "
        "percentages; ± is lm-eval's standard error; * marks the metric each task contributes "
        "to the average.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in summary["rows"]:
        scale = 100.0 if _all_fractions(row["values"].values()) else 1.0
        cells = [row["task"], _metric_label(row["metric"]) + (" *" if row["primary"] else "")]
        cells += [_value(row["values"][m], row["stderr"][m], scale) for m in models]
        cells += [_signed(row["delta"][m], scale) for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    average = summary["average"]
    scale = 100.0 if _all_fractions(average["values"].values()) else 1.0
    label = f"**average** ({len(average['tasks'])} tasks)"
    cells = [label, ""] + [_value(average["values"][m], None, scale) for m in models]
    cells += [_signed(average["delta"][m], scale) for m in others]
    lines.append("| " + " | ".join(cells) + " |")
    if summary.get("missing_tasks"):
        lines += ["", "No results for: " + ", ".join(summary["missing_tasks"])]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- parts


def _task_metrics(results: Mapping[str, Any], task: str) -> dict[str, dict[str, float | None]]:
    """``{"acc,none": {"value": .., "stderr": ..}, ...}`` for ``task`` (a task or a group)."""
    entry = (results.get("results") or {}).get(task) or (results.get("groups") or {}).get(task) or {}
    metrics: dict[str, dict[str, float | None]] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key or not _is_number(value):
            continue
        name, filter_name = key.split(",", 1)
        stderr = entry.get(f"{name}_stderr,{filter_name}")
        metrics[key] = {"value": float(value), "stderr": float(stderr) if _is_number(stderr) else None}
    return metrics


def _deltas(values: Mapping[str, float | None], baseline: str) -> dict[str, float | None]:
    base = values[baseline]
    return {
        m: (v - base if v is not None and base is not None else None) for m, v in values.items() if m != baseline
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _all_fractions(values: Any) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(0.0 <= v <= 1.0 for v in present)


def _metric_label(key: str) -> str:
    name, filter_name = key.split(",", 1)
    return name if filter_name == "none" else f"{name} ({filter_name})"


def _value(value: float | None, stderr: float | None, scale: float) -> str:
    if value is None:
        return "–"
    text = f"{value * scale:.2f}"
    return f"{text} ± {stderr * scale:.2f}" if stderr is not None else text


def _signed(value: float | None, scale: float) -> str:
    return "–" if value is None else f"{value * scale:+.2f}"
