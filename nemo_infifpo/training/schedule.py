"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_lr`` (the paper's schedule).

The schedule is a pure function of the number of completed optimizer updates, so resuming
needs nothing but the step counter and the same config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["CosineSchedule"]


@dataclass(frozen=True)
class CosineSchedule:
    max_lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int

    @classmethod
    def from_fraction(cls, max_lr: float, min_lr: float, total_steps: int, warmup_fraction: float) -> "CosineSchedule":
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        warmup = min(total_steps, int(round(warmup_fraction * total_steps)))
        return cls(max_lr=max_lr, min_lr=min_lr, total_steps=total_steps, warmup_steps=warmup)

    def lr(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based: the update that makes ``step + 1`` steps).

        Warm-up starts at ``max_lr / warmup_steps`` rather than 0 so the first update moves the
        weights; the last update of the run uses ``min_lr``.
        """
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        decay_steps = self.total_steps - self.warmup_steps
        if decay_steps <= 1:
            return self.max_lr if decay_steps == 1 and step == self.warmup_steps else self.min_lr
        progress = min(1.0, (step - self.warmup_steps) / (decay_steps - 1))
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
