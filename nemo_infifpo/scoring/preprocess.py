"""Rendering and tokenising a scoring job's rows off the critical path.

Rendering a chat template and tokenising costs real time at the paper's scale (a few hundred
rows per second per core with real templates and vocabularies: minutes for 75k rows), and the
GPUs wait for it. So a job does it in two cheap parts instead of every rank doing all of it:

1. **Measure** (:func:`measure_rows`, before any model is loaded): the job's ranks split the
   rows (rank ``r`` of ``W`` takes every ``W``-th) and share only what planning needs: the two
   sequence lengths of each usable row, how the template changed its text, and the rows left
   out (too long, or invalid under the row policy). Every rank then holds the same plan, and
   the policy's fraction check fails the job before the model loads.
2. **Encode on demand** (:class:`BatchEncoder`): each data-parallel rank encodes only the rows
   of its own batches, right before their forward pass, so the first batch never waits for
   the tokenisation of rows it does not contain.

Per rank that is ``1/W`` of the rows measured plus ``1/DP`` encoded, instead of every row,
twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from nemo_infifpo.data.policy import ExclusionLog, RowExclusion, RowPolicy
from nemo_infifpo.data.rows import PreferenceRow
from nemo_infifpo.data.templates import ExcludedRow, ResponseTokenizer, TokenizedPair, TokenizedSequence

__all__ = ["BatchEncoder", "MeasuredRows", "measure_rows"]


@dataclass
class MeasuredRows:
    """What the ranks learned about the rows together (the same on every rank)."""

    # row id -> (chosen length, rejected length) for every usable row
    lengths: dict[str, tuple[int, int]] = field(default_factory=dict)
    # row id -> how the template changed each side's text (None: unchanged)
    text_changes: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)
    too_long: list[ExcludedRow] = field(default_factory=list)
    invalid: list[RowExclusion] = field(default_factory=list)

    def usable(self, rows: Sequence[PreferenceRow]) -> list[PreferenceRow]:
        return [row for row in rows if row.id in self.lengths]

    def excluded(self, rows: Sequence[PreferenceRow]) -> list[ExcludedRow | RowExclusion]:
        ids = {row.id for row in rows}
        return [e for e in self.too_long if e.id in ids] + [e for e in self.invalid if e.id in ids]

    def text_change_ids(self, rows: Sequence[PreferenceRow]) -> dict[str, list[str]]:
        """kind -> ids of ``rows`` whose response text the template changed (either side)."""
        changes: dict[str, set[str]] = {}
        for row in rows:
            for kind in self.text_changes.get(row.id, (None, None)):
                if kind is not None:
                    changes.setdefault(kind, set()).add(row.id)
        return {kind: sorted(ids) for kind, ids in changes.items()}


def measure_rows(
    tokenizer: ResponseTokenizer,
    rows: Sequence[PreferenceRow],
    world,
    policy: RowPolicy,
    *,
    model: str,
) -> MeasuredRows:
    """Measure ``rows`` split over the job's ranks (collective over ``world``, a
    :class:`~nemo_infifpo.scoring.backends.ScoringWorld`); raises under the row policy (first
    invalid row under ``fail``, more than ``max_excluded_fraction`` invalid rows otherwise)."""
    log = ExclusionLog(policy, stage="score", model=model)
    mine = MeasuredRows()
    for row in rows[world.rank :: world.world_size]:
        pair = tokenizer.try_encode(row, log)
        if pair is None:
            continue
        exclusion = tokenizer.exclusion(pair)
        if exclusion is not None:
            mine.too_long.append(exclusion)
            continue
        mine.lengths[row.id] = (len(pair.chosen), len(pair.rejected))
        mine.text_changes[row.id] = (pair.chosen.text_change, pair.rejected.text_change)
    mine.invalid = log.entries
    merged = MeasuredRows()
    for part in world.all_gather(mine):
        merged.lengths.update(part.lengths)
        merged.text_changes.update(part.text_changes)
        merged.too_long.extend(part.too_long)
        merged.invalid.extend(part.invalid)
    # Same order on every rank whatever the split (reports and sidecars are compared byte-wise).
    merged.too_long.sort(key=lambda e: e.id)
    merged.invalid.sort(key=lambda e: (e.id or "", e.reason))
    ExclusionLog(policy, stage="score", model=model, entries=merged.invalid).check(len(rows))
    return merged


class BatchEncoder:
    """The sequences of one shard, encoded when a batch needs them.

    Sequence ``2k`` is usable row ``k``'s chosen response, ``2k + 1`` its rejected one. A row
    is encoded once and kept only until both of its sequences were handed out (length-sorted
    batches often put them in different batches)."""

    def __init__(self, tokenizer: ResponseTokenizer, rows: Sequence[PreferenceRow], measured: MeasuredRows) -> None:
        self.tokenizer = tokenizer
        self.rows = list(rows)
        self.lengths = [n for row in self.rows for n in measured.lengths[row.id]]
        self._open: dict[int, tuple[TokenizedPair, int]] = {}  # row -> (pair, sides handed out)

    def sequences(self, indices: Sequence[int]) -> list[TokenizedSequence]:
        out = []
        for i in indices:
            row = i // 2
            pair, handed = self._open.get(row) or (self.tokenizer.encode_pair(self.rows[row]), 0)
            sequence = pair.rejected if i % 2 else pair.chosen
            if len(sequence) != self.lengths[i]:
                raise RuntimeError(
                    f"row {self.rows[row].id!r} encodes to {len(sequence)} tokens now but measured "
                    f"{self.lengths[i]}: the template renders differently between calls"
                )
            if handed + 1 == 2:
                self._open.pop(row, None)
            else:
                self._open[row] = (pair, handed + 1)
            out.append(sequence)
        return out
