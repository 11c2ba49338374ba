"""Llama and Mistral (``LlamaForCausalLM``, ``MistralForCausalLM``): separate q/k/v and gate/up.

Mistral differs only in config: an explicit ``head_dim`` that may differ from
hidden / heads (Mistral-Small-24B: 5120 / 32 heads, head_dim 128) and a sliding window.
"""

from __future__ import annotations

from typing import Any

from nemo_infifpo.models.architecture import ArchitectureSpec, describe_common, reject_biases
from nemo_infifpo.models.family import ModelFamily
from nemo_infifpo.models.families.common import (
    HF_LAYER,
    MEGATRON_LAYER,
    embedding_rule,
    layer_norm_rules,
    output_projection_rules,
    output_rules,
)
from nemo_infifpo.models.mapping import QKV, GatedMLP, WeightRule

SEPARATE_QKV_WEIGHTS = tuple(f"{HF_LAYER}.self_attn.{p}_proj.weight" for p in ("q", "k", "v"))
SEPARATE_GATE_UP_WEIGHTS = (f"{HF_LAYER}.mlp.gate_proj.weight", f"{HF_LAYER}.mlp.up_proj.weight")


def separate_projection_rules(*, qkv_bias: bool) -> tuple[WeightRule, ...]:
    rules: list[WeightRule] = [
        QKV(f"{MEGATRON_LAYER}.self_attention.linear_qkv.weight", SEPARATE_QKV_WEIGHTS),
        GatedMLP(f"{MEGATRON_LAYER}.mlp.linear_fc1.weight", SEPARATE_GATE_UP_WEIGHTS),
    ]
    if qkv_bias:
        biases = tuple(f"{HF_LAYER}.self_attn.{p}_proj.bias" for p in ("q", "k", "v"))
        rules.insert(1, QKV(f"{MEGATRON_LAYER}.self_attention.linear_qkv.bias", biases))
    return tuple(rules)


def describe(config: Any, architecture: str) -> ArchitectureSpec:
    # Llama's attention_bias biases o_proj too and mlp_bias every MLP projection; no
    # supported checkpoint uses them, so they are rejected rather than mapped half-way.
    reject_biases(config, "attention_bias", "mlp_bias")
    family = "mistral" if architecture.startswith("Mistral") else "llama"
    return describe_common(config, family=family, architecture=architecture)


def weight_rules(arch: ArchitectureSpec) -> tuple[WeightRule, ...]:
    return (
        embedding_rule(),
        *layer_norm_rules(),
        *separate_projection_rules(qkv_bias=False),
        *output_projection_rules(),
        *output_rules(arch),
    )


FAMILY = ModelFamily(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    describe=describe,
    weight_rules=weight_rules,
)
