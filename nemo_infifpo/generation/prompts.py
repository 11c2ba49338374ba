"""Prompt rows: what the data-construction stages (generate, judge, build pairs) read.

Accepted rows (JSONL, JSON list, Parquet or a ``datasets`` saved directory, read by the same
file reader as preference rows)::

    {"id": "m-17", "prompt": "What is 2+2?", "reference": "4"}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}

- ``prompt``: a non-empty string (one user message) or a list of messages ending with a user
  message (roles ``system``/``user``/``assistant``);
- ``id``: optional string or integer; without it, a content hash of the prompt messages
  (:func:`prompt_hash_id`), so the same prompt gets the same id in every stage;
- every other column is kept as it is (``extra``), e.g. a reference answer or unit tests for
  a function judge, and is written next to the pairs built from the row.

Invalid rows follow the project's row policy (:mod:`nemo_infifpo.data.policy`): left out and
recorded, or fatal, under ``data.on_invalid_row``; a duplicated id leaves out every occurrence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.data.policy import RowExclusion, RowPolicy
from nemo_infifpo.data.rows import ROLES, Message, PreferenceDataError, _BadRecord, read_records
from nemo_infifpo.data.scored_set import canonical_json

__all__ = ["PromptRow", "PromptsRead", "prompt_hash_id", "prompts_fingerprint", "read_prompt_rows"]

HASH_ID_LENGTH = 16


@dataclass(frozen=True)
class PromptRow:
    """One prompt: its id, its messages, and the row's other columns (kept, never read here)."""

    id: str
    messages: list[Message]
    extra: dict[str, Any]

    def to_record(self) -> dict[str, Any]:
        """The row as written next to its pairs: extra columns, then ``id`` and ``prompt``."""
        return {**self.extra, "id": self.id, "prompt": [dict(m) for m in self.messages]}


@dataclass
class PromptsRead:
    rows: list[PromptRow]  # sorted by id
    excluded: list[RowExclusion]
    total: int


def prompt_hash_id(messages: list[Message]) -> str:
    """sha256 of the canonical JSON of the prompt messages, first 16 hex digits."""
    return hashlib.sha256(canonical_json({"prompt": messages}).encode("utf-8")).hexdigest()[:HASH_ID_LENGTH]


def prompts_fingerprint(rows: Iterable[PromptRow], *, with_extra: bool) -> str:
    """sha256 of the rows in id order: ids and messages, and the extra columns when
    ``with_extra`` (they matter to a function judge, not to a generator)."""
    digest = hashlib.sha256()
    for row in sorted(rows, key=lambda r: r.id):
        record = row.to_record() if with_extra else {"id": row.id, "prompt": row.messages}
        digest.update(canonical_json(record).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def read_prompt_rows(
    path: str | Path,
    *,
    split: str | None = None,
    policy: RowPolicy | None = None,
    stage: str = "read",
) -> PromptsRead:
    """The usable prompt rows of a file, sorted by id (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts not found: {path}")
    rows, excluded, total = read_records(
        path, normalize_prompt_record, split=split, policy=policy, stage=stage, what="prompts"
    )
    rows.sort(key=lambda r: r.id)
    return PromptsRead(rows=rows, excluded=excluded, total=total)


def normalize_prompt_record(record: Any, *, source: str, number: int | None, location: str = "row") -> PromptRow:
    """One record as a :class:`PromptRow`; raises :class:`PreferenceDataError` naming the field."""
    if isinstance(record, _BadRecord):
        raise record.error  # a line that was not JSON

    def error(field: str | None, problem: str, row_id: str | None = None, reason: str = "invalid_row") -> PreferenceDataError:
        return PreferenceDataError(problem, source=source, location=location, number=number,
                                   row_id=row_id, field=field, reason=reason)

    if not isinstance(record, Mapping):
        raise error(None, f"expected an object with a 'prompt', got {type(record).__name__}")
    raw_id = record.get("id")
    row_id: str | None
    if raw_id is None:
        row_id = None
    elif isinstance(raw_id, int) and not isinstance(raw_id, bool):
        row_id = str(raw_id)
    elif isinstance(raw_id, str) and raw_id.strip():
        row_id = raw_id
    else:
        raise error("id", f"expected a non-empty string or an integer, got {raw_id!r}")
    prompt = record.get("prompt")
    if prompt is None:
        raise error("prompt", "missing", row_id)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise error("prompt", "empty content", row_id, reason="empty_content")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise error("prompt", "empty list of messages", row_id)
        messages = []
        for index, message in enumerate(prompt):
            where = f"prompt[{index}]"
            if not isinstance(message, Mapping):
                raise error(where, f"expected a message with 'role' and 'content', got {type(message).__name__}", row_id)
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise error(f"{where}.role", f"expected one of {', '.join(ROLES)}, got {role!r}", row_id)
            if not isinstance(content, str):
                raise error(f"{where}.content", f"expected a string, got {type(content).__name__}", row_id)
            if not content.strip():
                raise error(f"{where}.content", "empty content", row_id, reason="empty_content")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "user":
            raise error("prompt", f"must end with a user message, it ends with {messages[-1]['role']!r}", row_id)
    else:
        raise error("prompt", f"expected a string or a list of messages, got {type(prompt).__name__}", row_id)
    extra = {key: value for key, value in record.items() if key not in ("id", "prompt")}
    return PromptRow(id=row_id if row_id is not None else prompt_hash_id(messages), messages=messages, extra=extra)
