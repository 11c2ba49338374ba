"""Sharded, resumable record outputs of the generate and judge stages.

The same contract as scoring's output directories (:mod:`nemo_infifpo.scoring.shards`, whose
shard naming and slicing are used here): prompts sorted by id are cut into ``count``
contiguous shards; each finished shard ``k`` leaves ``shard-0000k-of-0000K.parquet`` and its
sidecar ``shard-0000k-of-0000K.json``, written last (identity digest, records, exclusions,
sha256 of the Parquet file), so a sidecar with a matching identity and checksum is what
"complete" means. ``manifest.json`` records the :class:`StageIdentity` (everything that
decides the records) and refuses a rerun with other inputs, naming the fields that differ,
as long as any shard was computed under it (a run that failed before its first shard, e.g.
on a model that does not load, leaves nothing to protect).

Within a shard records are sorted by prompt id, and shards follow id order, so reading the
shards one after the other gives a whole directory in prompt-id order: what lets build_pairs
join models and judge scores by streaming, one prompt at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.atomic import write_json_atomic
from nemo_infifpo.data.errors import InputError
from nemo_infifpo.data.scored_set import canonical_json, write_parquet_atomic
from nemo_infifpo.scoring.manifest import (
    MANIFEST_NAME,
    ScoringMismatchError,
    check_or_create_manifest_file,
    read_manifest_file,
)
from nemo_infifpo.scoring.shards import refresh_manifest_file, shard_name, shard_slices

__all__ = [
    "GENERATION_COLUMNS",
    "JUDGE_COLUMNS",
    "MANIFEST_NAME",
    "OutputMismatchError",
    "StageIdentity",
    "check_or_create_manifest",
    "complete_manifest",
    "iter_record_batches",
    "read_manifest",
    "record_table",
    "refresh_manifest",
    "shard_is_complete",
    "shard_name",
    "shard_slices",
    "write_shard",
]

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_READ_CHUNK = 1 << 20

# Each stage's record columns, in file order, with their Arrow types.
_COLUMN_TYPES = {
    "generate": (("prompt_id", "string"), ("sample_index", "int32"), ("model", "string"), ("text", "large_string"),
                 ("num_tokens", "int32"), ("finish_reason", "string"), ("prompt_tokens", "int32")),
    "judge": (("prompt_id", "string"), ("model", "string"), ("sample_index", "int32"), ("score", "float64")),
}
GENERATION_COLUMNS = tuple(name for name, _ in _COLUMN_TYPES["generate"])
JUDGE_COLUMNS = tuple(name for name, _ in _COLUMN_TYPES["judge"])


class OutputMismatchError(ScoringMismatchError):
    """An output directory holds results computed from other inputs (or is incomplete)."""


@dataclass(frozen=True)
class StageIdentity:
    """What decides a stage's records: ``stage`` (generate | judge), named ``fields`` (JSON
    values: fingerprints, sampling parameters, dtype, ...) and ``shard_count``."""

    stage: str
    fields: Mapping[str, Any]
    shard_count: int

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "fields": json.loads(canonical_json(dict(self.fields))), "shard_count": self.shard_count}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageIdentity:
        return cls(stage=str(data["stage"]), fields=dict(data["fields"]), shard_count=int(data["shard_count"]))

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict()).encode("utf-8")).hexdigest()

    def differences(self, other: StageIdentity) -> list[str]:
        """``"name: this vs other"`` for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = [f"stage: {mine['stage']!r} vs {theirs['stage']!r}"] if mine["stage"] != theirs["stage"] else []
        names = sorted(set(mine["fields"]) | set(theirs["fields"]))
        for name in names:
            a, b = mine["fields"].get(name), theirs["fields"].get(name)
            if a != b:
                out.append(f"{name}: {_short(a)} vs {_short(b)}")
        if mine["shard_count"] != theirs["shard_count"]:
            out.append(f"shard_count: {mine['shard_count']} vs {theirs['shard_count']}")
        return out


def _short(value: Any) -> str:
    # 64-hex fingerprints are unreadable in a message; 12 digits identify them well enough.
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def read_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    def problem(data: Mapping[str, Any]) -> str | None:
        if data.get("manifest_version") != MANIFEST_VERSION or "identity" not in data or "stage" not in data["identity"]:
            return "not a manifest of a generate or judge output; choose a new output_dir"
        return None

    return read_manifest_file(output_dir, error=OutputMismatchError, problem=problem)


def check_or_create_manifest(
    output_dir: str | Path, identity: StageIdentity, info: Mapping[str, Any], *, create: bool
) -> dict[str, Any]:
    """Compare ``identity`` with the directory's manifest (raise :class:`OutputMismatchError`
    on any difference); write a new manifest when there is none and ``create`` is set."""
    return check_or_create_manifest_file(output_dir, identity, info, create=create, version=MANIFEST_VERSION,
                                         read=read_manifest, on_mismatch=_replace_or_refuse)


def _replace_or_refuse(output_dir: Path, existing: Mapping[str, Any], differences: list[str]) -> None:
    if not any(output_dir.glob("shard-*-of-*.json")):
        # Nothing was computed under the old inputs (say, a run that failed to load its
        # model): the manifest alone is not worth keeping, and a rerun with the fix must work.
        log.warning("%s: replacing the manifest of a run that computed nothing (%s)", output_dir, "; ".join(differences))
        return
    raise OutputMismatchError(
        f"{output_dir} already holds {existing['identity']['stage']} results computed from different "
        f"inputs (recorded vs now): {'; '.join(differences)}. To compute these inputs, choose a new "
        "output_dir, or delete this directory to start fresh."
    )


def _paths(output_dir: Path, index: int, count: int) -> tuple[Path, Path]:
    stem = shard_name(index, count)
    return output_dir / f"{stem}.parquet", output_dir / f"{stem}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def record_table(stage: str, columns: Mapping[str, Sequence[Any]]) -> Any:
    """The Arrow table of a ``stage`` (generate | judge) shard from one list per column, with
    the column order and types that the readers of that stage's outputs expect."""
    import pyarrow as pa

    return pa.table({name: pa.array(columns[name], type=getattr(pa, kind)()) for name, kind in _COLUMN_TYPES[stage]})


def write_shard(
    output_dir: str | Path,
    index: int,
    identity: StageIdentity,
    table: Any,
    *,
    num_prompts: int,
    excluded: Sequence[Mapping[str, Any]] = (),
    run_info: Mapping[str, Any] | None = None,
) -> None:
    """The shard's Parquet file (records sorted by prompt id), then its sidecar."""
    output_dir = Path(output_dir)
    parquet_path, sidecar_path = _paths(output_dir, index, identity.shard_count)
    write_parquet_atomic(table, parquet_path)
    write_json_atomic(
        sidecar_path,
        {
            "index": index,
            "count": identity.shard_count,
            "identity_digest": identity.digest(),
            "num_prompts": num_prompts,
            "num_records": table.num_rows,
            "num_excluded": len(excluded),
            "excluded": [dict(entry) for entry in excluded],
            "parquet_file": parquet_path.name,
            "parquet_sha256": _sha256(parquet_path),
            "status": "complete",
            "run": dict(run_info or {}),
        },
    )


def read_sidecar(output_dir: str | Path, index: int, count: int) -> dict[str, Any] | None:
    _, sidecar_path = _paths(Path(output_dir), index, count)
    if not sidecar_path.is_file():
        return None
    try:
        return json.loads(sidecar_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise OutputMismatchError(f"{sidecar_path}: unreadable shard sidecar ({error.msg})") from None


def shard_is_complete(
    output_dir: str | Path, index: int, identity: StageIdentity, *, verify_checksum: bool = True
) -> str | None:
    """None when shard ``index`` is finished for ``identity``; else why it must be computed."""
    output_dir = Path(output_dir)
    parquet_path, sidecar_path = _paths(output_dir, index, identity.shard_count)
    sidecar = read_sidecar(output_dir, index, identity.shard_count)
    if sidecar is None:
        return "not computed yet"
    if sidecar.get("identity_digest") != identity.digest():
        return f"{sidecar_path.name} was computed from other inputs"
    if not parquet_path.is_file():
        return f"{parquet_path.name} is missing"
    if verify_checksum and _sha256(parquet_path) != sidecar.get("parquet_sha256"):
        return f"{parquet_path.name} does not match the checksum in {sidecar_path.name}"
    return None


def refresh_manifest(output_dir: str | Path) -> dict[str, Any] | None:
    """Rewrite the manifest's per-shard summary from the sidecars (which are authoritative);
    concurrent tasks take turns (the manifest lock)."""

    def problem(output_dir: Path, index: int, identity: StageIdentity) -> str | None:
        return shard_is_complete(output_dir, index, identity, verify_checksum=False)

    def summary(output_dir: Path, index: int, identity: StageIdentity) -> dict[str, Any]:
        sidecar = read_sidecar(output_dir, index, identity.shard_count) or {}
        return {"prompts": sidecar.get("num_prompts"), "records": sidecar.get("num_records"),
                "excluded": sidecar.get("num_excluded")}

    return refresh_manifest_file(output_dir, StageIdentity, read=read_manifest, problem=problem, summary=summary)


def complete_manifest(output_dir: str | Path, *, stage: str, role: str) -> tuple[dict[str, Any], StageIdentity]:
    """The manifest of a finished ``stage`` output that another stage reads (``role`` names it in
    errors, e.g. ``generation_dirs[1]``); raises :class:`InputError` when it is not there yet."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(f"{role}: {output_dir} is not a directory (run the {stage} stage first)")
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise InputError(f"{role}: {output_dir} has no {MANIFEST_NAME} (run the {stage} stage first)")
    identity = StageIdentity.from_dict(manifest["identity"])
    if identity.stage != stage:
        raise InputError(f"{role}: {output_dir} holds {identity.stage} results, expected {stage} results")
    pending = [
        f"{shard_name(k, identity.shard_count)} ({problem})"
        for k in range(identity.shard_count)
        if (problem := shard_is_complete(output_dir, k, identity)) is not None
    ]
    if pending:
        raise InputError(
            f"{role}: {output_dir} is incomplete: {len(pending)} of {identity.shard_count} shards missing "
            f"(first: {pending[0]}); finish the {stage} stage first"
        )
    return manifest, identity


def iter_record_batches(
    output_dir: str | Path, identity: StageIdentity, columns: Sequence[str], *, batch_size: int = 8192
) -> Iterator[dict[str, list[Any]]]:
    """Column batches of a complete output directory, in prompt-id order (shard after shard)."""
    import pyarrow.parquet as pq

    for index in range(identity.shard_count):
        path, _ = _paths(Path(output_dir), index, identity.shard_count)
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=list(columns)):
            yield {name: batch.column(name).to_pylist() for name in columns}
