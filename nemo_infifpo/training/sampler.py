"""Which rows make up each global batch, and which of them this data-parallel rank trains on.

The order is a pure function of (seed, epoch, step), so every rank computes the same global
batch without communication, and resuming needs only the number of completed steps:

* epoch ``e`` visits the rows in ``randperm(num_rows, seed + e)`` (or in file order without
  shuffling); a global batch is ``global_batch_size`` consecutive rows of that order;
* the rows that would not fill a last global batch of an epoch are dropped (every step
  averages the same number of pairs);
* data-parallel rank ``d`` takes the ``d``-th contiguous slice of the global batch, and splits
  it into micro-batches in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BatchPlan"]


@dataclass(frozen=True)
class BatchPlan:
    num_rows: int
    global_batch_size: int
    data_parallel_size: int
    seed: int
    shuffle: bool
    total_steps: int

    @classmethod
    def create(
        cls,
        *,
        num_rows: int,
        global_batch_size: int,
        data_parallel_size: int,
        seed: int,
        shuffle: bool,
        max_steps: int,
        max_epochs: int,
    ) -> "BatchPlan":
        """``max_steps=-1`` runs ``max_epochs`` epochs; otherwise ``max_steps`` wins."""
        steps_per_epoch = num_rows // global_batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"the training data has {num_rows} usable rows, fewer than one global batch "
                f"(model.global_batch_size={global_batch_size})"
            )
        total = max_steps if max_steps != -1 else max_epochs * steps_per_epoch
        return cls(num_rows, global_batch_size, data_parallel_size, seed, shuffle, total)

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    @property
    def pairs_per_rank(self) -> int:
        return self.global_batch_size // self.data_parallel_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_rows)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator)

    def global_batch(self, step: int) -> list[int]:
        """Row indices (into the training data) of the global batch of update ``step`` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size].tolist()

    def rank_share(self, step: int, dp_rank: int) -> list[int]:
        """This data-parallel rank's contiguous slice of the global batch."""
        share = self.pairs_per_rank
        return self.global_batch(step)[dp_rank * share : (dp_rank + 1) * share]
