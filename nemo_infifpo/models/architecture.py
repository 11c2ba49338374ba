"""A model's architecture, read once from its Hugging Face config into plain numbers.

Everything downstream (megatron config, parallel-size validation, weight mapping, export)
works from :class:`ArchitectureSpec`, never from the HF config object directly, so the
per-family quirks of HF configs (``rope_parameters`` vs ``rope_theta``, explicit
``head_dim``, Phi-3's dropout names, ...) are resolved in one place: the family modules,
with the shared readers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nemo_infifpo.data.errors import ConfigError
from nemo_infifpo.models.errors import UnsupportedModelFeatureError, UnsupportedRopeScalingError

# RoPE variants megatron-core's RotaryEmbedding reproduces exactly (see RopeSpec).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# megatron's llama3 scaling hard-codes these (RotaryEmbedding._apply_scaling defaults); a
# config with other values would silently get different frequencies, so it is rejected.
_MEGATRON_LLAMA3_CONSTANTS = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding parameters in megatron's terms."""

    theta: float
    rotary_percent: float = 1.0
    scaling_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    scaling_factor: float = 1.0


@dataclass(frozen=True)
class ArchitectureSpec:
    """What megatron needs to rebuild an HF decoder-only model, and what export needs to undo it."""

    architecture: str  # HF class name, e.g. "Phi3ForCausalLM"
    family: str  # registry family, e.g. "phi3"
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # KV heads
    head_dim: int  # megatron kv_channels; may differ from hidden_size // heads (Mistral-Small)
    vocab_size: int  # the tokenizer's real vocabulary; never padded
    norm_eps: float
    rope: RopeSpec
    tied_embeddings: bool
    qkv_bias: bool
    attention_dropout: float
    hidden_dropout: float
    max_position_embeddings: int
    sliding_window: int | None  # tokens a query may see, itself included; None = full causal
    dtype: torch.dtype  # the dtype the HF weights are stored in

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


# --------------------------------------------------------------------------- shared readers


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """First attribute of ``config`` among ``names`` that is set (not None)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def read_head_dim(config: Any) -> int:
    """Explicit ``head_dim`` when the config has one, else hidden / heads (HF's own fallback)."""
    explicit = getattr(config, "head_dim", None)
    return int(explicit) if explicit else config.hidden_size // config.num_attention_heads


def read_dtype(config: Any) -> torch.dtype:
    # transformers 5 calls it ``dtype``; reading ``torch_dtype`` there only warns, so older
    # configs' spelling is looked up in the raw attributes.
    value = getattr(config, "dtype", None) or vars(config).get("torch_dtype") or "float32"
    if isinstance(value, torch.dtype):
        return value
    value = str(value).removeprefix("torch.")
    dtype = getattr(torch, value, None)
    if not isinstance(dtype, torch.dtype):
        raise UnsupportedModelFeatureError(f"unknown dtype {value!r} in the HF config")
    return dtype


DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def parse_dtype(
    value: torch.dtype | str | None,
    default: torch.dtype | None = None,
    *,
    allowed: tuple[str, ...] = DTYPE_NAMES,
    key: str = "dtype",
) -> torch.dtype:
    """A dtype option -> ``torch.dtype``: the one parser of every stage's ``dtype``.

    ``value`` is a name in ``allowed`` (``"torch."`` prefix accepted) or a ``torch.dtype``
    (returned as is); ``None`` or ``"auto"`` gives ``default`` where there is one. Anything
    else raises :class:`~nemo_infifpo.data.errors.ConfigError` (a ``ValueError``) naming
    ``key`` and the allowed names.
    """
    if isinstance(value, torch.dtype):
        return value
    if (value is None or value == "auto") and default is not None:
        return default
    name = str(value).removeprefix("torch.") if value is not None else None
    if name not in allowed:
        choices = ", ".join((*allowed, "auto") if default is not None else allowed)
        raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
    return getattr(torch, name)


def _rope_dicts(config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``rope_parameters``, legacy ``rope_scaling``) as dicts; transformers 5 uses the former."""
    params = getattr(config, "rope_parameters", None) or {}
    legacy = getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict) or not isinstance(legacy, dict):
        raise UnsupportedModelFeatureError(
            "per-layer-type rope_parameters are not supported (expected one dict for all layers)"
        )
    return dict(params), dict(legacy)


def read_rope(config: Any) -> RopeSpec:
    """RoPE base, partial rotary fraction and scaling, from either HF config generation.

    transformers >= 5 keeps ``rope_theta``/``partial_rotary_factor``/``rope_type`` inside
    ``config.rope_parameters``; older configs have ``rope_theta`` and ``rope_scaling`` at the
    top level. Both are accepted; unsupported scalings fail loudly instead of giving a
    model whose positions silently differ from the original.
    """
    params, legacy = _rope_dicts(config)
    merged = {**legacy, **params}
    theta = merged.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        theta = 10000.0
    partial = merged.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    partial = 1.0 if partial is None else float(partial)
    rope_type = str(merged.get("rope_type") or merged.get("type") or "default")
    factor = float(merged.get("factor") or 1.0)

    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedRopeScalingError(
            f"RoPE scaling {rope_type!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}); e.g. Phi-3 '128k' models use longrope/su and "
            "are not supported, their '4k' variants and Phi-4 are"
        )
    if rope_type == "llama3":
        for key, expected in _MEGATRON_LLAMA3_CONSTANTS.items():
            if float(merged.get(key, expected)) != float(expected):
                raise UnsupportedRopeScalingError(
                    f"llama3 RoPE scaling with {key}={merged.get(key)} is not supported "
                    f"(megatron-core implements {key}={expected} only)"
                )
    if not 0.0 < partial <= 1.0:
        raise UnsupportedModelFeatureError(f"partial_rotary_factor must be in (0, 1], got {partial}")
    return RopeSpec(theta=float(theta), rotary_percent=partial, scaling_type=rope_type, scaling_factor=factor)


def read_uniform_sliding_window(config: Any) -> int | None:
    """The sliding window if every layer uses the same one, None for full attention.

    Configs with ``layer_types`` (transformers 5) mark each layer; a mix of sliding and full
    layers is not reproduced by megatron's single ``window_size`` and is rejected.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        kinds = set(layer_types)
        if kinds == {"full_attention"}:
            return None
        if kinds != {"sliding_attention"}:
            raise UnsupportedModelFeatureError(
                f"mixed attention layer types {sorted(kinds)} are not supported "
                "(every layer must use the same attention)"
            )
    return int(window) if window else None


def reject_biases(config: Any, *names: str) -> None:
    """Fail for bias flags we do not map (e.g. Llama ``attention_bias`` also biases o_proj)."""
    for name in names:
        if getattr(config, name, False):
            raise UnsupportedModelFeatureError(f"{type(config).__name__}.{name}=True is not supported")


def describe_common(config: Any, *, family: str, architecture: str, **overrides: Any) -> ArchitectureSpec:
    """The fields every supported family reads the same way; families pass the rest."""
    fields: dict[str, Any] = dict(
        architecture=architecture,
        family=family,
        num_layers=int(config.num_hidden_layers),
        hidden_size=int(config.hidden_size),
        ffn_hidden_size=int(config.intermediate_size),
        num_attention_heads=int(config.num_attention_heads),
        num_query_groups=int(config_value(config, "num_key_value_heads", default=config.num_attention_heads)),
        head_dim=read_head_dim(config),
        vocab_size=int(config.vocab_size),
        norm_eps=float(config_value(config, "rms_norm_eps", default=1e-6)),
        rope=read_rope(config),
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=False,
        attention_dropout=float(config_value(config, "attention_dropout", default=0.0)),
        hidden_dropout=0.0,
        max_position_embeddings=int(config_value(config, "max_position_embeddings", default=4096)),
        sliding_window=read_uniform_sliding_window(config),
        dtype=read_dtype(config),
    )
    fields.update(overrides)
    act = config_value(config, "hidden_act", default="silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelFeatureError(f"hidden_act={act!r} is not supported (SwiGLU/silu only)")
    return ArchitectureSpec(**fields)
