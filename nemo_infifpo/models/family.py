"""What a supported model family contributes: how to read its config, and its weight table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.mapping import WeightRule


@dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]  # HF ``architectures`` class names this family handles
    # (hf_config, architecture name) -> spec; raises for config features it cannot reproduce.
    describe: Callable[[Any, str], ArchitectureSpec]
    # spec -> the declarative weight table (depends on the spec only for tied embeddings).
    weight_rules: Callable[[ArchitectureSpec], tuple[WeightRule, ...]]
