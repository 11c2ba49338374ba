"""Qwen2 / Qwen2.5 (``Qwen2ForCausalLM``): Llama layout plus biases on q, k and v."""

from __future__ import annotations

from typing import Any

from nemo_infifpo.models.architecture import ArchitectureSpec, describe_common
from nemo_infifpo.models.family import ModelFamily
from nemo_infifpo.models.families.common import embedding_rule, layer_norm_rules, output_projection_rules, output_rules
from nemo_infifpo.models.families.llama import separate_projection_rules
from nemo_infifpo.models.mapping import WeightRule


def describe(config: Any, architecture: str) -> ArchitectureSpec:
    return describe_common(config, family="qwen2", architecture=architecture, qkv_bias=True)


def weight_rules(arch: ArchitectureSpec) -> tuple[WeightRule, ...]:
    return (
        embedding_rule(),
        *layer_norm_rules(),
        *separate_projection_rules(qkv_bias=True),
        *output_projection_rules(),
        *output_rules(arch),
    )


FAMILY = ModelFamily(name="qwen2", architectures=("Qwen2ForCausalLM",), describe=describe, weight_rules=weight_rules)
