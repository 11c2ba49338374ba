"""The scored training set: preference rows plus every model's sequence scores (DESIGN.md
contract 4).

One Parquet row per preference pair:

=============================  ==========================================================
column                         meaning
=============================  ==========================================================
``id``                         the row id (string)
``prompt``, ``chosen``,        the normalised messages (:class:`~nemo_infifpo.data.rows.
``rejected``                   PreferenceRow`), ``list<struct<role: string, content: string>>``
``ref_chosen_logps``,          float64 ``S_p0(y)``: the initial pivot's log-prob SUM over the
``ref_rejected_logps``         response tokens in its own tokenization
``ref_chosen_tokens``,         int64 ``T_p0(y)``: that number of tokens
``ref_rejected_tokens``
``source_chosen_logps``,       ``list<float64>``, one sum per source, in the order of
``source_rejected_logps``      ``source_names`` in the file metadata
``source_chosen_tokens``,      ``list<int64>``, each source's own token count
``source_rejected_tokens``
=============================  ==========================================================

Sums are stored, never means: the mean ``S / T`` is derived on read, so one file serves
``length_norm=true`` and ``false`` alike. The Parquet schema metadata key ``nemo_infifpo`` holds a
JSON object with ``format_version``, ``source_names``, the pivot's and each source's
fingerprints, the dataset fingerprint and the package version.

:func:`read_scored_set` also reads the row format published with the paper's code (JSONL,
JSON, Parquet, or a ``datasets.save_to_disk`` directory; a ``DatasetDict`` needs ``split=``): ``ref_chosen_logps`` / ``ref_mean_chosen_logps`` (sum / mean of the pivot) and
``fuse_chosen_logps`` / ``fuse_mean_chosen_logps`` (lists, one per source), likewise for
``rejected``. There the token counts are not stored; they are recovered as
``round(sum / mean)`` and must come out as positive whole numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nemo_infifpo.atomic import atomic_path
from nemo_infifpo.data.errors import InputError
from nemo_infifpo.data.rows import PreferenceDataError, PreferenceRow, normalize_record

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "PAPER_FORMAT",
    "NATIVE_FORMAT",
    "SCORE_FIELDS",
    "ModelScores",
    "ScoredSet",
    "ScoredSetError",
    "package_version",
    "read_scored_set",
    "scored_set_schema",
    "write_parquet_atomic",
    "write_scored_set",
]

FORMAT_VERSION = 1
METADATA_KEY = b"nemo_infifpo"
NATIVE_FORMAT = "native"
PAPER_FORMAT = "paper"

_MESSAGE_COLUMNS = ("prompt", "chosen", "rejected")
# One model's scores of a pair (ModelScores' fields): the columns of a scoring shard, and with
# ``ref_`` (the initial pivot p0) or ``source_`` in front, those of the scored set.
SCORE_FIELDS = ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
_REF_COLUMNS = tuple(f"ref_{name}" for name in SCORE_FIELDS)
_SOURCE_COLUMNS = tuple(f"source_{name}" for name in SCORE_FIELDS)
NATIVE_COLUMNS: tuple[str, ...] = ("id", *_MESSAGE_COLUMNS, *_REF_COLUMNS, *_SOURCE_COLUMNS)

# The paper's columns: (sum column, mean column) for each model side.
_PAPER_REF = {
    "chosen": ("ref_chosen_logps", "ref_mean_chosen_logps"),
    "rejected": ("ref_rejected_logps", "ref_mean_rejected_logps"),
}
_PAPER_SOURCES = {
    "chosen": ("fuse_chosen_logps", "fuse_mean_chosen_logps"),
    "rejected": ("fuse_rejected_logps", "fuse_mean_rejected_logps"),
}
# A recovered token count sum/mean must be this close to a whole number (relative to the
# count, with an absolute floor): the paper's means were computed in float32, so a count of
# 4000 may come back as 4000.002, never as 4000.3.
_COUNT_REL_TOL = 1e-4
_COUNT_ABS_TOL = 0.02


class ScoredSetError(InputError):
    """A scored set (or the scores for one) that cannot be used; the message says where."""


def package_version() -> str:
    """The installed ``nemo-infifpo`` version, recorded next to every score it produces."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nemo-infifpo")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


@dataclass(frozen=True)
class ModelScores:
    """One model's log-prob sums and token counts for a list of pairs, aligned with the rows:
    arrays [B] for one model, or [B, N] for N sources side by side (the scored set's sources).

    The one container of pair scores from the scoring job (a shard is ids + ModelScores,
    ``scoring.shards.ShardScores``) through the merge to the scored set that training reads.
    """

    chosen_logps: np.ndarray  # float64 [B] or [B, N]
    rejected_logps: np.ndarray  # float64
    chosen_tokens: np.ndarray  # int64
    rejected_tokens: np.ndarray  # int64

    @classmethod
    def from_lists(
        cls,
        chosen_logps: Sequence[float],
        rejected_logps: Sequence[float],
        chosen_tokens: Sequence[int],
        rejected_tokens: Sequence[int],
    ) -> ModelScores:
        return cls(
            np.asarray(chosen_logps, dtype=np.float64),
            np.asarray(rejected_logps, dtype=np.float64),
            np.asarray(chosen_tokens, dtype=np.int64),
            np.asarray(rejected_tokens, dtype=np.int64),
        )

    @classmethod
    def from_columns(cls, columns: Mapping[str, Any], prefix: str = "") -> ModelScores:
        """From the columns ``prefix + name`` for each name in :data:`SCORE_FIELDS`."""
        return cls.from_lists(*(columns[prefix + name] for name in SCORE_FIELDS))

    def columns(self, prefix: str = "") -> dict[str, np.ndarray]:
        """``{prefix + name: array}`` in :data:`SCORE_FIELDS` order (float64 sums, int64 counts)."""
        return {
            prefix + name: np.asarray(getattr(self, name), dtype=np.int64 if name.endswith("_tokens") else np.float64)
            for name in SCORE_FIELDS
        }

    @classmethod
    def concat(cls, parts: Sequence[ModelScores]) -> ModelScores:
        """The pairs of ``parts``, one after the other."""
        if not parts:
            return cls.from_lists([], [], [], [])
        return cls.from_lists(*(np.concatenate([getattr(p, name) for p in parts]) for name in SCORE_FIELDS))

    @classmethod
    def side_by_side(cls, models: Sequence[ModelScores], num_rows: int) -> ModelScores:
        """N models' [B] scores as one [B, N] set (N = 0: [B, 0] arrays)."""
        if not models:
            return cls.from_lists(*(np.zeros((num_rows, 0)) for _ in SCORE_FIELDS))
        return cls.from_lists(*(np.stack([getattr(m, name) for m in models], axis=1) for name in SCORE_FIELDS))

    def take(self, index: Any) -> ModelScores:
        """``index`` applied to every array: rows, or ``(slice(None), j)`` for source ``j``."""
        return ModelScores(*(getattr(self, name)[index] for name in SCORE_FIELDS))

    def __len__(self) -> int:
        return int(self.chosen_logps.shape[0])


# --------------------------------------------------------------------------- writing


def _message_type() -> Any:
    import pyarrow as pa

    return pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def scored_set_schema(metadata: Mapping[str, Any] | None = None) -> Any:
    """The Arrow schema of the native format (with ``metadata`` under :data:`METADATA_KEY`)."""
    import pyarrow as pa

    messages = _message_type()
    fields = [
        ("id", pa.string()),
        ("prompt", messages),
        ("chosen", messages),
        ("rejected", messages),
        ("ref_chosen_logps", pa.float64()),
        ("ref_rejected_logps", pa.float64()),
        ("ref_chosen_tokens", pa.int64()),
        ("ref_rejected_tokens", pa.int64()),
        ("source_chosen_logps", pa.list_(pa.float64())),
        ("source_rejected_logps", pa.list_(pa.float64())),
        ("source_chosen_tokens", pa.list_(pa.int64())),
        ("source_rejected_tokens", pa.list_(pa.int64())),
    ]
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: canonical_json(metadata).encode("utf-8")})
    return schema


def canonical_json(value: Any) -> str:
    """Sorted keys, no whitespace: the same content always gives the same bytes."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def write_parquet_atomic(table: Any, path: str | Path) -> Path:
    """Write ``table`` to ``path`` through a temporary file in the same directory + rename,
    so a reader (or a killed writer's rerun) never sees a half-written file.

    The bytes depend only on the table: pyarrow writes no timestamps, and the writer options
    are fixed here rather than left to library defaults that might change between calls.
    """
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=True, write_statistics=True)
    return Path(path)


def write_scored_set(
    path: str | Path,
    rows: Sequence[PreferenceRow],
    p0: ModelScores,
    sources: Sequence[ModelScores],
    *,
    source_names: Sequence[str],
    pivot_fingerprints: Mapping[str, Any] | None = None,
    source_fingerprints: Sequence[Mapping[str, Any]] | None = None,
    dataset_fingerprint: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the training set (native format) atomically; returns ``path``.

    ``p0`` (the initial pivot's scores, written as the ``ref_*`` columns) and each of
    ``sources`` must be aligned with ``rows``; ``sources`` and
    ``source_names`` (and ``source_fingerprints`` when given) share one order. The same
    validation as :func:`read_scored_set` runs first, so a file that was written can be read.
    """
    import pyarrow as pa

    path = Path(path)
    names = [str(name) for name in source_names]
    if len(names) != len(sources):
        raise ScoredSetError(f"{len(sources)} source score sets but {len(names)} source_names")
    if len(set(names)) != len(names):
        raise ScoredSetError(f"source_names must be unique, got {names}")
    if source_fingerprints is not None and len(source_fingerprints) != len(names):
        raise ScoredSetError(f"{len(source_fingerprints)} source_fingerprints for {len(names)} sources")
    n = len(rows)
    for label, scores in [("pivot", p0), *zip(names, sources, strict=True)]:
        if len(scores) != n:
            raise ScoredSetError(f"scores of {label!r} have {len(scores)} rows, expected {n}")

    metadata = {
        "format_version": FORMAT_VERSION,
        "source_names": names,
        "pivot": dict(pivot_fingerprints or {}),
        "sources": [
            {"name": name, **dict(fp)}
            for name, fp in zip(names, source_fingerprints or [{} for _ in names], strict=True)
        ],
        "dataset_fingerprint": dataset_fingerprint,
        "package_version": package_version(),
        **dict(extra_metadata or {}),
    }
    num_sources = len(names)
    ref_columns = p0.columns("ref_")
    source_columns = ModelScores.side_by_side(sources, n).columns("source_")
    ids = [row.id for row in rows]
    _validate(str(path), ids, {**ref_columns, **source_columns})

    schema = scored_set_schema(metadata)

    def list_column(matrix: np.ndarray, value_type: Any) -> Any:
        # Row i's list is values[i * N : (i + 1) * N] (N = 0: every list empty).
        offsets = np.arange(n + 1, dtype=np.int32) * num_sources
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1), type=value_type))

    columns = [
        pa.array(ids, type=pa.string()),
        *(
            pa.array([[dict(m) for m in getattr(row, name)] for row in rows], type=_message_type())
            for name in _MESSAGE_COLUMNS
        ),
        *(pa.array(values, type=pa.from_numpy_dtype(values.dtype)) for values in ref_columns.values()),
        *(list_column(values, pa.from_numpy_dtype(values.dtype)) for values in source_columns.values()),
    ]
    table = pa.Table.from_arrays(columns, schema=schema)
    return write_parquet_atomic(table, path)


# --------------------------------------------------------------------------- the set


class ScoredSet:
    """A scored training set in memory: rows (messages) and all models' sums and counts."""

    def __init__(
        self,
        *,
        path: Path,
        format: str,
        rows: list[PreferenceRow],
        p0: ModelScores,
        sources: ModelScores,
        source_names: tuple[str, ...],
        metadata: dict[str, Any],
    ) -> None:
        self.path = path
        self.format = format
        self.ids = [row.id for row in rows]
        self.source_names = source_names
        self.metadata = metadata
        self.p0 = p0  # the initial pivot's scores (the ref_* columns): [B] arrays
        self.sources = sources  # [B, N] arrays, sources in source_names order
        self._rows = rows

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_sources(self) -> int:
        return len(self.source_names)

    def _index(self, indices: Any) -> np.ndarray:
        if indices is None:
            return np.arange(len(self.ids))
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -len(self.ids) or index.max() >= len(self.ids)):
            raise IndexError(f"row index out of range for {len(self.ids)} rows")
        return index

    def rows(self, indices: Any = None) -> list[PreferenceRow]:
        """The rows (all, or those at ``indices``) as :class:`PreferenceRow` objects."""
        return [self._rows[i] for i in self._index(indices).tolist()]

    def token_counts(self, indices: Any = None) -> dict[str, torch.Tensor]:
        """int64 ``ref_chosen``/``ref_rejected`` [B] and ``source_chosen``/``source_rejected``
        [B, N]: each model's own response token counts ``T_m(y)``."""
        index = self._index(indices)
        return {
            "ref_chosen": torch.from_numpy(self.p0.chosen_tokens[index]),
            "ref_rejected": torch.from_numpy(self.p0.rejected_tokens[index]),
            "source_chosen": torch.from_numpy(self.sources.chosen_tokens[index]),
            "source_rejected": torch.from_numpy(self.sources.rejected_tokens[index]),
        }

    def scores(
        self, length_norm: bool, indices: Any = None, *, dtype: torch.dtype = torch.float64
    ) -> dict[str, torch.Tensor]:
        """Sequence scores in the chosen normalisation, ready for ``infifpo_loss``.

        ``ref_chosen``, ``ref_rejected`` [B] (the initial pivot p0) and ``source_chosen``,
        ``source_rejected`` [B, N] (sources in :attr:`source_names` order). With
        ``length_norm`` each model's sum is divided by that model's own token count (Eq. 10).
        """
        from nemo_infifpo.loss import sequence_scores

        index = self._index(indices)
        counts = self.token_counts(index)

        def score(sums: np.ndarray, key: str) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(sums[index]))
            return sequence_scores(tensor, counts[key], length_norm=length_norm).to(dtype)

        return {
            "ref_chosen": score(self.p0.chosen_logps, "ref_chosen"),
            "ref_rejected": score(self.p0.rejected_logps, "ref_rejected"),
            "source_chosen": score(self.sources.chosen_logps, "source_chosen"),
            "source_rejected": score(self.sources.rejected_logps, "source_rejected"),
        }

    def source_scores(self, name: str) -> ModelScores:
        """The sums and counts of one source, by name."""
        if name not in self.source_names:
            raise KeyError(f"no source {name!r}; sources are {list(self.source_names)}")
        return self.sources.take((slice(None), self.source_names.index(name)))


# --------------------------------------------------------------------------- reading


def read_scored_set(
    path: str | Path, *, source_names: Sequence[str] | None = None, split: str | None = None
) -> ScoredSet:
    """Read a scored set: this project's Parquet format, or the paper's format (``.jsonl``,
    ``.json`` list, ``.parquet`` or a ``datasets`` directory, ``split`` naming the part of a
    ``DatasetDict``), detected from the columns.

    ``source_names`` names the sources of a paper-format file (default ``source_0``, ...);
    for a native file it must match the names stored in the file, if given.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"scored set not found: {path}")
    if path.is_dir():
        columns, metadata, num_rows = _dataset_columns(path, split)
    elif split is not None:
        raise ScoredSetError(f"{path}: split={split!r} only applies to a `datasets` saved directory")
    else:
        columns, metadata, num_rows = _load_columns(path)
    if "source_chosen_logps" in columns or METADATA_KEY.decode() in metadata:
        return _read_native(path, columns, metadata, num_rows, source_names)
    if any(name.startswith(("fuse_", "ref_mean_")) for name in columns):
        return _read_paper(path, columns, num_rows, source_names)
    raise ScoredSetError(
        f"{path}: not a scored set: expected this project's columns "
        f"({', '.join(NATIVE_COLUMNS)}) or the paper's (ref_chosen_logps, ref_mean_chosen_logps, "
        f"fuse_chosen_logps, fuse_mean_chosen_logps, ... for chosen and rejected); "
        f"found {', '.join(columns) or 'no columns'}"
    )


def _dataset_columns(path: Path, split: str | None) -> tuple[dict[str, list[Any]], dict[str, Any], int]:
    """The columns of a ``datasets.save_to_disk`` directory (the paper's format published as a
    dataset); a plain directory or plain preference rows are refused by the caller's checks."""
    import datasets  # slow to import; only needed for this format

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise ScoredSetError(
            f"{path}: a directory, but not a `datasets` saved directory (a scored set is a "
            ".parquet, .jsonl or .json file, or a directory from Dataset.save_to_disk)"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        available = ", ".join(repr(name) for name in loaded)
        if split is None:
            raise ScoredSetError(f"{path}: this is a DatasetDict: pass split= (available: {available})")
        if split not in loaded:
            raise ScoredSetError(f"{path}: no split {split!r} (available: {available})")
        loaded = loaded[split]
    elif split is not None:
        raise ScoredSetError(f"{path}: split={split!r} given, but this is a single Dataset without splits")
    return loaded.to_dict(), {}, loaded.num_rows


def _load_columns(path: Path) -> tuple[dict[str, list[Any]], dict[str, Any], int]:
    """Column name -> Python values, the native metadata (if any), and the row count."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        metadata: dict[str, Any] = {}
        if raw is not None:
            try:
                metadata = {METADATA_KEY.decode(): json.loads(raw.decode("utf-8"))}
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ScoredSetError(f"{path}: unreadable nemo_infifpo metadata ({error})") from None
        return {name: table.column(name).to_pylist() for name in table.column_names}, metadata, table.num_rows
    if suffix in (".jsonl", ".json"):
        records = _json_records(path, suffix)
        names: list[str] = []
        for record in records:
            for key in record:
                if key not in names:
                    names.append(key)
        return {name: [record.get(name) for record in records] for name in names}, {}, len(records)
    raise ScoredSetError(f"{path}: unsupported file type; expected .parquet, .jsonl or .json")


def _json_records(path: Path, suffix: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ScoredSetError(f"{path}: invalid JSON: {error.msg} (line {error.lineno})") from None
        if not isinstance(data, list):
            raise ScoredSetError(f"{path}: expected a JSON list of row objects")
        items = list(enumerate(data, start=1))
    else:
        items = []
        with path.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        items.append((number, json.loads(line)))
                    except json.JSONDecodeError as error:
                        raise ScoredSetError(f"{path}, line {number}: invalid JSON: {error.msg}") from None
    for number, record in items:
        if not isinstance(record, dict):
            raise ScoredSetError(f"{path}, row {number}: expected a JSON object")
        records.append(record)
    return records


def _require_columns(path: Path, columns: Mapping[str, Any], needed: Sequence[str], what: str) -> None:
    missing = [name for name in needed if name not in columns]
    if missing:
        raise ScoredSetError(
            f"{path}: missing column(s) {', '.join(repr(m) for m in missing)} (required by the {what} format)"
        )


def _records_for_rows(columns: Mapping[str, list[Any]], num_rows: int) -> list[dict[str, Any]]:
    keys = [key for key in ("id", *_MESSAGE_COLUMNS) if key in columns]
    return [{key: columns[key][i] for key in keys} for i in range(num_rows)]


def _normalised_rows(path: Path, records: list[dict[str, Any]]) -> list[PreferenceRow]:
    """Every row under the same rules as the scoring input (so ids match the scored ids)."""
    rows: list[PreferenceRow] = []
    for number, record in enumerate(records, start=1):
        try:
            rows.append(normalize_record(record, source=str(path), number=number, location="row"))
        except PreferenceDataError as error:
            raise ScoredSetError(str(error)) from None
    return rows


def _read_native(
    path: Path,
    columns: dict[str, list[Any]],
    metadata: dict[str, Any],
    num_rows: int,
    source_names: Sequence[str] | None,
) -> ScoredSet:
    _require_columns(path, columns, NATIVE_COLUMNS, "scored-set")
    meta = metadata.get(METADATA_KEY.decode())
    if meta is None:
        raise ScoredSetError(
            f"{path}: no nemo_infifpo metadata (source_names) in the Parquet schema; "
            "was it written by write_scored_set?"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ScoredSetError(
            f"{path}: scored-set format_version {version!r}, this package reads {FORMAT_VERSION}"
        )
    names = tuple(str(name) for name in meta.get("source_names", []))
    if source_names is not None and tuple(source_names) != names:
        raise ScoredSetError(
            f"{path}: source_names {list(source_names)} given, but the file holds {list(names)}"
        )
    rows = _normalised_rows(path, _records_for_rows(columns, num_rows))
    ids = [row.id for row in rows]
    arrays = {
        name: _scalar_column(path, ids, name, columns[name], integer=name.endswith("_tokens"))
        for name in _REF_COLUMNS
    }
    for name in _SOURCE_COLUMNS:
        arrays[name] = _list_column(
            path, ids, name, columns[name], len(names), integer=name.endswith("_tokens")
        )
    _validate(str(path), ids, arrays)
    return ScoredSet(
        path=path,
        format=NATIVE_FORMAT,
        rows=rows,
        p0=ModelScores.from_columns(arrays, "ref_"),
        sources=ModelScores.from_columns(arrays, "source_"),
        source_names=names,
        metadata=meta,
    )


def _read_paper(
    path: Path,
    columns: dict[str, list[Any]],
    num_rows: int,
    source_names: Sequence[str] | None,
) -> ScoredSet:
    needed = ["chosen", "rejected"]
    for table in (_PAPER_REF, _PAPER_SOURCES):
        for sum_column, mean_column in table.values():
            needed += [sum_column, mean_column]
    _require_columns(path, columns, needed, "paper's scored-row")
    rows = _normalised_rows(path, _records_for_rows(columns, num_rows))
    ids = [row.id for row in rows]

    # The number of sources: from the names if given, else from the first row's list.
    first = columns["fuse_chosen_logps"][0] if num_rows else []
    num_sources = (
        len(source_names)
        if source_names is not None
        else (len(first) if isinstance(first, (list, tuple)) else 0)
    )
    names = (
        tuple(source_names) if source_names is not None else tuple(f"source_{i}" for i in range(num_sources))
    )
    if len(set(names)) != len(names):
        raise ScoredSetError(f"{path}: source_names must be unique, got {list(names)}")

    arrays: dict[str, np.ndarray] = {}
    for side, (sum_column, mean_column) in _PAPER_REF.items():
        sums = _scalar_column(path, ids, sum_column, columns[sum_column], integer=False)
        means = _scalar_column(path, ids, mean_column, columns[mean_column], integer=False)
        arrays[f"ref_{side}_logps"] = sums
        arrays[f"ref_{side}_tokens"] = _counts_from_means(path, ids, sum_column, mean_column, sums, means)
    for side, (sum_column, mean_column) in _PAPER_SOURCES.items():
        sums = _list_column(path, ids, sum_column, columns[sum_column], num_sources, integer=False)
        means = _list_column(path, ids, mean_column, columns[mean_column], num_sources, integer=False)
        arrays[f"source_{side}_logps"] = sums
        arrays[f"source_{side}_tokens"] = _counts_from_means(
            path, ids, sum_column, mean_column, sums, means, names
        )
    _validate(str(path), ids, arrays)
    return ScoredSet(
        path=path,
        format=PAPER_FORMAT,
        rows=rows,
        p0=ModelScores.from_columns(arrays, "ref_"),
        sources=ModelScores.from_columns(arrays, "source_"),
        source_names=names,
        metadata={"format": PAPER_FORMAT, "source_names": list(names)},
    )


def _where(path: Path | str, ids: Sequence[str], row: int, column: str, source: str | None = None) -> str:
    """``file, row N (id 'x'), column 'c'[, source 's']`` for error messages."""
    where = f"{path}, row {row + 1} (id {ids[row]!r}), column {column!r}"
    return f"{where}, source {source!r}" if source is not None else where


def _number(path: Path, ids: Sequence[str], row: int, column: str, value: Any, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScoredSetError(
            f"{_where(path, ids, row, column)}: expected a number, got "
            f"{'null' if value is None else type(value).__name__}"
        )
    if integer and isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ScoredSetError(f"{_where(path, ids, row, column)}: expected a whole number, got {value!r}")
    return value


def _scalar_column(
    path: Path, ids: Sequence[str], column: str, values: list[Any], *, integer: bool
) -> np.ndarray:
    out = [_number(path, ids, i, column, v, integer) for i, v in enumerate(values)]
    return np.asarray(out, dtype=np.int64 if integer else np.float64).reshape(len(values))


def _list_column(
    path: Path, ids: Sequence[str], column: str, values: list[Any], num_sources: int, *, integer: bool
) -> np.ndarray:
    matrix = np.zeros((len(values), num_sources), dtype=np.int64 if integer else np.float64)
    for i, value in enumerate(values):
        if not isinstance(value, (list, tuple)):
            raise ScoredSetError(
                f"{_where(path, ids, i, column)}: expected a list with one entry per source, got "
                f"{'null' if value is None else type(value).__name__}"
            )
        if len(value) != num_sources:
            raise ScoredSetError(
                f"{_where(path, ids, i, column)}: {len(value)} entries, but there are {num_sources} sources"
            )
        for j, item in enumerate(value):
            matrix[i, j] = _number(path, ids, i, f"{column}[{j}]", item, integer)
    return matrix


def _counts_from_means(
    path: Path,
    ids: Sequence[str],
    sum_column: str,
    mean_column: str,
    sums: np.ndarray,
    means: np.ndarray,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Token counts recovered from sum and mean (the paper stores no counts): sum / mean must
    be a positive whole number, or the two columns disagree."""
    # A NaN or infinite score is a broken score, not a disagreement between the two columns.
    for column, values in ((sum_column, sums), (mean_column, means)):
        if not np.isfinite(values).all():
            position = np.argwhere(~np.isfinite(values))[0]
            source = names[int(position[1])] if names is not None and position.size > 1 else None
            raise ScoredSetError(
                f"{_where(path, ids, int(position[0]), column, source)}: log-prob must be finite, "
                f"got {float(values[tuple(int(p) for p in position)])!r}"
            )
    # inf/nan ratios (mean 0) are expected here and reported below.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = sums / means
        counts = np.rint(ratio)
        tolerance = np.maximum(_COUNT_REL_TOL * np.abs(counts), _COUNT_ABS_TOL)
        bad = ~np.isfinite(ratio) | (counts < 1) | (np.abs(ratio - counts) > tolerance)
    if bad.any():
        position = np.argwhere(bad)[0]
        row = int(position[0])
        source = names[int(position[1])] if names is not None and position.size > 1 else None
        cell = (row,) if position.size == 1 else (row, int(position[1]))
        raise ScoredSetError(
            f"{_where(path, ids, row, mean_column, source)}: the token count sum/mean = "
            f"{float(sums[cell])!r} / {float(means[cell])!r} = {float(ratio[cell])!r} is not a "
            f"positive whole number (columns {sum_column!r} and {mean_column!r} disagree)"
        )
    return counts.astype(np.int64)


def _validate(path: str, ids: Sequence[str], arrays: Mapping[str, np.ndarray]) -> None:
    """Duplicate ids, non-finite sums and non-positive token counts, with row, id and column."""
    seen: dict[str, int] = {}
    for row, row_id in enumerate(ids):
        if row_id in seen:
            raise ScoredSetError(
                f"{path}, row {row + 1}: duplicate id {row_id!r} (also at row {seen[row_id] + 1})"
            )
        seen[row_id] = row
    for column, values in arrays.items():
        if values.shape[0] != len(ids):
            raise ScoredSetError(f"{path}: column {column!r} has {values.shape[0]} rows, expected {len(ids)}")
        if column.endswith("_tokens"):
            bad = values < 1
            problem = "token count must be >= 1, got {value!r}"
        else:
            bad = ~np.isfinite(values)
            problem = "log-prob sum must be finite, got {value!r}"
        if bad.any():
            position = np.argwhere(bad)[0]
            row = int(position[0])
            label = column if position.size == 1 else f"{column}[{int(position[1])}]"
            raise ScoredSetError(
                f"{_where(path, ids, row, label)}: "
                + problem.format(value=values[tuple(int(p) for p in position)].item())
            )
