"""Merge the pivot's and the sources' scoring outputs into the training set (contract 4).

Every model directory is checked before anything is written: all shards complete, every shard
computed from the manifest's inputs (no mixing of two runs), the same dataset as ``data.path``
(read under the same row policy), every row of the dataset either scored exactly once or
excluded (by ``max_length``, or as invalid for that model's template), finite sums and positive
token counts. A row excluded by any model is excluded everywhere: fusion compares the models
on the same text, and a row that one model cannot see cannot be fused. Invalid rows (unreadable
ones and those any model's template could not encode) are counted together against
``data.max_excluded_fraction``; under ``data.on_invalid_row=fail`` any of them stops the merge.

The JSON report next to the output (``<output>.report.json``) says what went in and out and
lists the exclusions by model and reason, each model's template behaviour (pinned date, trimming,
boundary mode) and how often its template changed a response text, and
previews how training will treat the rows, computed with ``nemo_infifpo.loss`` itself:
per-model mean scores, how often probability clipping changes a source score, and how often
each candidate (sources, then the pivot) wins the ``max_margin`` selection at step 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_infifpo.data.errors import InputError
from nemo_infifpo.data.policy import MAX_LENGTH_REASON, RowExclusion, RowPolicy, check_fraction, summarize_exclusions
from nemo_infifpo.data.rows import PreferenceRow, read_preference_rows
from nemo_infifpo.data.scored_set import ModelScores, read_scored_set, write_scored_set
from nemo_infifpo.locking import OutputLock, sibling_lock_path
from nemo_infifpo.scoring.manifest import (
    MANIFEST_NAME,
    ScoringIdentity,
    ScoringMismatchError,
    dataset_fingerprint,
    read_manifest,
    write_json_atomic,
)
from nemo_infifpo.scoring.shards import ShardScores, read_shard_scores, read_sidecar, shard_is_complete, shard_name

__all__ = ["MergeError", "ModelScoreDir", "load_score_dir", "merge_scores", "report_path_for"]

log = logging.getLogger(__name__)

PIVOT = "pivot"


class MergeError(InputError):
    """Scores that cannot be merged; the message names the directory, file, row or source."""


@dataclass
class ModelScoreDir:
    """All shards of one model's scoring output, keyed by row id."""

    name: str
    path: Path
    identity: ScoringIdentity
    info: dict[str, Any]
    scores: ModelScores  # every scored pair of all shards, in shard order
    positions: dict[str, int]  # row id -> its index in ``scores``
    excluded: dict[str, RowExclusion]
    text_changes: dict[str, dict[str, Any]]  # kind -> {"count", "ids"} over all shards

    def pair(self, row_id: str) -> tuple[float, float, int, int]:
        """(chosen sum, rejected sum, chosen T, rejected T) of one scored row."""
        one = self.scores.take(self.positions[row_id])
        return float(one.chosen_logps), float(one.rejected_logps), int(one.chosen_tokens), int(one.rejected_tokens)


def report_path_for(output_path: str | Path) -> Path:
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".report.json")


def load_score_dir(directory: str | Path, name: str) -> ModelScoreDir:
    """Read and check one model's scoring output directory (see the module docstring)."""
    directory = Path(directory)
    label = f"{name} ({directory})"
    if not directory.is_dir():
        raise MergeError(f"{label}: scoring output directory not found")
    try:
        manifest = read_manifest(directory)
    except ScoringMismatchError as error:
        raise MergeError(f"{label}: {error}") from None
    if manifest is None:
        raise MergeError(f"{label}: no {MANIFEST_NAME}; is this a scoring output directory?")
    identity = ScoringIdentity.from_dict(manifest["identity"])
    count = identity.shard_count

    problems = []
    for index in range(count):
        sidecar = read_sidecar(directory, index, count)
        if sidecar is not None and sidecar.identity != identity:
            raise MergeError(
                f"{label}: {shard_name(index, count)}.json was computed from other inputs than "
                f"{MANIFEST_NAME} (shard vs manifest: {'; '.join(sidecar.identity.differences(identity))}); "
                "the directory mixes two scoring runs"
            )
        problem = shard_is_complete(directory, index, count, identity)
        if problem is not None:
            problems.append(f"{shard_name(index, count)}: {problem}")
    # Shard files left over from a run with another shard count would be silently ignored.
    stray = sorted(
        p.name for p in directory.glob("shard-*-of-*.json") if not p.name.endswith(f"-of-{count:05d}.json")
    )
    if stray:
        raise MergeError(
            f"{label}: shard files of another shard count ({', '.join(stray[:3])}) next to a "
            f"{count}-shard manifest; the directory mixes two scoring runs"
        )
    if problems:
        raise MergeError(
            f"{label}: incomplete scoring output, {len(problems)} of {count} shard(s) not finished: "
            + "; ".join(problems[:5])
            + " (rerun the scoring job with the same options to finish them)"
        )

    parts: list[ModelScores] = []
    positions: dict[str, int] = {}
    excluded: dict[str, RowExclusion] = {}
    text_changes: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for index in range(count):
        sidecar = read_sidecar(directory, index, count)
        assert sidecar is not None
        file = sidecar.parquet_file
        shard = read_shard_scores(directory, sidecar)
        _check_values(label, file, shard)
        for row_id in shard.ids:
            if row_id in where:
                raise MergeError(f"{label}: {file}: id {row_id!r} scored twice (also in {where[row_id]})")
            where[row_id] = file
            positions[row_id] = len(positions)
        parts.append(shard.scores)
        for entry in sidecar.excluded:
            row_id = str(entry["id"])
            if row_id in where:
                raise MergeError(
                    f"{label}: {file}: id {row_id!r} is both excluded and scored (in {where[row_id]})"
                )
            where[row_id] = f"{shard_name(index, count)}.json (excluded)"
            excluded[row_id] = _exclusion(entry, name)
        for kind, change in (sidecar.text_changes or {}).items():
            total = text_changes.setdefault(kind, {"count": 0, "ids": []})
            total["count"] += int(change.get("count", 0))
            total["ids"] = sorted(set(total["ids"]) | set(change.get("ids", [])))[:5]
    return ModelScoreDir(
        name, directory, identity, dict(manifest.get("info", {})), ModelScores.concat(parts), positions, excluded,
        text_changes,
    )


def _exclusion(entry: dict[str, Any], model: str) -> RowExclusion:
    """A sidecar entry as a :class:`RowExclusion` named after the model's role in the merge.
    Sidecars before version 2 held only max_length exclusions, their text under ``reason``."""
    if "stage" not in entry:
        return RowExclusion(
            id=str(entry["id"]), stage="score", reason=MAX_LENGTH_REASON,
            detail=str(entry.get("reason", "")), model=model,
        )
    return RowExclusion(
        id=str(entry["id"]),
        stage=str(entry["stage"]),
        reason=str(entry.get("reason", "invalid")),
        detail=str(entry.get("detail", "")),
        model=model,
    )


def _check_values(label: str, file: str, shard: ShardScores) -> None:
    """Finite sums and positive counts; the first bad value is named by id and column."""
    for column, values in shard.scores.columns().items():
        counts = column.endswith("_tokens")
        bad = np.flatnonzero(values < 1 if counts else ~np.isfinite(values))
        if bad.size == 0:
            continue
        i = int(bad[0])
        where = f"{label}: {file}: id {shard.ids[i]!r}, column {column!r}"
        if counts:
            raise MergeError(f"{where}: token count {int(values[i])} (must be >= 1)")
        raise MergeError(f"{where}: non-finite log-prob sum {float(values[i])!r}")


def merge_scores(
    data_path: str | Path,
    pivot_dir: str | Path,
    source_dirs: Sequence[str | Path],
    output_path: str | Path,
    *,
    source_names: Sequence[str] | None = None,
    data_split: str | None = None,
    policy: RowPolicy | None = None,
) -> dict[str, Any]:
    """Write the training set to ``output_path`` and its report next to it; returns the report."""
    policy = policy or RowPolicy()
    output_path = Path(output_path)
    if output_path.is_dir():
        raise MergeError(f"output_path {str(output_path)!r} is an existing directory, expected a file path")
    source_dirs = [Path(d) for d in source_dirs]
    names = [str(n) for n in source_names] if source_names is not None else [d.name for d in source_dirs]
    if len(names) != len(source_dirs):
        raise MergeError(f"{len(names)} source_names for {len(source_dirs)} source_dirs")
    if len(set(names)) != len(names):
        raise MergeError(f"source names must be unique, got {names} (pass source_names=[...])")
    if PIVOT in names:
        raise MergeError(f"{PIVOT!r} is reserved for the pivot; rename that source")

    # One merge per output file: two merges into one path would interleave their writes.
    with OutputLock(sibling_lock_path(output_path), stage="merge", output=output_path):
        return _merge(data_path, pivot_dir, source_dirs, names, output_path, data_split, policy)


def _merge(
    data_path: str | Path,
    pivot_dir: str | Path,
    source_dirs: list[Path],
    names: list[str],
    output_path: Path,
    data_split: str | None,
    policy: RowPolicy,
) -> dict[str, Any]:
    read = read_preference_rows(data_path, split=data_split, policy=policy)
    rows = read.rows
    data_fp = dataset_fingerprint(rows)
    models = [load_score_dir(pivot_dir, PIVOT)] + [
        load_score_dir(d, n) for d, n in zip(source_dirs, names, strict=True)
    ]
    for model in models:
        if model.identity.dataset_fingerprint != data_fp:
            raise MergeError(
                f"{model.name} ({model.path}): scored on a different dataset than {data_path} "
                f"(dataset fingerprint {model.identity.dataset_fingerprint[:12]}… vs "
                f"{data_fp[:12]}…; scored from {model.info.get('data_path', 'unknown')}"
                + _policy_hint(model, policy)
                + ")"
            )

    # Every row must be accounted for by every model, exactly once.
    data_ids = {row.id for row in rows}
    for model in models:
        for row in rows:
            if row.id not in model.positions and row.id not in model.excluded:
                raise MergeError(f"{model.name} ({model.path}): id {row.id!r} of {data_path} has no score")
        extra = [i for i in list(model.positions) + list(model.excluded) if i not in data_ids]
        if extra:
            raise MergeError(f"{model.name} ({model.path}): id {extra[0]!r} is not in {data_path}")

    excluded_by: dict[str, dict[str, RowExclusion]] = {}
    for model in models:
        for row_id, entry in model.excluded.items():
            excluded_by.setdefault(row_id, {})[model.name] = entry
    invalid = [
        entry for model in models for entry in model.excluded.values() if entry.reason != MAX_LENGTH_REASON
    ]
    if invalid and policy.on_invalid_row == "fail":
        raise MergeError(
            f"{len(invalid)} row(s) could not be encoded by some model's template and "
            f"data.on_invalid_row=fail: {summarize_exclusions(invalid)}"
        )
    # Fusion needs every model: a row invalid for any one of them is lost once, for all.
    first_invalid: dict[str | None, RowExclusion] = {}
    for entry in invalid:
        first_invalid.setdefault(entry.id, entry)
    lost = [*read.excluded, *first_invalid.values()]
    check_fraction(lost, read.total, policy, stage="merge")
    kept = [row for row in rows if row.id not in excluded_by]
    if not kept:
        raise MergeError(f"every row of {data_path} was excluded by some model (max_length or invalid)")

    def aligned(model: ModelScoreDir) -> ModelScores:
        return model.scores.take(np.array([model.positions[row.id] for row in kept], dtype=np.int64))

    p0 = aligned(models[0])
    sources = [aligned(m) for m in models[1:]]

    def fingerprints(model: ModelScoreDir) -> dict[str, Any]:
        return {
            **model.identity.to_dict(),
            "model_path": model.info.get("model_path"),
            "chat_template": model.info.get("chat_template"),
            # Boundary mode, template arguments and pinned date: what training must render with.
            "template": model.info.get("template"),
        }

    write_scored_set(
        output_path,
        kept,
        p0,
        sources,
        source_names=names,
        pivot_fingerprints=fingerprints(models[0]),
        source_fingerprints=[fingerprints(m) for m in models[1:]],
        dataset_fingerprint=data_fp,
    )
    report = _report(output_path, data_path, read.total, rows, kept, excluded_by, models, names)
    report["read_excluded"] = [entry.to_dict() for entry in read.excluded]
    report["rows_invalid"] = len(lost)
    write_json_atomic(report_path_for(output_path), report)
    log.info(
        "merged %d of %d rows (%d excluded) from the pivot and %d source(s) into %s",
        len(kept),
        len(rows),
        len(excluded_by),
        len(names),
        output_path,
    )
    return report


def _policy_hint(model: ModelScoreDir, policy: RowPolicy) -> str:
    recorded = model.info.get("row_policy")
    if recorded and recorded != policy.to_dict():
        return (
            f"; it was read with data.on_invalid_row={recorded.get('on_invalid_row')!r}, "
            f"data.max_excluded_fraction={recorded.get('max_excluded_fraction')!r}: merge with the same"
        )
    return ""


def _report(
    output_path: Path,
    data_path: str | Path,
    rows_total: int,
    rows: list[PreferenceRow],
    kept: list[PreferenceRow],
    excluded_by: dict[str, dict[str, RowExclusion]],
    models: list[ModelScoreDir],
    names: list[str],
) -> dict[str, Any]:
    from nemo_infifpo.loss import clip_source_scores, infifpo_loss

    # Read back what was written: the report describes the file training will load.
    scored = read_scored_set(output_path)
    candidates = [*names, PIVOT]
    previews: dict[str, Any] = {}
    for key, length_norm in (("length_normalised", True), ("sums", False)):
        s = scored.scores(length_norm)
        means = {
            PIVOT: {"chosen": _mean(s["ref_chosen"]), "rejected": _mean(s["ref_rejected"])},
            **{
                name: {
                    "chosen": _mean(s["source_chosen"][:, j]),
                    "rejected": _mean(s["source_rejected"][:, j]),
                }
                for j, name in enumerate(names)
            },
        }
        preview: dict[str, Any] = {"mean_score": means}
        if names:
            c_w, c_l = clip_source_scores(
                s["source_chosen"], s["source_rejected"], s["ref_chosen"], s["ref_rejected"]
            )
            changed = (c_w != s["source_chosen"]).double().mean(0) + (
                c_l != s["source_rejected"]
            ).double().mean(0)
            per_source = {name: float(changed[j]) / 2 for j, name in enumerate(names)}
        else:
            per_source = {}
        # Step 0 of training: the policy is p0 itself.
        _, metrics = infifpo_loss(
            s["ref_chosen"],
            s["ref_rejected"],
            s["ref_chosen"],
            s["ref_rejected"],
            s["source_chosen"],
            s["source_rejected"],
            beta=1.0,
            fusion="max_margin",
            clip=True,
            include_pivot=True,
        )
        counts = torch.bincount(metrics["selected"], minlength=len(candidates)).tolist()
        preview["clipped_fraction"] = {
            "overall": _mean(metrics["clipped_fraction"]),
            "per_source": per_source,
        }
        preview["max_margin_selection"] = {
            "counts": dict(zip(candidates, counts, strict=True)),
            "fractions": {c: n / len(kept) for c, n in zip(candidates, counts, strict=True)},
        }
        previews[key] = preview

    excluded_rows = [
        {
            "id": row.id,
            "excluded_by": {name: entry.reason for name, entry in excluded_by[row.id].items()},
            "details": {name: entry.detail for name, entry in excluded_by[row.id].items()},
        }
        for row in rows
        if row.id in excluded_by
    ]
    by_model: dict[str, dict[str, int]] = {}
    for m in models:
        counts: dict[str, int] = {}
        for entry in m.excluded.values():
            counts[entry.reason] = counts.get(entry.reason, 0) + 1
        by_model[m.name] = dict(sorted(counts.items()))
    return {
        "output": str(output_path),
        "data_path": str(data_path),
        "rows_total": rows_total,
        "rows_in": len(rows),
        "rows_out": len(kept),
        "rows_excluded": len(excluded_rows),
        "excluded_by_model": by_model,
        "excluded": excluded_rows,
        "text_changes": {m.name: m.text_changes for m in models},
        "templates": {m.name: m.info.get("template") for m in models},
        "sources": names,
        "candidates": candidates,
        "models": {
            m.name: {
                "dir": str(m.path),
                "model_path": m.info.get("model_path"),
                "backend": m.identity.backend,
                "dtype": m.identity.dtype,
                "max_length": m.identity.max_length,
                "model_fingerprint": m.identity.model_fingerprint,
                "tokenizer_fingerprint": m.identity.tokenizer_fingerprint,
            }
            for m in models
        },
        "dataset_fingerprint": models[0].identity.dataset_fingerprint,
        **previews,
    }


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")
