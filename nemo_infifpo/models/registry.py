"""Which HF architectures are supported, and the lookup from an HF config to its family."""

from __future__ import annotations

from typing import Any

from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.families import llama, phi3, qwen2
from nemo_infifpo.models.family import ModelFamily
from nemo_infifpo.models.errors import UnsupportedArchitectureError
from nemo_infifpo.models.mapping import WeightRule

FAMILIES: tuple[ModelFamily, ...] = (phi3.FAMILY, llama.FAMILY, qwen2.FAMILY)

SUPPORTED_ARCHITECTURES: dict[str, ModelFamily] = {
    name: family for family in FAMILIES for name in family.architectures
}

# Configs built in code (not loaded from a checkpoint) may lack ``architectures``.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "phi3": "Phi3ForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def architecture_name(hf_config: Any) -> str:
    names = list(getattr(hf_config, "architectures", None) or [])
    if len(names) > 1:
        raise UnsupportedArchitectureError(f"config lists several architectures {names}; expected one")
    if names:
        return str(names[0])
    model_type = getattr(hf_config, "model_type", None)
    if model_type in _ARCHITECTURE_BY_MODEL_TYPE:
        return _ARCHITECTURE_BY_MODEL_TYPE[model_type]
    raise UnsupportedArchitectureError(
        f"config has no 'architectures' and model_type {model_type!r} is not supported; "
        f"supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def family_for(hf_config: Any) -> ModelFamily:
    name = architecture_name(hf_config)
    if name not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return SUPPORTED_ARCHITECTURES[name]


def describe_hf_config(hf_config: Any) -> ArchitectureSpec:
    """Read an HF config into an :class:`ArchitectureSpec`, rejecting what we cannot reproduce."""
    return family_for(hf_config).describe(hf_config, architecture_name(hf_config))


def weight_rules_for(arch: ArchitectureSpec) -> tuple[WeightRule, ...]:
    return SUPPORTED_ARCHITECTURES[arch.architecture].weight_rules(arch)
