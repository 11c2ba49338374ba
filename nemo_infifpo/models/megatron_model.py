"""ArchitectureSpec -> megatron-core ``TransformerConfig``, layer spec and ``GPTModel``.

Two layer specs give the same numbers: Transformer Engine's (fused norms + GEMMs, used on
GPUs when ``transformer_engine`` imports) and megatron's local spec (plain torch modules; the
only choice on CPU). ``use_transformer_engine=False`` forces the local spec anywhere.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from nemo_infifpo.engine.cpu_compat import running_on_cpu, tensors_stay_on_cpu
from nemo_infifpo.models.architecture import ArchitectureSpec
from nemo_infifpo.models.parallel import ParallelLayout, stage_layer_counts, validate_parallel_layout


def transformer_engine_available() -> bool:
    """TE needs CUDA: never on the CPU path, which NEMO_INFIFPO_FORCE_CPU=1 selects on GPU hosts too."""
    if running_on_cpu():
        return False
    try:
        import transformer_engine  # noqa: F401  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken CUDA install raising at import time
        return False
    return True


def default_model_device() -> torch.device:
    """This process's GPU, or the CPU on the CPU path. Not ``torch.cuda.is_available()``: on a
    GPU host with NEMO_INFIFPO_FORCE_CPU=1, ``current_device()`` is patched to return the CPU
    device and ``torch.device("cuda", <cpu device>)`` is a TypeError."""
    return torch.device("cpu") if running_on_cpu() else torch.device("cuda", torch.cuda.current_device())


def resolve_use_transformer_engine(requested: bool | None) -> bool:
    """``None``: TE when available. ``True`` without TE is an error, not a silent fallback."""
    available = transformer_engine_available()
    if requested is None:
        return available
    if requested and not available:
        raise RuntimeError(
            "use_transformer_engine=True but transformer_engine is not importable on a CUDA "
            "machine; install the 'gpu' extra or pass use_transformer_engine=False"
        )
    return bool(requested)


def build_transformer_config(
    arch: ArchitectureSpec,
    layout: ParallelLayout,
    *,
    params_dtype: torch.dtype,
    use_cpu_initialization: bool,
    **overrides: Any,
) -> Any:
    """megatron ``TransformerConfig`` reproducing ``arch`` exactly; ``overrides`` win (e.g.
    ``sequence_parallel``, ``recompute_granularity`` for training)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    validate_parallel_layout(arch, layout)
    stage_layer_counts(arch, layout)
    fields: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        tensor_model_parallel_size=layout.tensor_parallel,
        pipeline_model_parallel_size=layout.pipeline_parallel,
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        # TransformerConfig defaults both dropouts to 0.1; the HF model's values (0 for every
        # supported checkpoint) must be used or scores change from run to run.
        hidden_dropout=arch.hidden_dropout,
        attention_dropout=arch.attention_dropout,
        # HF computes attention softmax in fp32 (eager and SDPA alike).
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        # Every parameter is overwritten by a checkpoint; random init of 14B params is waste.
        perform_initialization=False,
    )
    if arch.sliding_window is not None:
        # HF lets a query see the `sliding_window` most recent tokens, itself included;
        # megatron's (left, right) window counts the others.
        fields["window_size"] = (arch.sliding_window - 1, 0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def build_layer_spec(use_transformer_engine: bool) -> Any:
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_transformer_engine:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def rope_kwargs(arch: ArchitectureSpec) -> dict[str, Any]:
    """GPTModel RoPE arguments; ``linear`` scaling = positions divided by the factor."""
    kwargs: dict[str, Any] = dict(
        position_embedding_type="rope",
        rotary_percent=arch.rope.rotary_percent,
        rotary_base=arch.rope.theta,
    )
    if arch.rope.scaling_type == "linear":
        kwargs["seq_len_interpolation_factor"] = arch.rope.scaling_factor
    elif arch.rope.scaling_type == "llama3":
        kwargs.update(rope_scaling=True, rope_scaling_factor=arch.rope.scaling_factor)
    return kwargs


def build_gpt_model(
    arch: ArchitectureSpec,
    layout: ParallelLayout,
    *,
    padded_vocab_size: int,
    params_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    use_transformer_engine: bool | None = None,
    config_overrides: dict[str, Any] | None = None,
) -> Any:
    """This rank's pipeline stage of ``arch`` as a megatron ``GPTModel`` (uninitialised weights).

    megatron's parallel state must be initialised with ``layout``'s TP/PP sizes.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    device = torch.device(device) if device is not None else default_model_device()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if (tp, pp) != (layout.tensor_parallel, layout.pipeline_parallel):
        raise ValueError(
            f"megatron parallel state has tp={tp}, pp={pp} but the model layout asks for "
            f"tp={layout.tensor_parallel}, pp={layout.pipeline_parallel}"
        )
    config = build_transformer_config(
        arch,
        layout,
        params_dtype=params_dtype,
        use_cpu_initialization=device.type == "cpu",
        **(config_overrides or {}),
    )
    with tensors_stay_on_cpu() if device.type == "cpu" else contextlib.nullcontext():
        model = GPTModel(
            config=config,
            transformer_layer_spec=build_layer_spec(resolve_use_transformer_engine(use_transformer_engine)),
            vocab_size=padded_vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
            share_embeddings_and_output_weights=arch.tied_embeddings,
            parallel_output=True,
            **rope_kwargs(arch),
        )
    mark_tensor_parallel_parameters(model)
    # The local spec's torch norms ignore params_dtype and stay float32; megatron-LM casts the
    # whole model (Float16Module) for the same reason. TE modules already use params_dtype.
    return model.to(device=device, dtype=params_dtype)


def mark_tensor_parallel_parameters(module: torch.nn.Module) -> int:
    """Set megatron's ``tensor_model_parallel``/``partition_dim`` attributes where missing.

    megatron-core sets them only inside its weight-init helpers, which do not run with
    ``perform_initialization=False`` (how a model about to be filled from a checkpoint is
    built). Without them every sharded parameter looks replicated across TP ranks, so
    gradient-norm clipping and the distributed optimizer would count a sharded matrix on TP
    rank 0 only. Returns how many parameters were marked.
    """
    marked = 0
    for sub in module.modules():
        kind = type(sub).__name__
        if "ColumnParallel" in kind or "VocabParallelEmbedding" in kind:
            dims = {"weight": 0, "bias": 0}
        elif "RowParallel" in kind:
            dims = {"weight": 1}  # the bias of a row-parallel layer is replicated
        else:
            continue
        for name, dim in dims.items():
            param = sub._parameters.get(name)
            if param is not None and not getattr(param, "tensor_model_parallel", False):
                # (megatron's set_tensor_model_parallel_attributes asserts they are unset.)
                param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1
                marked += 1
    return marked
