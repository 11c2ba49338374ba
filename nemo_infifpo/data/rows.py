"""Preference rows: loading, normalisation and validation.

Every accepted input becomes a :class:`PreferenceRow` with

- ``id``: the row's ``id`` column (a string, or an integer turned into a string), or else a
  stable content hash (see :func:`content_hash_id`);
- ``prompt``: the messages before the response, ``[{"role": ..., "content": ...}, ...]``,
  roles ``system``/``user``/``assistant``, earlier turns included, ending with a user message;
- ``chosen`` / ``rejected``: the assistant message(s) of the preferred / dispreferred response.

Accepted row formats (extra columns are ignored):

TRL, string prompt::

    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}

TRL, conversational (prompt as messages; responses as strings or assistant messages)::

    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]}

Full conversations (the format published with the paper, as in UltraFeedback-binarized): the
prompt is everything before the trailing run of assistant messages, and must be identical in
``chosen`` and ``rejected``. A ``prompt`` column is optional; when present it must equal the
content of the last user message of that prefix (or, if it is a message list, the prefix)::

    {"prompt": "2+2?",
     "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]}

All of the above describe the same row. Files: ``.jsonl`` (one object per line, blank lines
skipped), ``.json`` (a list of objects), ``.parquet``, and a directory written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` needs ``split=``).

Problems raise :class:`PreferenceDataError`, whose message names the file, the row (the line
for JSONL), the row id when known and the field, e.g.
``data.jsonl, line 7 (id 'abc'): field 'chosen': expected a string or a list of messages, got int``.
Its ``reason`` is a short code (``invalid_json``, ``invalid_row``, ``empty_content``,
``identical_responses``, ``duplicate_id``, ``no_rows``, ``invalid_file``).

:func:`read_preference_rows` applies the row policy (:mod:`nemo_infifpo.data.policy`): a row
that cannot be used is left out and recorded, or stops the read, as ``data.on_invalid_row``
says. A row whose id occurs more than once is ambiguous, so every occurrence is left out.
Problems with the file as a whole (missing, unreadable, no rows at all) always stop the read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from nemo_infifpo.data.errors import InputError
from nemo_infifpo.data.policy import ExclusionLog, RowExclusion, RowPolicy

__all__ = [
    "ROLES",
    "Message",
    "PreferenceDataError",
    "PreferenceRow",
    "RowsRead",
    "content_hash_id",
    "iter_preference_rows",
    "load_preference_rows",
    "normalize_record",
    "read_preference_rows",
    "read_records",
    "rows_from_records",
]

Message = dict[str, str]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
HASH_ID_LENGTH = 16

_Row = TypeVar("_Row")


class PreferenceDataError(InputError):
    """A preference row (or file) that cannot be used, with where and why.

    The attributes let callers report or filter without parsing the message.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        location: str = "row",
        number: int | None = None,
        row_id: str | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.problem = problem
        self.reason = reason or ("invalid_row" if number is not None else "invalid_file")
        self.source = source
        self.location = location
        self.number = number
        self.row_id = row_id
        self.field = field
        where = ", ".join(
            part
            for part in (source, f"{location} {number}" if number is not None else None)
            if part
        )
        if row_id is not None:
            where = f"{where} (id {row_id!r})" if where else f"id {row_id!r}"
        what = f"field {field!r}: {problem}" if field else problem
        super().__init__(f"{where}: {what}" if where else what)

    @property
    def place(self) -> str | None:
        """``data.jsonl, line 7``: where the row is, for rows without a known id."""
        if self.number is None:
            return self.source
        return f"{self.source}, {self.location} {self.number}" if self.source else f"{self.location} {self.number}"


@dataclass(frozen=True)
class PreferenceRow:
    """One normalised preference pair; see the module docstring for the meaning of fields."""

    id: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]

    def to_record(self) -> dict[str, Any]:
        """A plain dict (fresh lists) in the conversational format, e.g. for writing files."""
        return {
            "id": self.id,
            "prompt": [dict(message) for message in self.prompt],
            "chosen": [dict(message) for message in self.chosen],
            "rejected": [dict(message) for message in self.rejected],
        }


def content_hash_id(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> str:
    """The id of a row without an ``id`` column: sha256 of a canonical JSON of the normalised
    messages (sorted keys, no whitespace, UTF-8), first 16 hex digits. The same content gives
    the same id whatever file format or key order it came from."""
    canonical = json.dumps(
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:HASH_ID_LENGTH]


# --------------------------------------------------------------------------- loading


def load_preference_rows(path: str | Path, *, split: str | None = None) -> list[PreferenceRow]:
    """All rows of a ``.jsonl``, ``.json``, ``.parquet`` file or ``datasets`` saved directory."""
    return list(iter_preference_rows(path, split=split))


def iter_preference_rows(path: str | Path, *, split: str | None = None) -> Iterator[PreferenceRow]:
    """Like :func:`load_preference_rows`, one row at a time (duplicate ids still detected);
    the first invalid row stops the read."""
    source, location, records = _open_records(Path(path), split)
    yield from _normalize_all(records, source=source, location=location)


@dataclass
class RowsRead:
    """The usable rows of a file, the rows left out (with why), and how many there were."""

    rows: list[PreferenceRow]
    excluded: list[RowExclusion]
    total: int  # records in the file, usable or not


def read_preference_rows(
    path: str | Path,
    *,
    split: str | None = None,
    policy: RowPolicy | None = None,
    stage: str = "read",
) -> RowsRead:
    """The rows of a data file under ``policy`` (see the module docstring): invalid rows are
    left out and recorded, or stop the read; too many of them stop it with a summary
    (:class:`~nemo_infifpo.data.policy.TooManyExcludedRows`). The same file and policy give
    the same rows in every stage and on every rank."""
    rows, excluded, total = read_records(path, normalize_record, split=split, policy=policy, stage=stage)
    return RowsRead(rows=rows, excluded=excluded, total=total)


def read_records(
    path: str | Path,
    normalize: Callable[..., _Row],
    *,
    split: str | None = None,
    policy: RowPolicy | None = None,
    stage: str = "read",
    what: str = "rows",
) -> tuple[list[_Row], list[RowExclusion], int]:
    """(usable rows in file order, rows left out, records in the file) of any accepted file,
    each record turned into a row by ``normalize(record, source=, number=, location=)`` (which
    raises :class:`PreferenceDataError`; the row has an ``id``). Invalid rows are left out and
    recorded, or stop the read, as ``policy`` says; a duplicated id leaves out every occurrence.
    ``what`` names the rows in errors (``rows``, ``prompts``)."""
    policy = policy or RowPolicy()
    log = ExclusionLog(policy, stage=stage)
    source, location, numbered = _open_records(Path(path), split)
    kept: list[tuple[int, _Row]] = []
    total = 0
    for number, record in numbered:
        total += 1
        try:
            kept.append((number, normalize(record, source=source, number=number, location=location)))
        except PreferenceDataError as error:
            log.reject(error, location=error.place)
    if total == 0:
        raise PreferenceDataError(f"no {what} (the file is empty)", source=source, reason="no_rows")

    # An id that occurs twice names two different rows: neither can be trusted to be the one
    # another model scored, so all of its occurrences go.
    numbers_of: dict[str, list[int]] = {}
    for number, row in kept:
        numbers_of.setdefault(row.id, []).append(number)
    rows = []
    for number, row in kept:
        numbers = numbers_of[row.id]
        if len(numbers) == 1:
            rows.append(row)
            continue
        others = ", ".join(f"{location} {n}" for n in numbers if n != number)
        log.reject(
            PreferenceDataError(
                f"duplicate id, also at {others}",
                source=source,
                location=location,
                number=number,
                row_id=row.id,
                field="id",
                reason="duplicate_id",
            ),
            location=f"{source}, {location} {number}",
        )
    log.check(total, what=what)
    if not rows:
        raise PreferenceDataError(f"no usable {what} (every row was excluded)", source=source, reason="no_rows")
    return rows, log.entries, total


def _open_records(path: Path, split: str | None) -> tuple[str, str, Iterable[tuple[int, Any]]]:
    """(source label, location word, numbered records) of any accepted file."""
    if not path.exists():
        raise FileNotFoundError(f"preference data not found: {path}")
    if path.is_dir():
        source, records = _datasets_records(path, split)
        return source, "row", records
    if split is not None:
        raise PreferenceDataError(
            f"split={split!r} only applies to a `datasets` saved directory", source=str(path)
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return str(path), "line", _jsonl_records(path)
    if suffix == ".json":
        return str(path), "row", _json_records(path)
    if suffix == ".parquet":
        return str(path), "row", _parquet_records(path)
    raise PreferenceDataError(
        "unsupported file type; expected .jsonl, .json, .parquet or a `datasets` saved directory",
        source=str(path),
    )


def rows_from_records(
    records: Iterable[Mapping[str, Any]], *, source: str = "<records>"
) -> list[PreferenceRow]:
    """Normalise in-memory records (rows numbered from 1), checking ids are unique."""
    return list(_normalize_all(enumerate(records, start=1), source=source, location="row"))


class _BadRecord:
    """A record that could not even be parsed; normalising it raises its error."""

    def __init__(self, error: PreferenceDataError) -> None:
        self.error = error


def _normalize_all(
    numbered_records: Iterable[tuple[int, Any]], *, source: str, location: str
) -> Iterator[PreferenceRow]:
    first_seen_at: dict[str, int] = {}
    for number, record in numbered_records:
        row = normalize_record(record, source=source, number=number, location=location)
        if row.id in first_seen_at:
            raise PreferenceDataError(
                f"duplicate id, also at {location} {first_seen_at[row.id]}",
                source=source,
                location=location,
                number=number,
                row_id=row.id,
                field="id",
                reason="duplicate_id",
            )
        first_seen_at[row.id] = number
        yield row


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line)
            except json.JSONDecodeError as error:
                # Yielded, not raised: under the exclude policy the next lines still count.
                yield line_number, _BadRecord(
                    PreferenceDataError(
                        f"invalid JSON: {error.msg} (column {error.colno})",
                        source=str(path),
                        location="line",
                        number=line_number,
                        reason="invalid_json",
                    )
                )


def _json_records(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PreferenceDataError(
            f"invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})",
            source=str(path),
        ) from None
    if not isinstance(data, list):
        raise PreferenceDataError(
            f"expected a JSON list of row objects, got {_type_name(data)}", source=str(path)
        )
    yield from enumerate(data, start=1)


def _parquet_records(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    number = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            number += 1
            yield number, record


def _datasets_records(path: Path, split: str | None) -> tuple[str, Iterator[tuple[int, Any]]]:
    import datasets  # slow to import; only needed for this format

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise PreferenceDataError(
            f"not a `datasets` saved directory ({error})", source=str(path)
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        available = ", ".join(repr(name) for name in loaded)
        if split is None:
            raise PreferenceDataError(
                f"this is a DatasetDict: pass split= (available: {available})", source=str(path)
            )
        if split not in loaded:
            raise PreferenceDataError(
                f"no split {split!r} (available: {available})", source=str(path)
            )
        return f"{path} (split {split!r})", enumerate(loaded[split], start=1)
    if split is not None:
        raise PreferenceDataError(
            f"split={split!r} given, but this is a single Dataset without splits",
            source=str(path),
        )
    return str(path), enumerate(loaded, start=1)


# --------------------------------------------------------------------------- normalisation


class _RowContext:
    """Where the row under normalisation came from, to build precise errors."""

    def __init__(self, source: str, location: str, number: int | None) -> None:
        self.source = source
        self.location = location
        self.number = number
        self.row_id: str | None = None

    def error(self, field: str | None, problem: str, *, reason: str = "invalid_row") -> PreferenceDataError:
        return PreferenceDataError(
            problem,
            source=self.source,
            location=self.location,
            number=self.number,
            row_id=self.row_id,
            field=field,
            reason=reason,
        )


def normalize_record(
    record: Any,
    *,
    source: str = "<record>",
    number: int | None = None,
    location: str = "row",
) -> PreferenceRow:
    """Turn one record in any accepted format into a :class:`PreferenceRow` (no duplicate check:
    that needs the whole file, see :func:`rows_from_records`)."""
    if isinstance(record, _BadRecord):
        raise record.error
    context = _RowContext(source, location, number)
    if not isinstance(record, Mapping):
        raise context.error(
            None, f"expected an object with prompt/chosen/rejected, got {_type_name(record)}"
        )

    explicit_id = _parse_id(record.get("id"), context)
    context.row_id = explicit_id

    chosen_prefix, chosen = _parse_response_side(record, "chosen", context)
    rejected_prefix, rejected = _parse_response_side(record, "rejected", context)
    if chosen_prefix != rejected_prefix:
        raise context.error(
            "rejected",
            "the prompt part of the conversation differs from the one in 'chosen' "
            f"({_first_difference(chosen_prefix, rejected_prefix)})",
        )
    prompt = _resolve_prompt(record.get("prompt"), chosen_prefix, context)
    if chosen == rejected:
        raise context.error("rejected", "identical to 'chosen'", reason="identical_responses")

    row_id = explicit_id if explicit_id is not None else content_hash_id(prompt, chosen, rejected)
    return PreferenceRow(id=row_id, prompt=prompt, chosen=chosen, rejected=rejected)


def _parse_id(value: Any, context: _RowContext) -> str | None:
    if value is None:
        return None
    # bool is an int subclass, but True is not an id anyone meant.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, str):
        raise context.error("id", "empty string")
    raise context.error("id", f"expected a string or an integer, got {_type_name(value)}")


def _parse_response_side(
    record: Mapping[str, Any], field: str, context: _RowContext
) -> tuple[list[Message], list[Message]]:
    """(conversation prefix, trailing assistant messages) of ``chosen`` or ``rejected``."""
    value = record.get(field)
    if value is None:
        raise context.error(field, "missing")
    if isinstance(value, str):
        _check_content(value, field, context)
        return [], [{"role": "assistant", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise context.error(
            field, f"expected a string or a list of assistant messages, got {_type_name(value)}"
        )
    messages = _parse_messages(value, field, context)
    split_at = len(messages)
    while split_at > 0 and messages[split_at - 1]["role"] == "assistant":
        split_at -= 1
    if split_at == len(messages):
        raise context.error(
            field, f"does not end with an assistant message (last role {messages[-1]['role']!r})"
        )
    return messages[:split_at], messages[split_at:]


def _resolve_prompt(
    value: Any, conversation_prefix: list[Message], context: _RowContext
) -> list[Message]:
    if conversation_prefix:
        prompt = conversation_prefix
        _check_prompt_ends_with_user(prompt, "chosen", context)
        if isinstance(value, str):
            last_user = prompt[-1]["content"]
            if value != last_user:
                raise context.error(
                    "prompt",
                    "differs from the last user message of the conversation in 'chosen' "
                    f"({_preview(value)} vs {_preview(last_user)})",
                )
        elif isinstance(value, (list, tuple)):
            if _parse_messages(value, "prompt", context) != prompt:
                raise context.error(
                    "prompt", "differs from the messages before the response in 'chosen'"
                )
        elif value is not None:
            raise context.error(
                "prompt", f"expected a string or a list of messages, got {_type_name(value)}"
            )
        return prompt

    if value is None:
        raise context.error(
            "prompt", "missing (and 'chosen' holds no conversation to take it from)"
        )
    if isinstance(value, str):
        _check_content(value, "prompt", context)
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)):
        raise context.error(
            "prompt", f"expected a string or a list of messages, got {_type_name(value)}"
        )
    prompt = _parse_messages(value, "prompt", context)
    _check_prompt_ends_with_user(prompt, "prompt", context)
    return prompt


def _check_prompt_ends_with_user(prompt: list[Message], field: str, context: _RowContext) -> None:
    if prompt[-1]["role"] != "user":
        raise context.error(
            field, f"the prompt must end with a user message, it ends with {prompt[-1]['role']!r}"
        )


def _parse_messages(
    value: list[Any] | tuple[Any, ...], field: str, context: _RowContext
) -> list[Message]:
    if not value:
        raise context.error(field, "empty list of messages")
    messages: list[Message] = []
    for index, message in enumerate(value):
        where = f"{field}[{index}]"
        if not isinstance(message, Mapping):
            raise context.error(
                where, f"expected a message with 'role' and 'content', got {_type_name(message)}"
            )
        role = message.get("role")
        if role is None:
            raise context.error(f"{where}.role", "missing")
        if role not in ROLES:
            raise context.error(
                f"{where}.role", f"unknown role {role!r} (expected one of {', '.join(ROLES)})"
            )
        content = message.get("content")
        if content is None:
            raise context.error(f"{where}.content", "missing")
        _check_content(content, f"{where}.content", context)
        # Only role and content matter to scoring; other keys (name, ...) are dropped.
        messages.append({"role": role, "content": content})
    return messages


def _check_content(content: Any, field: str, context: _RowContext) -> None:
    if not isinstance(content, str):
        raise context.error(field, f"expected a string, got {_type_name(content)}")
    if not content.strip():
        raise context.error(field, "empty content", reason="empty_content")


def _first_difference(first: list[Message], second: list[Message]) -> str:
    for index, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return f"first at message {index}"
    return f"{len(first)} vs {len(second)} messages"


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
