"""Shard assignment and the per-shard output files of a scoring run.

Rows are sorted by id and cut into ``count`` contiguous slices of (almost) equal size, so a
shard's rows depend only on the dataset and ``count``: a Slurm array task, a rerun, or a job on
another node computes exactly the same slice.

Each finished shard ``k`` of ``K`` leaves two files in the output directory:

- ``shard-0000k-of-0000K.parquet``: ``id``, ``chosen_logps``, ``rejected_logps`` (float64
  sums), ``chosen_tokens``, ``rejected_tokens`` (int64), one row per scored pair, in id order;
- ``shard-0000k-of-0000K.json`` (the sidecar): the run identity, row counts, the rows excluded
  (``excluded``: id, stage, reason code, detail; lengths for ``max_length``), how the template
  changed response texts (``text_changes``: count and first ids per kind), and the sha256 of
  the Parquet file.

The sidecar is written last (after the Parquet file is in place), so its presence with a
matching identity and checksum is what "shard complete" means. Both writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_infifpo.atomic import remove_stale_temporaries
from nemo_infifpo.locking import OutputLock, OutputLockedError

from nemo_infifpo.data.policy import MAX_LENGTH_REASON, RowExclusion
from nemo_infifpo.data.rows import PreferenceRow
from nemo_infifpo.data.scored_set import SCORE_FIELDS, ModelScores, write_parquet_atomic
from nemo_infifpo.data.templates import ExcludedRow
from nemo_infifpo.scoring.manifest import (
    MANIFEST_NAME,
    manifest_lock,
    RunIdentity,
    ScoringIdentity,
    read_manifest,
    write_json_atomic,
)

__all__ = [
    "SHARD_COLUMNS",
    "lock_shards",
    "ShardResult",
    "ShardScores",
    "ShardedRunSummary",
    "read_shard_scores",
    "read_sidecar",
    "refresh_manifest",
    "refresh_manifest_file",
    "shard_is_complete",
    "shard_name",
    "shard_slices",
    "split_rows",
    "write_shard",
]

SHARD_COLUMNS = ("id", *SCORE_FIELDS)
SIDECAR_VERSION = 2
# Ids listed per kind of text change; the count covers all of them.
_TEXT_CHANGE_IDS = 5


def shard_name(index: int, count: int) -> str:
    """``shard-00002-of-00008`` (no suffix)."""
    return f"shard-{index:05d}-of-{count:05d}"


def shard_slices(num_rows: int, count: int) -> list[slice]:
    """``count`` contiguous slices covering ``range(num_rows)``, sizes differing by at most 1."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    return [slice(k * num_rows // count, (k + 1) * num_rows // count) for k in range(count)]


def split_rows(rows: Sequence[PreferenceRow], count: int) -> list[list[PreferenceRow]]:
    """The rows of each shard: sorted by id, then cut contiguously (see the module docstring)."""
    ordered = sorted(rows, key=lambda row: row.id)
    return [ordered[part] for part in shard_slices(len(ordered), count)]


@dataclass(frozen=True)
class ShardScores:
    """The scored pairs of one shard: their ids (id order) and one model's scores of them."""

    ids: list[str]
    scores: ModelScores

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.scores):
            raise ValueError(f"{len(self.ids)} ids but {len(self.scores)} scores")

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ShardedRunSummary:
    """What a sharded job (score, generate, judge) did with its output directory's shards:
    those it computed, and those it found finished (by an earlier run or another task)."""

    output_dir: Path
    shards_computed: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ShardResult:
    """What a finished shard's sidecar says."""

    index: int
    count: int
    identity: ScoringIdentity
    num_rows: int  # rows assigned to the shard
    num_scored: int
    excluded: list[dict[str, Any]]
    parquet_sha256: str
    parquet_file: str
    text_changes: dict[str, dict[str, Any]] | None = None


def _paths(output_dir: Path, index: int, count: int) -> tuple[Path, Path]:
    stem = shard_name(index, count)
    return output_dir / f"{stem}.parquet", output_dir / f"{stem}.json"


def lock_shards(output_dir: str | Path, indices: Sequence[int], count: int) -> list[OutputLock]:
    """Lock shards ``indices`` of ``output_dir`` for this job (all or none): two jobs never
    compute the same shard into one directory (a resubmitted array task while the first one
    still runs). Raises :class:`OutputLockedError` naming the holder."""
    output_dir = Path(output_dir)
    locks: list[OutputLock] = []
    try:
        for index in indices:
            name = shard_name(index, count)
            path = output_dir / f".lock.{name}"
            locks.append(OutputLock(path, stage="scoring", output=output_dir / f"{name}.parquet").acquire())
    except OutputLockedError:
        for lock in locks:
            lock.release()
        raise
    return locks


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shard(
    output_dir: str | Path,
    index: int,
    count: int,
    identity: ScoringIdentity,
    scores: ShardScores,
    excluded: Sequence[ExcludedRow | RowExclusion],
    num_rows: int,
    run_info: dict[str, Any] | None = None,
    text_changes: dict[str, list[str]] | None = None,
) -> ShardResult:
    """Write the shard's Parquet file, then its sidecar (the completion marker).

    ``excluded``: rows left out by ``max_length`` or as invalid; ``text_changes``: kind ->
    ids of the rows whose response text the template changed. ``run_info`` (parallel layout,
    batch plan, timing) is recorded for diagnosis only."""
    import pyarrow as pa

    output_dir = Path(output_dir)
    parquet_path, sidecar_path = _paths(output_dir, index, count)
    # The caller holds this shard's lock (lock_shards): temporaries of these files are left
    # over from killed writes, never another writer's.
    for path in (parquet_path, sidecar_path):
        remove_stale_temporaries(path)
    table = pa.table(
        {
            "id": pa.array(scores.ids, type=pa.string()),
            **{name: pa.array(values) for name, values in scores.scores.columns().items()},
        }
    )
    write_parquet_atomic(table, parquet_path)
    result = ShardResult(
        index=index,
        count=count,
        identity=identity,
        num_rows=num_rows,
        num_scored=len(scores.ids),
        excluded=[_exclusion_entry(row) for row in excluded],
        parquet_sha256=_sha256(parquet_path),
        parquet_file=parquet_path.name,
        text_changes={
            kind: {"count": len(ids), "ids": sorted(ids)[:_TEXT_CHANGE_IDS]}
            for kind, ids in sorted((text_changes or {}).items())
        },
    )
    write_json_atomic(
        sidecar_path,
        {
            "sidecar_version": SIDECAR_VERSION,
            "index": index,
            "count": count,
            "identity": identity.to_dict(),
            "num_rows": result.num_rows,
            "num_scored": result.num_scored,
            "num_excluded": len(result.excluded),
            "excluded": result.excluded,
            "parquet_file": result.parquet_file,
            "parquet_sha256": result.parquet_sha256,
            "text_changes": result.text_changes,
            "status": "complete",
            # How it was computed (parallel layout, batching): diagnostics, not identity.
            "run": dict(run_info or {}),
        },
    )
    return result


def _exclusion_entry(row: ExcludedRow | RowExclusion) -> dict[str, Any]:
    if isinstance(row, RowExclusion):
        return row.to_dict()
    return {
        "id": row.id,
        "stage": "score",
        "reason": MAX_LENGTH_REASON,
        "detail": row.reason,
        "chosen_length": row.chosen_length,
        "rejected_length": row.rejected_length,
        "max_length": row.max_length,
    }


def read_sidecar(output_dir: str | Path, index: int, count: int) -> ShardResult | None:
    """The sidecar of shard ``index``, or None when the shard has not finished."""
    _, sidecar_path = _paths(Path(output_dir), index, count)
    if not sidecar_path.is_file():
        return None
    try:
        data = json.loads(sidecar_path.read_text(encoding="utf-8"))
        return ShardResult(
            index=int(data["index"]),
            count=int(data["count"]),
            identity=ScoringIdentity.from_dict(data["identity"]),
            num_rows=int(data["num_rows"]),
            num_scored=int(data["num_scored"]),
            excluded=list(data["excluded"]),
            parquet_sha256=str(data["parquet_sha256"]),
            parquet_file=str(data["parquet_file"]),
            text_changes=dict(data.get("text_changes") or {}),
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{sidecar_path}: unreadable shard sidecar ({error})") from None


def shard_is_complete(
    output_dir: str | Path,
    index: int,
    count: int,
    identity: ScoringIdentity,
    *,
    verify_checksum: bool = True,
) -> str | None:
    """None when shard ``index`` is finished for ``identity``; else why it must be (re)computed.

    ``verify_checksum`` re-hashes the Parquet file against its sidecar (resume and merge do;
    the manifest summary, rewritten after every shard, does not)."""
    output_dir = Path(output_dir)
    parquet_path, sidecar_path = _paths(output_dir, index, count)
    try:
        result = read_sidecar(output_dir, index, count)
    except ValueError as error:
        return str(error)
    if result is None:
        return "not computed yet"
    if result.identity != identity:
        differences = "; ".join(result.identity.differences(identity))
        return f"{sidecar_path.name} was computed from other inputs ({differences})"
    if not parquet_path.is_file():
        return f"{parquet_path.name} is missing"
    if verify_checksum and _sha256(parquet_path) != result.parquet_sha256:
        return f"{parquet_path.name} does not match the checksum in {sidecar_path.name}"
    return None


def read_shard_scores(output_dir: str | Path, result: ShardResult) -> ShardScores:
    import pyarrow.parquet as pq

    path = Path(output_dir) / result.parquet_file
    table = pq.read_table(path)
    missing = [name for name in SHARD_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
    return ShardScores(
        ids=[str(value) for value in table.column("id").to_pylist()],
        scores=ModelScores.from_columns({name: table.column(name).to_numpy() for name in SCORE_FIELDS}),
    )


def refresh_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    """Rewrite the manifest's per-shard summary (rows, status) from the sidecars.

    The sidecars are authoritative; this summary is for people and scripts that want one file
    to look at. Concurrent array tasks take turns (the manifest lock), and every rewrite reads
    all sidecars, so the last one is at least as current as any before it.
    """

    def problem(output_dir: Path, index: int, identity: ScoringIdentity) -> str | None:
        return shard_is_complete(output_dir, index, identity.shard_count, identity, verify_checksum=False)

    def summary(output_dir: Path, index: int, identity: ScoringIdentity) -> dict[str, Any]:
        result = read_sidecar(output_dir, index, identity.shard_count)
        assert result is not None
        return {"rows": result.num_rows, "scored": result.num_scored, "excluded": len(result.excluded)}

    return refresh_manifest_file(output_dir, ScoringIdentity, read=read_manifest, problem=problem, summary=summary)


def refresh_manifest_file(
    output_dir: str | Path,
    identity_type: type[RunIdentity],
    *,
    read: Callable[[Path], dict[str, Any] | None],
    problem: Callable[[Path, int, Any], str | None],
    summary: Callable[[Path, int, Any], Mapping[str, Any]],
) -> dict[str, Any] | None:
    """Rewrite the per-shard summary of the manifest that ``read`` finds in ``output_dir`` (None
    when there is none), under the manifest lock: per shard its file and ``status``, complete
    with ``summary(output_dir, index, identity)`` or pending with the ``reason`` that
    ``problem(output_dir, index, identity)`` gives; and whether all shards are complete."""
    output_dir = Path(output_dir)
    with manifest_lock(output_dir):
        manifest = read(output_dir)
        if manifest is None:
            return None
        identity = identity_type.from_dict(manifest["identity"])
        count = identity.shard_count
        shards = []
        for index in range(count):
            reason = problem(output_dir, index, identity)
            entry: dict[str, Any] = {"index": index, "file": f"{shard_name(index, count)}.parquet"}
            if reason is None:
                entry.update(status="complete", **summary(output_dir, index, identity))
            else:
                entry.update(status="pending", reason=reason)
            shards.append(entry)
        manifest["shards"] = shards
        manifest["complete"] = all(entry["status"] == "complete" for entry in shards)
        write_json_atomic(output_dir / MANIFEST_NAME, manifest)
        return manifest
