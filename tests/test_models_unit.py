"""Architecture registry, parallel-size validation, weight-mapping transforms, tiny models.

Fast, single-process, no torch.distributed: everything here is config arithmetic or pure
tensor reshuffling, checked against hand-built expectations and real model shapes (Phi-4,
Mistral-Small-24B, Qwen2.5-14B configs are built in code, no download).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from nemo_infifpo.data.errors import ConfigError
from nemo_infifpo.models.architecture import ArchitectureSpec, RopeSpec, parse_dtype, read_rope
from nemo_infifpo.models.errors import (
    ParallelLayoutError,
    UnsupportedArchitectureError,
    UnsupportedModelFeatureError,
    UnsupportedRopeScalingError,
)
from nemo_infifpo.models.mapping import (
    QKV,
    Copy,
    GatedMLP,
    ShardContext,
    canonical_megatron_name,
    expected_hf_names,
    exported_hf_names,
    to_hf_tensors,
    to_megatron_shard,
)
from nemo_infifpo.models.megatron_model import build_transformer_config, rope_kwargs
from nemo_infifpo.models.parallel import (
    ParallelLayout,
    padded_vocab_size,
    stage_layer_counts,
    valid_tensor_parallel_sizes,
    validate_parallel_layout,
)
from nemo_infifpo.models.registry import describe_hf_config, weight_rules_for
from nemo_infifpo.testing.models import TINY_FAMILIES, tiny_hf_config, tiny_hf_model

SUPPORTED = "Phi3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"


def phi4_config() -> Phi3Config:
    config = Phi3Config(
        vocab_size=100352,
        hidden_size=5120,
        intermediate_size=17920,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=10,
        max_position_embeddings=16384,
        rope_theta=250000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["Phi3ForCausalLM"]
    return config


def mistral_small_config() -> MistralConfig:
    config = MistralConfig(
        vocab_size=131072,
        hidden_size=5120,
        intermediate_size=32768,
        num_hidden_layers=40,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=100000000.0,
        sliding_window=None,
    )
    config.architectures = ["MistralForCausalLM"]
    return config


# --------------------------------------------------------------------------- registry


def test_phi4_reads_into_megatron_terms() -> None:
    arch = describe_hf_config(phi4_config())
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size) == (40, 5120, 17920)
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (40, 10, 128)
    assert arch.rope == RopeSpec(theta=250000.0, rotary_percent=1.0)
    assert not arch.tied_embeddings and not arch.qkv_bias and arch.sliding_window is None
    assert arch.dtype == torch.bfloat16
    assert valid_tensor_parallel_sizes(arch) == [1, 2, 5, 10]


def test_parse_dtype_is_the_one_dtype_parser() -> None:
    assert parse_dtype("bfloat16") == torch.bfloat16
    assert parse_dtype("torch.float16") == torch.float16
    assert parse_dtype(torch.float32) == torch.float32
    assert parse_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert parse_dtype(None, torch.float16) == torch.float16
    # Errors name the key and every allowed value, and are ConfigErrors (ValueErrors).
    with pytest.raises(ConfigError, match=r"^dtype must be one of float32, bfloat16, got 'float16'$"):
        parse_dtype("float16", allowed=("float32", "bfloat16"))
    with pytest.raises(ConfigError, match=r"^export\.dtype must be one of float32, bfloat16, float16, auto, got 'fp8'$"):
        parse_dtype("fp8", torch.float32, key="export.dtype")
    with pytest.raises(ValueError, match="got None"):
        parse_dtype(None)


def test_transformer_config_reproduces_the_hf_model_exactly() -> None:
    arch = describe_hf_config(phi4_config())
    config = build_transformer_config(
        arch, ParallelLayout(2, 2), params_dtype=torch.bfloat16, use_cpu_initialization=True
    )
    # TransformerConfig defaults both dropouts to 0.1: they must come from the HF config.
    assert config.hidden_dropout == 0.0 and config.attention_dropout == 0.0
    assert (config.num_query_groups, config.kv_channels, config.ffn_hidden_size) == (10, 128, 17920)
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-5
    assert config.gated_linear_unit and config.activation_func is torch.nn.functional.silu
    assert not config.add_bias_linear and not config.add_qkv_bias
    assert config.bf16 and config.params_dtype == torch.bfloat16
    assert config.window_size is None
    assert rope_kwargs(arch) == {"position_embedding_type": "rope", "rotary_percent": 1.0, "rotary_base": 250000.0}


def test_mistral_small_explicit_head_dim_becomes_kv_channels() -> None:
    arch = describe_hf_config(mistral_small_config())
    assert arch.head_dim == 128 != arch.hidden_size // arch.num_attention_heads
    config = build_transformer_config(arch, ParallelLayout(8, 1), params_dtype=torch.float32, use_cpu_initialization=True)
    assert config.kv_channels == 128
    assert valid_tensor_parallel_sizes(arch) == [1, 2, 4, 8]


def test_qwen2_has_qkv_bias_only() -> None:
    config = Qwen2Config(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8)
    arch = describe_hf_config(config)  # no `architectures`: falls back to model_type
    assert arch.architecture == "Qwen2ForCausalLM" and arch.qkv_bias
    built = build_transformer_config(arch, ParallelLayout(), params_dtype=torch.float32, use_cpu_initialization=True)
    assert built.add_qkv_bias and not built.add_bias_linear


def test_phi3_mini_4k_sliding_window_maps_to_megatron_window() -> None:
    config = Phi3Config(sliding_window=2047)
    arch = describe_hf_config(config)
    assert arch.sliding_window == 2047
    built = build_transformer_config(arch, ParallelLayout(), params_dtype=torch.float32, use_cpu_initialization=True)
    # HF: a query sees the 2047 most recent tokens including itself = 2046 others.
    assert built.window_size == (2046, 0)


def test_partial_rotary_factor_is_rotary_percent() -> None:
    arch = describe_hf_config(tiny_hf_config("phi3"))
    assert arch.rope.rotary_percent == 0.75
    assert rope_kwargs(arch)["rotary_percent"] == 0.75


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    config = LlamaConfig()
    config.architectures = ["GemmaForCausalLM"]
    with pytest.raises(UnsupportedArchitectureError, match=f"'GemmaForCausalLM' is not supported; supported architectures: {SUPPORTED}"):
        describe_hf_config(config)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ],
    ids=["longrope", "yarn", "dynamic"],
)
def test_unsupported_rope_scaling_is_rejected(rope: dict) -> None:
    config = SimpleNamespace(rope_parameters=rope)
    with pytest.raises(UnsupportedRopeScalingError, match=f"RoPE scaling '{rope['rope_type']}' is not supported"):
        read_rope(config)


def test_phi3_128k_longrope_config_is_rejected() -> None:
    config = Phi3Config(
        hidden_size=3072,
        num_attention_heads=32,
        rope_scaling={
            "type": "su",
            "short_factor": [1.0] * 48,
            "long_factor": [2.0] * 48,
            "original_max_position_embeddings": 4096,
        },
        max_position_embeddings=131072,
    )
    with pytest.raises(UnsupportedRopeScalingError, match="longrope"):
        describe_hf_config(config)


def test_llama3_rope_with_other_constants_is_rejected() -> None:
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "rope_theta": 500000.0}
    with pytest.raises(UnsupportedRopeScalingError, match="low_freq_factor=2.0"):
        read_rope(SimpleNamespace(rope_parameters=rope))


def test_transformers4_style_rope_fields_are_read() -> None:
    legacy = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}, partial_rotary_factor=0.5)
    assert read_rope(legacy) == RopeSpec(theta=500000.0, rotary_percent=0.5, scaling_type="linear", scaling_factor=2.0)
    assert read_rope(SimpleNamespace(rope_theta=1e6)) == RopeSpec(theta=1e6)


def test_llama_attention_bias_and_mixed_sliding_layers_are_rejected() -> None:
    with pytest.raises(UnsupportedModelFeatureError, match="attention_bias=True"):
        describe_hf_config(LlamaConfig(attention_bias=True))
    mixed = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    with pytest.raises(UnsupportedModelFeatureError, match="mixed attention layer types"):
        describe_hf_config(mixed)


# --------------------------------------------------------------------------- parallel sizes


def test_tp_must_divide_kv_heads_and_the_error_lists_valid_sizes() -> None:
    arch = describe_hf_config(phi4_config())
    with pytest.raises(
        ParallelLayoutError,
        match=r"tensor_model_parallel_size=4 must divide num_key_value_heads=10, num_attention_heads=40 "
        r"and ffn_hidden_size=17920; valid sizes for Phi3ForCausalLM: 1, 2, 5, 10",
    ):
        validate_parallel_layout(arch, ParallelLayout(tensor_parallel=4))
    validate_parallel_layout(arch, ParallelLayout(tensor_parallel=5))


def test_pp_must_divide_layers_unless_split_explicitly() -> None:
    arch = describe_hf_config(phi4_config())
    with pytest.raises(ParallelLayoutError, match="pipeline_model_parallel_size=3 does not divide num_layers=40; valid sizes: 1, 2, 4, 5, 8, 10, 20, 40"):
        validate_parallel_layout(arch, ParallelLayout(pipeline_parallel=3))
    assert stage_layer_counts(arch, ParallelLayout(pipeline_parallel=3, first_stage_layers=12, last_stage_layers=12)) == [12, 16, 12]
    assert stage_layer_counts(arch, ParallelLayout(pipeline_parallel=2, first_stage_layers=19)) == [19, 21]
    with pytest.raises(ParallelLayoutError, match="leave 33 layers for 2 middle stage"):
        stage_layer_counts(arch, ParallelLayout(pipeline_parallel=3, first_stage_layers=7))


@pytest.mark.parametrize(
    ("vocab", "tp", "divisor", "preferred", "expected"),
    [
        (100352, 1, 128, None, 100352),  # Phi-4 is already a multiple of 128
        (100352, 2, 128, None, 100352),
        (100352, 5, 128, None, 100480),  # lcm(128, 5) = 640
        (301, 1, 128, None, 384),
        (301, 1, 1, None, 301),
        (301, 2, 1, None, 302),
        (301, 2, 128, 384, 384),  # a checkpoint's padding is reused when TP divides it
        (301, 2, 128, 301, 384),  # ... and replaced when it does not
    ],
)
def test_padded_vocab_size(vocab: int, tp: int, divisor: int, preferred: int | None, expected: int) -> None:
    assert padded_vocab_size(vocab, tp, divisor=divisor, preferred=preferred) == expected


# --------------------------------------------------------------------------- mapping transforms


def small_arch(**overrides: object) -> ArchitectureSpec:
    fields = dict(
        architecture="LlamaForCausalLM", family="llama", num_layers=1, hidden_size=5, ffn_hidden_size=6,
        num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=7, norm_eps=1e-6,
        rope=RopeSpec(theta=10000.0), tied_embeddings=False, qkv_bias=False, attention_dropout=0.0,
        hidden_dropout=0.0, max_position_embeddings=16, sliding_window=None, dtype=torch.float32,
    )
    fields.update(overrides)
    return ArchitectureSpec(**fields)  # type: ignore[arg-type]


def labelled(rows: int, cols: int | None, start: float) -> torch.Tensor:
    shape = (rows,) if cols is None else (rows, cols)
    return torch.arange(start, start + torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


def megatron_shards(rule, hf_tensors, arch: ArchitectureSpec, tp: int, padded: int = 8) -> list[torch.Tensor]:
    """Every TP rank's megatron tensor for ``rule``, in rank order."""
    return [to_megatron_shard(rule, hf_tensors, ShardContext(arch, padded, r, tp)) for r in range(tp)]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_qkv_interleaves_per_query_group_and_round_trips(tp: int, bias: bool, fused: bool) -> None:
    arch = small_arch()
    cols = None if bias else 5
    q, k, v = labelled(12, cols, 0), labelled(6, cols, 1000), labelled(6, cols, 2000)
    hf = [torch.cat([q, k, v])] if fused else [q, k, v]
    rule = QKV("x", ("qkv",) if fused else ("q", "k", "v"))
    shards = megatron_shards(rule, hf, arch, tp)
    # Group g = [q heads 2g, 2g+1 | k_g | v_g], head_dim 3 rows each; TP ranks own whole groups.
    expected_full = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(torch.cat(shards), expected_full)
    back = to_hf_tensors(rule, shards, ShardContext(arch, 8, 0, tp))
    assert all(torch.equal(a, b) for a, b in zip(back, hf, strict=True))


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_gated_mlp_shards_hold_gate_and_up_halves(tp: int, fused: bool) -> None:
    arch = small_arch()
    gate, up = labelled(6, 5, 0), labelled(6, 5, 100)
    hf = [torch.cat([gate, up])] if fused else [gate, up]
    rule = GatedMLP("x", ("gate_up",) if fused else ("gate", "up"))
    shards = megatron_shards(rule, hf, arch, tp)
    rows = 6 // tp
    for r, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([gate[r * rows:(r + 1) * rows], up[r * rows:(r + 1) * rows]]))
    back = to_hf_tensors(rule, shards, ShardContext(arch, 8, 0, tp))
    assert all(torch.equal(a, b) for a, b in zip(back, hf, strict=True))


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_rows_are_padded_with_zeros_and_dropped_on_export(tp: int) -> None:
    arch = small_arch()
    embedding = labelled(7, 5, 1)
    rule = Copy("x", "e", tp_axis=0, pads_vocab=True)
    shards = megatron_shards(rule, [embedding], arch, tp, padded=8)
    full = torch.cat(shards)
    assert full.shape == (8, 5) and torch.equal(full[:7], embedding) and not full[7:].any()
    assert torch.equal(to_hf_tensors(rule, shards, ShardContext(arch, 8, 0, tp))[0], embedding)


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_plain_copies_split_along_their_tp_axis(axis: int | None) -> None:
    arch = small_arch()
    tensor = labelled(4, 6, 0)
    rule = Copy("x", "w", tp_axis=axis)
    shards = megatron_shards(rule, [tensor], arch, 2)
    if axis is None:
        assert all(torch.equal(s, tensor) for s in shards)
    else:
        assert torch.equal(shards[1], tensor.chunk(2, dim=axis)[1])
    assert torch.equal(to_hf_tensors(rule, shards, ShardContext(arch, 8, 0, 2))[0], tensor)


def test_transformer_engine_fused_norm_names_fold_onto_the_local_layout() -> None:
    assert canonical_megatron_name("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight") == "decoder.layers.3.input_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.0.pre_mlp_layernorm.weight"
    assert canonical_megatron_name("decoder.layers.0.mlp.linear_fc1.weight") == "decoder.layers.0.mlp.linear_fc1.weight"


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_weight_tables_cover_exactly_the_hf_parameters(family: str, tied: bool) -> None:
    model = tiny_hf_model(family, tied=tied)
    arch = describe_hf_config(model.config)
    rules = weight_rules_for(arch)
    hf_names = set(dict(model.named_parameters()))  # a tied lm_head is not a separate parameter
    assert set(exported_hf_names(rules, arch.num_layers)) == hf_names
    assert set(expected_hf_names(rules, arch.num_layers)) == hf_names


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_models_are_small_float32_and_every_tensor_is_random(family: str) -> None:
    model = tiny_hf_model(family)
    config = model.config
    assert config.vocab_size % 2 == 1 and config.num_hidden_layers == 4
    assert config.num_attention_heads == 4 and config.num_key_value_heads == 2
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32, name
        assert param.std() > 0.01, f"{name} looks like a default init"
        assert not torch.equal(param, torch.ones_like(param)) and param.abs().sum() > 0, name
    assert torch.equal(tiny_hf_model(family).model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not torch.equal(tiny_hf_model(family, seed=1).model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_tiny_mistral_head_dim_differs_from_hidden_over_heads() -> None:
    config = tiny_hf_config("mistral")
    assert config.head_dim != config.hidden_size // config.num_attention_heads


def test_forced_cpu_on_a_gpu_host_uses_the_local_spec_and_the_cpu(monkeypatch):
    """NEMO_INFIFPO_FORCE_CPU=1 on a CUDA machine with Transformer Engine installed: the model
    must be built for the CPU with megatron's local spec (TE needs CUDA)."""
    import sys
    import types

    from nemo_infifpo.models.megatron_model import default_model_device, transformer_engine_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))  # what cpu_compat patches in
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setenv("NEMO_INFIFPO_FORCE_CPU", "1")
    assert transformer_engine_available() is False
    assert default_model_device() == torch.device("cpu")
    monkeypatch.setenv("NEMO_INFIFPO_FORCE_CPU", "0")
    assert transformer_engine_available() is True
