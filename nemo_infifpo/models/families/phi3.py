"""Phi-3 / Phi-4 (``Phi3ForCausalLM``): fused ``qkv_proj`` and ``gate_up_proj``, partial RoPE."""

from __future__ import annotations

from typing import Any

from nemo_infifpo.models.architecture import ArchitectureSpec, config_value, describe_common
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


def describe(config: Any, architecture: str) -> ArchitectureSpec:
    # Phi-3 names its dropouts after GPT-2: resid_pdrop on the residual branches (megatron's
    # hidden_dropout); embd_pdrop on the embeddings, which megatron also drives with
    # hidden_dropout. Released Phi-3/Phi-4 checkpoints set both to 0.
    return describe_common(
        config,
        family="phi3",
        architecture=architecture,
        hidden_dropout=float(config_value(config, "resid_pdrop", default=0.0)),
    )


def weight_rules(arch: ArchitectureSpec) -> tuple[WeightRule, ...]:
    return (
        embedding_rule(),
        *layer_norm_rules(),
        QKV(f"{MEGATRON_LAYER}.self_attention.linear_qkv.weight", (f"{HF_LAYER}.self_attn.qkv_proj.weight",)),
        GatedMLP(f"{MEGATRON_LAYER}.mlp.linear_fc1.weight", (f"{HF_LAYER}.mlp.gate_up_proj.weight",)),
        *output_projection_rules(),
        *output_rules(arch),
    )


FAMILY = ModelFamily(name="phi3", architectures=("Phi3ForCausalLM",), describe=describe, weight_rules=weight_rules)
