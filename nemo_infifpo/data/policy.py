"""What happens to a row that cannot be used: the same policy in every stage.

At 150k rows x several models, some rows will break somewhere (a malformed line, identical
responses, a template that cannot render one conversation). Each stage that meets such a row
(reading the data, scoring, merging, loading training data) applies one :class:`RowPolicy`:

- ``data.on_invalid_row: exclude`` (default) leaves the row out and records a
  :class:`RowExclusion` (id, stage, model, reason, detail); ``fail`` stops at the first one
  with its message;
- ``data.max_excluded_fraction`` (default 0.01): when more than this fraction of a stage's
  rows is excluded as invalid, the stage fails with :class:`TooManyExcludedRows`, whose
  message is one paragraph: counts by reason and the first few ids.

Rows left out by ``max_length`` are not invalid (they are a length choice) and do not count
towards the fraction; they are recorded all the same.

Usage in a stage::

    log = ExclusionLog(policy, stage="score", model="qwen")
    for row in rows:
        try:
            ...
        except TemplateError as error:
            log.reject(error, row_id=row.id)   # raises under on_invalid_row=fail
    log.check(total=len(rows))                 # raises above max_excluded_fraction
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from nemo_infifpo.data.errors import ConfigError, InputError

__all__ = [
    "INVALID_ROW_ACTIONS",
    "MAX_LENGTH_REASON",
    "ExclusionLog",
    "RowExclusion",
    "RowPolicy",
    "TooManyExcludedRows",
    "check_fraction",
    "summarize_exclusions",
]

INVALID_ROW_ACTIONS = ("exclude", "fail")
MAX_LENGTH_REASON = "max_length"
DEFAULT_MAX_EXCLUDED_FRACTION = 0.01
# Ids named in a summary; the full list is in the stage's report.
_IDS_SHOWN = 5


@dataclass(frozen=True)
class RowPolicy:
    """``data.on_invalid_row`` and ``data.max_excluded_fraction`` (see the module docstring)."""

    on_invalid_row: str = "exclude"
    max_excluded_fraction: float = DEFAULT_MAX_EXCLUDED_FRACTION

    def __post_init__(self) -> None:
        if self.on_invalid_row not in INVALID_ROW_ACTIONS:
            raise ConfigError(
                f"data.on_invalid_row must be one of {', '.join(INVALID_ROW_ACTIONS)}, "
                f"got {self.on_invalid_row!r}"
            )
        fraction = self.max_excluded_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError(
                f"data.max_excluded_fraction must be a number in [0, 1], got {fraction!r}"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> RowPolicy:
        """From a stage's ``data`` section (missing keys take the defaults)."""
        data = data or {}
        fraction = data.get("max_excluded_fraction", DEFAULT_MAX_EXCLUDED_FRACTION)
        if isinstance(fraction, str):
            try:
                fraction = float(fraction)
            except ValueError:
                raise ConfigError(
                    f"data.max_excluded_fraction must be a number in [0, 1], got {fraction!r}"
                ) from None
        return cls(
            on_invalid_row=str(data.get("on_invalid_row", "exclude")),
            max_excluded_fraction=fraction,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class RowExclusion:
    """One row left out: which (``id``; ``location`` when the id is unknown, e.g. a line that is
    not JSON), where (``stage``, ``model``), why (``reason``: a short code; ``detail``: the
    full message)."""

    id: str | None
    stage: str
    reason: str
    detail: str
    model: str | None = None
    location: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RowExclusion:
        return cls(
            id=None if data.get("id") is None else str(data["id"]),
            stage=str(data.get("stage", "unknown")),
            reason=str(data.get("reason", "invalid")),
            detail=str(data.get("detail", "")),
            model=data.get("model"),
            location=data.get("location"),
        )

    @property
    def label(self) -> str:
        return repr(self.id) if self.id is not None else (self.location or "?")


class TooManyExcludedRows(InputError):
    """More rows were invalid than ``data.max_excluded_fraction`` allows."""


@dataclass
class ExclusionLog:
    """The exclusions of one stage (for one model), applying a :class:`RowPolicy`."""

    policy: RowPolicy
    stage: str
    model: str | None = None
    entries: list[RowExclusion] = field(default_factory=list)

    def reject(self, error: Exception, *, row_id: str | None = None, location: str | None = None) -> RowExclusion:
        """Record ``error`` as the reason a row is left out, or re-raise it under ``fail``.

        The reason code is the error's ``reason`` attribute when it has one."""
        if self.policy.on_invalid_row == "fail":
            raise error
        entry = RowExclusion(
            id=row_id if row_id is not None else getattr(error, "row_id", None),
            stage=self.stage,
            reason=str(getattr(error, "reason", None) or "invalid"),
            detail=str(error),
            model=self.model,
            location=location,
        )
        self.entries.append(entry)
        return entry

    def add(self, entry: RowExclusion) -> None:
        self.entries.append(entry)

    @property
    def invalid(self) -> list[RowExclusion]:
        return [entry for entry in self.entries if entry.reason != MAX_LENGTH_REASON]

    def check(self, total: int, *, what: str = "rows") -> None:
        """Raise :class:`TooManyExcludedRows` when the invalid rows exceed the allowed fraction
        of ``total``."""
        check_fraction(self.invalid, total, self.policy, stage=self.stage, model=self.model, what=what)


def check_fraction(
    invalid: list[RowExclusion],
    total: int,
    policy: RowPolicy,
    *,
    stage: str,
    model: str | None = None,
    what: str = "rows",
) -> None:
    """The threshold test shared by :meth:`ExclusionLog.check` and the merge."""
    if not invalid:
        return
    allowed = math.floor(policy.max_excluded_fraction * total + 1e-9)
    if len(invalid) <= allowed:
        return
    where = f"stage {stage}" + (f", model {model}" if model else "")
    raise TooManyExcludedRows(
        f"{len(invalid)} of {total} {what} are invalid ({where}; "
        f"{100 * len(invalid) / max(total, 1):.2f}%), more than "
        f"data.max_excluded_fraction={policy.max_excluded_fraction} allows ({allowed}). "
        f"{summarize_exclusions(invalid)} Fix the data or the template (tokenizer.chat_template, "
        "tokenizer.chat_template_kwargs, tokenizer.boundary), or raise data.max_excluded_fraction "
        "to accept the loss."
    )


def summarize_exclusions(entries: Iterable[RowExclusion]) -> str:
    """``By reason: not_prefix_stable 12, identical_responses 3. First: 'a1' (line 7: ...), ...``"""
    entries = list(entries)
    if not entries:
        return "No rows excluded."
    counts = Counter(entry.reason for entry in entries)
    by_reason = ", ".join(f"{reason} {count}" for reason, count in counts.most_common())
    first = "; ".join(f"{entry.label}: {_clip(_essence(entry.detail))}" for entry in entries[:_IDS_SHOWN])
    return f"By reason: {by_reason}. First: {first}."


def _essence(detail: str) -> str:
    """The part of a message a summary needs: its stated cause when it has one (template
    errors end with "Cause: ..."), else the whole message."""
    _, marker, cause = detail.partition("Cause: ")
    return cause if marker else detail


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
