"""Token-budget batches of tokenised sequences, and their padded tensors.

Scoring is forward-only, so a batch's cost is its padded size ``num_sequences x padded_length``.
Sorting sequences by length before cutting batches keeps sequences of similar length together,
which removes most of the padding a file-order batching would compute (see
``benchmarks/scoring_throughput.py``). Longest first: the largest batch runs first, so a token
budget that does not fit in memory fails within seconds, not hours into the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nemo_infifpo.data.templates import TokenizedSequence
from nemo_infifpo.engine.batches import PAD_ID, padded_length

__all__ = ["Batch", "BatchStats", "batch_stats", "collate", "padded_length", "plan_batches"]


@dataclass(frozen=True)
class Batch:
    """Indices (into the caller's sequence list) of the sequences scored together."""

    indices: tuple[int, ...]
    padded_length: int

    @property
    def padded_tokens(self) -> int:
        return len(self.indices) * self.padded_length


@dataclass(frozen=True)
class BatchStats:
    num_batches: int
    real_tokens: int
    padded_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


def plan_batches(
    lengths: Sequence[int],
    max_tokens: int,
    *,
    sort_by_length: bool = True,
    pad_to_multiple_of: int = 1,
    max_sequences: int | None = None,
) -> list[Batch]:
    """Greedy batches whose padded size ``len(batch) * padded_length`` stays within ``max_tokens``.

    With ``sort_by_length`` the sequences are taken longest first (ties in index order, so the
    plan is deterministic); otherwise in the given order. A sequence longer than the budget on
    its own gets a batch to itself rather than being dropped. Every index appears exactly once.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if max_sequences is not None and max_sequences < 1:
        raise ValueError(f"max_sequences must be >= 1, got {max_sequences}")
    order = list(range(len(lengths)))
    if sort_by_length:
        order.sort(key=lambda i: (-lengths[i], i))

    batches: list[Batch] = []
    current: list[int] = []
    current_length = 0
    for i in order:
        length = padded_length(lengths[i], pad_to_multiple_of)
        new_length = max(current_length, length)
        full = max_sequences is not None and len(current) >= max_sequences
        if current and (full or (len(current) + 1) * new_length > max_tokens):
            batches.append(Batch(tuple(current), current_length))
            current, new_length = [], length
        current.append(i)
        current_length = new_length
    if current:
        batches.append(Batch(tuple(current), current_length))
    return batches


def batch_stats(batches: Sequence[Batch], lengths: Sequence[int]) -> BatchStats:
    return BatchStats(
        num_batches=len(batches),
        real_tokens=sum(lengths[i] for batch in batches for i in batch.indices),
        padded_tokens=sum(batch.padded_tokens for batch in batches),
    )


def collate(
    sequences: Sequence[TokenizedSequence], padded_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``tokens`` [B, S] (long) and ``response_mask`` [B, S] (bool, True on the
    response tokens: the positions whose log-probs are summed).

    Right padding with causal attention: a real token never attends to the padding after it,
    so no attention mask beyond the causal one is needed and padding cannot change a score.
    """
    width = max(len(seq) for seq in sequences)
    if padded_length is not None:
        if padded_length < width:
            raise ValueError(f"padded_length {padded_length} < longest sequence {width}")
        width = padded_length
    tokens = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = torch.tensor(seq.input_ids, dtype=torch.long)
        mask[row, seq.response_start : len(seq)] = True
    return tokens, mask
