"""Tiny random Hugging Face models of every supported family, built offline from configs.

Shapes are chosen to exercise what real checkpoints do: grouped-query attention (4 heads over
2 KV heads, so TP=2 splits whole groups), an explicit Mistral ``head_dim`` that differs from
hidden / heads, Phi-3's partial rotary embedding and fused projections, Qwen2's q/k/v biases,
odd vocabulary sizes (vocab padding), and 4 layers (PP=2, uneven splits). Every tensor is
random, norm weights and biases included, so a mapping that drops or swaps any of them
changes the outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Family -> (HF config class name, default config fields). Vocab sizes are odd on purpose.
_TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "phi3": (
        "Phi3Config",
        dict(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            # Phi-4 uses the full head (1.0); Phi-4-mini 0.75. The partial case is harder.
            rope_parameters={"rope_type": "default", "rope_theta": 250000.0, "partial_rotary_factor": 0.75},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=307,
            hidden_size=64,
            intermediate_size=112,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            vocab_size=311,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,  # != 64 / 4, like Mistral-Small-24B (5120 / 32 heads, head_dim 128)
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            vocab_size=313,
            hidden_size=64,
            intermediate_size=80,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            use_sliding_window=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_TINY_CONFIGS)

# Tokenizer builders (nemo_infifpo.testing.tokenizers) in the style of each family.
_TOKENIZER_BUILDERS = {"phi3": "phi_tokenizer", "llama": "llama3_tokenizer", "mistral": "plain_tokenizer", "qwen2": "chatml_tokenizer"}


def tiny_hf_config(family: str, *, vocab_size: int | None = None, tied: bool = False, **overrides: Any) -> Any:
    """A tiny HF config of ``family`` (one of :data:`TINY_FAMILIES`); ``overrides`` win."""
    import transformers

    if family not in _TINY_CONFIGS:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    class_name, defaults = _TINY_CONFIGS[family]
    fields = {**defaults, "tie_word_embeddings": tied, **overrides}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    config = getattr(transformers, class_name)(**fields)
    config.architectures = [class_name.replace("Config", "ForCausalLM")]
    config.dtype = torch.float32
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial random values (norms around 1, small biases).

    Noise is drawn on the parameters' device (a GPU model is randomised in place, fast).
    """
    generators: dict[torch.device, torch.Generator] = {}
    for name, param in sorted(model.named_parameters()):
        if param.device not in generators:
            generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
        noise = torch.randn(param.shape, generator=generators[param.device], dtype=torch.float32, device=param.device)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.2 * noise
        elif name.endswith(".bias"):
            value = 0.2 * noise
        elif "embed_tokens" in name:
            value = 0.2 * noise
        else:
            # ~N(0, 1/fan_in) * 2: large enough that logits spread over a few nats.
            value = noise * (2.0 / param.shape[-1] ** 0.5)
        param.copy_(value.to(param.dtype))
    return model


def tiny_hf_model(
    family: str,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    tied: bool = False,
    attn_implementation: str = "eager",
    **overrides: Any,
) -> Any:
    """A float32 tiny random ``AutoModelForCausalLM`` of ``family``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(family, vocab_size=vocab_size, tied=tied, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    randomize_(model, seed)
    if tied:
        model.tie_weights()
    return model.eval()


def tiny_tokenizer(family: str, vocab_size: int) -> Any:
    from nemo_infifpo.testing import tokenizers

    return getattr(tokenizers, _TOKENIZER_BUILDERS[family])(vocab_size)


def save_tiny_hf_model(
    family: str,
    directory: str | Path,
    *,
    vocab_size: int | None = None,
    seed: int = 0,
    tied: bool = False,
    max_shard_size: str | int = "40KB",
    with_tokenizer: bool = True,
    **overrides: Any,
) -> Path:
    """Save a tiny random model (sharded safetensors + index, config, tokenizer) to ``directory``.

    The small default ``max_shard_size`` splits even a tiny model over several files, like a
    real multi-shard checkpoint.
    """
    directory = Path(directory)
    model = tiny_hf_model(family, vocab_size=vocab_size, seed=seed, tied=tied, **overrides)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    if with_tokenizer:
        from nemo_infifpo.testing.tokenizers import save_tokenizer

        save_tokenizer(tiny_tokenizer(family, model.config.vocab_size), directory)
    return directory
