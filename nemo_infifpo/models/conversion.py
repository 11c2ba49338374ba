"""HF -> model checkpoint (import) and model -> HF directory (export).

Both run on any TP/PP layout megatron's parallel state was initialised with: import reads
each rank's shard straight from the safetensors files; export gathers TP shards and pipeline
stages to global rank 0, which streams them into size-capped safetensors shards.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_infifpo.models.architecture import parse_dtype
from nemo_infifpo.models.checkpoint import (
    LoadedModel,
    current_shard_context,
    load_megatron_model,
    save_megatron_model,
)
from nemo_infifpo.models.hf_io import (
    CONFIG_FILE,
    ShardedSafetensorsWriter,
    copy_hf_assets,
    fingerprint_hf_checkpoint,
    write_config_with_dtype,
)
from nemo_infifpo.models.mapping import iter_hf_tensors
from nemo_infifpo.models.registry import weight_rules_for


def _is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def check_output_dir(path: str | Path, *, overwrite: bool) -> None:
    """Fail before any expensive work when ``path`` holds something and may not be replaced."""
    path = Path(path)
    if not overwrite and path.exists() and any(path.iterdir()):
        raise FileExistsError(f"output directory {path} is not empty (pass overwrite=true to replace it)")


def prepare_output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """An empty ``path`` (rank 0 clears it when ``overwrite``); never mixes old and new files.

    Every rank checks first, so a refusal raises everywhere instead of leaving the other
    ranks waiting in a barrier.
    """
    path = Path(path)
    check_output_dir(path, overwrite=overwrite)
    if dist.is_initialized():
        dist.barrier()
    if _is_rank_zero():
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    return path


def import_hf_checkpoint(
    hf_path: str | Path,
    output_path: str | Path,
    *,
    params_dtype: torch.dtype | str | None = None,
    vocab_divisor: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an HF directory into a model checkpoint (collective; run under a main guard).

    The model is built on the CPU with the local layer spec: conversion needs no GPU, and
    the checkpoint it writes loads into either spec at any TP/PP.
    """
    hf_path = Path(hf_path)
    check_output_dir(output_path, overwrite=overwrite)
    load_kwargs: dict[str, Any] = {"vocab_divisor": vocab_divisor} if vocab_divisor is not None else {}
    loaded = load_megatron_model(
        hf_path, params_dtype=params_dtype, device="cpu", use_transformer_engine=False, **load_kwargs
    )
    output = prepare_output_dir(output_path, overwrite=overwrite)
    return save_megatron_model(
        loaded.model,
        output,
        arch=loaded.arch,
        assets_from=hf_path,
        padded_vocab_size=loaded.padded_vocab_size,
        source_path=str(hf_path.resolve()),
        source_fingerprint=fingerprint_hf_checkpoint(hf_path),
    )


def export_to_hf(
    loaded: LoadedModel,
    output_path: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``loaded`` (any TP/PP) as an HF directory. Collective; rank 0 writes."""
    output = prepare_output_dir(output_path, overwrite=overwrite)
    export_dtype = parse_dtype(dtype, loaded.model.config.params_dtype)
    writer = ShardedSafetensorsWriter(output, max_shard_size) if _is_rank_zero() else None
    rules = weight_rules_for(loaded.arch)
    for name, tensor in iter_hf_tensors(loaded.model, rules, current_shard_context(loaded.arch, loaded.padded_vocab_size)):
        assert writer is not None  # tensors arrive on rank 0 only
        writer.add(name, tensor.to(export_dtype))
    if writer is not None:
        writer.finish()
        copy_hf_assets(loaded.assets_dir, output)
        write_config_with_dtype(loaded.assets_dir / CONFIG_FILE, output / CONFIG_FILE, export_dtype)
    if dist.is_initialized():
        dist.barrier()
    return output


def export_checkpoint_to_hf(
    checkpoint_path: str | Path,
    output_path: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    device: torch.device | str | None = "cpu",
) -> Path:
    """Load a model checkpoint (saved at any TP/PP) at the current layout and export it."""
    check_output_dir(output_path, overwrite=overwrite)
    loaded = load_megatron_model(checkpoint_path, params_dtype=dtype, device=device, use_transformer_engine=False)
    return export_to_hf(loaded, output_path, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite)
