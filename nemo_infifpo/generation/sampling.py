"""Sampling settings, the per-request seeds, and what a generated sample becomes.

Shared by both back ends, so that a vLLM run and a transformers run produce records with the
same meaning:

- a request is one prompt (its token ids: the model's own chat template with the generation
  prompt, rendered by :class:`~nemo_infifpo.data.templates.ResponseTokenizer`) asking for
  ``n`` samples; its seed is derived from ``sampling.seed`` and the prompt id
  (:func:`request_seed`), so a prompt's samples do not depend on which other prompts share its
  batch (vLLM) or on the shard layout;
- generation stops at a *stop token*: the end-of-turn marker the chat template writes after an
  assistant message, the tokenizer's EOS and the EOS ids of the model's generation config;
- a sample is recorded with ``finish_reason`` ``stop`` (it ended with a stop token, which
  counts in ``num_tokens`` but is not part of ``text``) or ``length`` (cut off at
  ``max_new_tokens``); ``text`` is decoded without special tokens.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nemo_infifpo.data.errors import ConfigError

__all__ = ["FINISH_REASONS", "GeneratedSample", "RawSample", "SamplingSettings", "finish_sample", "request_seed"]

FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingSettings:
    """``sampling.*``: ``temperature=0`` means greedy decoding."""

    n: int = 1
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"sampling.n must be an integer >= 1, got {self.n!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"sampling.temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"sampling.seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def request_seed(seed: int, prompt_id: str) -> int:
    """A 63-bit seed for one prompt's samples, from the run's seed and the prompt id."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class RawSample:
    """A back end's answer to one request sample: the generated token ids, and whether the
    back end stopped on a stop token (None: decide from the ids)."""

    token_ids: Sequence[int]
    stopped: bool | None = None


@dataclass(frozen=True)
class GeneratedSample:
    text: str
    num_tokens: int
    finish_reason: str


def finish_sample(raw: RawSample, stop_ids: Iterable[int], max_new_tokens: int, decode: Any) -> GeneratedSample:
    """The record of one sample: cut at the first stop token (counted, not decoded); a sample
    without one is ``length`` (it reached ``max_new_tokens``)."""
    stops = set(stop_ids)
    ids = list(raw.token_ids)
    end = next((i for i, token in enumerate(ids) if token in stops), None)
    if end is not None:
        return GeneratedSample(text=decode(ids[:end]), num_tokens=end + 1, finish_reason="stop")
    if raw.stopped:
        # A back end that stopped on a stop string, not a token: every id is text.
        return GeneratedSample(text=decode(ids), num_tokens=len(ids), finish_reason="stop")
    ids = ids[:max_new_tokens]
    return GeneratedSample(text=decode(ids), num_tokens=len(ids), finish_reason="length")
