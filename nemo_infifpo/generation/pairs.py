"""From judged candidates to preference pairs: the selection rules and the split.

Per prompt, the candidates are every model's answers, in ``generation_dirs`` order and then by
sample index (the *candidate order*). A candidate is usable unless (first reason that applies):

``unjudged``   the judge left it out (it raised, returned NaN, ...; see the judge's sidecars);
``empty``      its text is empty or only whitespace;
``truncated``  it was cut off at ``max_new_tokens`` (``finish_reason=length``); kept with
               ``pairs.allow_truncated=true``;
``duplicate``  its text (whitespace-stripped) equals that of an earlier usable candidate of the
               same prompt: the first occurrence stays, with its own score.

Then ``chosen`` = the usable candidate with the highest score, ties going to the first in
candidate order; ``rejected`` = the one with the lowest score, ties going to the last. A prompt
yields no pair (and is counted under its reason) when it has fewer than two usable candidates
(``fewer_than_two_usable``), or when ``chosen_score - rejected_score <= pairs.min_gap``
(``score_gap_too_small``; with the default ``min_gap=0`` that means all usable answers scored
the same: no preference to learn).

Split: a prompt goes to the SFT part when ``u(id) < split.sft_fraction``, with
``u(id) = int(sha256(split.salt + "\\0" + id)[:16 hex], 16) / 2**64``: stable, independent of
the other prompts, of the file order and of the rules; a prompt's part never changes when prompts
are added or removed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nemo_infifpo.data.errors import ConfigError

__all__ = ["Candidate", "PairRules", "ScoreStats", "Selection", "select_pair", "split_part", "split_value"]

CANDIDATE_REASONS = ("unjudged", "empty", "truncated", "duplicate")
PROMPT_REASONS = ("no_candidates", "fewer_than_two_usable", "score_gap_too_small")


@dataclass(frozen=True)
class PairRules:
    allow_truncated: bool = False
    min_gap: float = 0.0
    sft_fraction: float = 0.5
    salt: str = "infifpo"

    def __post_init__(self) -> None:
        if not isinstance(self.min_gap, (int, float)) or isinstance(self.min_gap, bool) or self.min_gap < 0:
            raise ConfigError(f"pairs.min_gap must be a number >= 0, got {self.min_gap!r}")
        if not isinstance(self.sft_fraction, (int, float)) or not 0 <= self.sft_fraction <= 1:
            raise ConfigError(f"split.sft_fraction must be in [0, 1], got {self.sft_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"allow_truncated": self.allow_truncated, "min_gap": float(self.min_gap),
                "sft_fraction": float(self.sft_fraction), "salt": self.salt}


@dataclass(frozen=True)
class Candidate:
    model: str
    sample_index: int
    text: str
    finish_reason: str
    score: float | None


@dataclass
class Selection:
    """What the rules made of one prompt's candidates."""

    chosen: Candidate | None = None
    rejected: Candidate | None = None
    prompt_reason: str | None = None  # why there is no pair
    usable: list[Candidate] = field(default_factory=list)
    excluded: list[tuple[Candidate, str]] = field(default_factory=list)


def select_pair(candidates: Sequence[Candidate], rules: PairRules) -> Selection:
    """Apply the module's rules to candidates given in candidate order."""
    selection = Selection()
    seen: set[str] = set()
    for candidate in candidates:
        reason = None
        if candidate.score is None:
            reason = "unjudged"
        elif not candidate.text.strip():
            reason = "empty"
        elif candidate.finish_reason == "length" and not rules.allow_truncated:
            reason = "truncated"
        elif candidate.text.strip() in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(candidate.text.strip())
            selection.usable.append(candidate)
        else:
            selection.excluded.append((candidate, reason))
    usable = selection.usable
    if not candidates:
        selection.prompt_reason = "no_candidates"
        return selection
    if len(usable) < 2:
        selection.prompt_reason = "fewer_than_two_usable"
        return selection
    best = max(c.score for c in usable)  # type: ignore[type-var]
    worst = min(c.score for c in usable)  # type: ignore[type-var]
    chosen = next(c for c in usable if c.score == best)
    rejected = next(c for c in reversed(usable) if c.score == worst)
    if best - worst <= rules.min_gap:  # type: ignore[operator]
        selection.prompt_reason = "score_gap_too_small"
        return selection
    selection.chosen, selection.rejected = chosen, rejected
    return selection


def split_value(prompt_id: str, salt: str) -> float:
    """``u(id)`` in [0, 1) (see the module docstring)."""
    digest = hashlib.sha256(f"{salt}\0{prompt_id}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2.0**64


def split_part(prompt_id: str, rules: PairRules) -> str:
    return "sft" if split_value(prompt_id, rules.salt) < rules.sft_fraction else "preference"


class ScoreStats:
    """Count, mean, standard deviation, min/max (exact, streaming) and quantiles from a bounded,
    seeded reservoir sample: memory does not grow with the number of answers."""

    RESERVOIR = 10_000

    def __init__(self) -> None:
        self.count = 0
        self._mean = 0.0
        self._m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self._sample: list[float] = []
        self._random = random.Random(0)

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (value - self._mean)
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if len(self._sample) < self.RESERVOIR:
            self._sample.append(value)
        else:
            slot = self._random.randrange(self.count)
            if slot < self.RESERVOIR:
                self._sample[slot] = value

    def to_dict(self) -> dict[str, Any]:
        if not self.count:
            return {"count": 0}
        ordered = sorted(self._sample)

        def quantile(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return {"count": self.count, "mean": self._mean, "std": (self._m2 / self.count) ** 0.5, "min": self.min,
                "p10": quantile(0.1), "p50": quantile(0.5), "p90": quantile(0.9), "max": self.max}
