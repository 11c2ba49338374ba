"""Tensor/pipeline-parallel sizes a model admits, checked before anything is built.

Megatron asserts deep inside module constructors when a size does not fit; these checks say
which numbers clash and which sizes would work, up front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.errors import ParallelLayoutError

# Megatron-LM's default make_vocab_size_divisible_by: a multiple of 128 keeps the embedding
# and output GEMMs aligned; many real vocabularies (Phi-4: 100352) already are.
DEFAULT_VOCAB_DIVISOR = 128


@dataclass(frozen=True)
class ParallelLayout:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # Uneven pipeline split: layers on the first/last stage; the rest spread evenly.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def valid_tensor_parallel_sizes(arch: ArchitectureSpec) -> list[int]:
    """TP sizes that divide the attention heads, the KV heads and the FFN width."""
    return [
        d
        for d in divisors(arch.num_query_groups)
        if arch.num_attention_heads % d == 0 and arch.ffn_hidden_size % d == 0
    ]


def stage_layer_counts(arch: ArchitectureSpec, layout: ParallelLayout) -> list[int]:
    """Decoder layers per pipeline stage, validating the split."""
    pp, layers = layout.pipeline_parallel, arch.num_layers
    first, last = layout.first_stage_layers, layout.last_stage_layers
    if pp < 1:
        raise ParallelLayoutError(f"pipeline_model_parallel_size must be >= 1, got {pp}")
    if first is None and last is None:
        if layers % pp != 0:
            raise ParallelLayoutError(
                f"pipeline_model_parallel_size={pp} does not divide num_layers={layers}; valid "
                f"sizes: {', '.join(map(str, divisors(layers)))} (or set first_stage_layers/"
                "last_stage_layers for an uneven split)"
            )
        return [layers // pp] * pp
    if pp == 1:
        raise ParallelLayoutError("first_stage_layers/last_stage_layers need pipeline_model_parallel_size > 1")
    ends = [n for n in (first, last) if n is not None]
    if any(n < 1 for n in ends):
        raise ParallelLayoutError(f"first/last stage layer counts must be >= 1, got first={first}, last={last}")
    middle_stages = pp - len(ends)
    middle_layers = layers - sum(ends)
    if middle_layers < middle_stages or (middle_stages and middle_layers % middle_stages) or (
        not middle_stages and middle_layers != 0
    ):
        raise ParallelLayoutError(
            f"uneven pipeline split does not fit: num_layers={layers}, pipeline stages={pp}, "
            f"first_stage_layers={first}, last_stage_layers={last} leave {middle_layers} layers "
            f"for {middle_stages} middle stage(s); they must split evenly, at least one each"
        )
    per_middle = middle_layers // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def validate_parallel_layout(arch: ArchitectureSpec, layout: ParallelLayout) -> None:
    tp = layout.tensor_parallel
    valid = valid_tensor_parallel_sizes(arch)
    if tp not in valid:
        raise ParallelLayoutError(
            f"tensor_model_parallel_size={tp} must divide num_key_value_heads="
            f"{arch.num_query_groups}, num_attention_heads={arch.num_attention_heads} and "
            f"ffn_hidden_size={arch.ffn_hidden_size}; valid sizes for {arch.architecture}: "
            f"{', '.join(map(str, valid))}"
        )
    stage_layer_counts(arch, layout)


def padded_vocab_size(
    vocab_size: int,
    tensor_parallel: int,
    *,
    divisor: int = DEFAULT_VOCAB_DIVISOR,
    preferred: int | None = None,
) -> int:
    """Rows of megatron's embedding/output layer: the vocabulary padded for TP sharding.

    ``preferred`` (the padded size a checkpoint was saved with) wins when it is large enough
    and TP divides it, so loading never reshapes the vocab tensors needlessly; otherwise
    the vocabulary is rounded up to a multiple of ``lcm(divisor, tensor_parallel)``.
    """
    if preferred is not None and preferred >= vocab_size and preferred % tensor_parallel == 0:
        return preferred
    multiple = math.lcm(max(divisor, 1), tensor_parallel)
    return -(-vocab_size // multiple) * multiple
