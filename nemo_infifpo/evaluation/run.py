"""The evaluation stage: every model on every task, then one comparison table.

Order of work, so that mistakes cost seconds: parse the options, check the task names against
lm-eval's registry, skip models whose results already exist for the same settings, and only
then load models. Output, all written atomically::

    output_dir/<model>/results.json         lm-eval's results + the settings and their fingerprint
    output_dir/<model>/samples_<task>.jsonl per-sample records (log_samples=true)
    output_dir/summary.json, summary.md     the comparison table
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_infifpo.atomic import atomic_path, write_json_atomic, write_text_atomic
from nemo_infifpo.evaluation.config import EvalConfig
from nemo_infifpo.evaluation.fingerprint import evaluation_settings, settings_fingerprint
from nemo_infifpo.evaluation.summary import build_summary, render_markdown
from nemo_infifpo.evaluation.tasks import check_tasks, task_manager
from nemo_infifpo.locking import OutputLock

__all__ = ["EvaluationReport", "results_path", "run_evaluation"]

log = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    output_dir: Path
    evaluated: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def results_path(output_dir: str | Path, model_name: str) -> Path:
    return Path(output_dir) / model_name / "results.json"


def run_evaluation(config: EvalConfig) -> EvaluationReport:
    manager = task_manager(config.include_path)
    check_tasks(manager, config.tasks, confirm_run_unsafe_code=config.confirm_run_unsafe_code)

    output_dir = Path(config.output_dir)
    # One evaluation per output directory: two would race on the same results and summary.
    with OutputLock(output_dir / ".lock", stage="evaluation"):
        return _evaluate(config, manager, output_dir)


def _evaluate(config: EvalConfig, manager: Any, output_dir: Path) -> EvaluationReport:
    from nemo_infifpo.evaluation.harness import evaluate_model

    report = EvaluationReport(output_dir=output_dir)
    settings = {m.name: evaluation_settings(config, m) for m in config.models}
    all_results: dict[str, dict[str, Any]] = {}
    for model in config.models:
        fingerprint = settings_fingerprint(settings[model.name])
        existing = _load_if_current(results_path(output_dir, model.name), fingerprint)
        if existing is not None:
            log.info("%s: results for these settings exist (%s), skipping", model.name, fingerprint)
            report.skipped.append(model.name)
            all_results[model.name] = existing
            continue
        results = evaluate_model(config, model, manager)
        samples = results.pop("samples", None)
        if samples:
            _write_samples(output_dir / model.name, samples)
        results["nemo_infifpo"] = {
            "model_name": model.name,
            "settings": settings[model.name],
            "fingerprint": fingerprint,
        }
        write_json_atomic(results_path(output_dir, model.name), results)
        report.evaluated.append(model.name)
        all_results[model.name] = results

    report.summary = build_summary(all_results, config.tasks, config.primary_metrics)
    report.summary["fingerprints"] = {m: r["nemo_infifpo"]["fingerprint"] for m, r in all_results.items()}
    write_json_atomic(output_dir / "summary.json", report.summary)
    write_text_atomic(output_dir / "summary.md", render_markdown(report.summary))
    log.info("summary: %s", output_dir / "summary.md")
    return report


def _load_if_current(path: Path, fingerprint: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None  # written by something else; the atomic writer never leaves half a file
    if (results.get("nemo_infifpo") or {}).get("fingerprint") != fingerprint:
        log.info("%s: settings changed since it was written, evaluating again", path)
        return None
    return results


def _write_samples(directory: Path, samples: dict[str, list[dict[str, Any]]]) -> None:
    for task, records in samples.items():
        with atomic_path(directory / f"samples_{task}.jsonl") as tmp:
            with tmp.open("w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")

