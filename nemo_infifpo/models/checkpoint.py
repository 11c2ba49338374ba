"""The on-disk layout of this package's model checkpoints, and loading a model from any source.

A model checkpoint directory (written by ``recipes/import_hf.py`` and by training)::

    <checkpoint>/
      nemo_infifpo_model.json   CheckpointMetadata: architecture, true and padded vocab,
                                dtype, the TP/PP it was saved at, source path + fingerprint.
                                Written last: its presence means the checkpoint is complete.
      hf_assets/                config.json, generation_config.json, tokenizer files
      weights/                  megatron-core distributed checkpoint (torch_dist format)

The weights are a ``megatron.core.dist_checkpointing`` checkpoint, so they load at any TP/PP
(resharding is megatron's). Transformer Engine ``_extra_state`` entries are left out, which
makes checkpoints portable between the TE and the local layer spec.

:func:`load_megatron_model` accepts either such a checkpoint or a plain Hugging Face model
directory (converted while loading, each rank reading only its own shard's tensors); the
``model.path`` of every stage goes through it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_infifpo.models.architecture import ArchitectureSpec, parse_dtype
from nemo_infifpo.models.errors import CheckpointFormatError
from nemo_infifpo.models.hf_io import (
    CONFIG_FILE,
    HFCheckpointReader,
    copy_hf_assets,
    expected_hf_shapes,
    is_hf_checkpoint,
    load_hf_config,
)
from nemo_infifpo.models.mapping import ShardContext, expected_hf_names, load_hf_weights
from nemo_infifpo.models.megatron_model import build_gpt_model
from nemo_infifpo.models.parallel import DEFAULT_VOCAB_DIVISOR, ParallelLayout, padded_vocab_size, validate_parallel_layout
from nemo_infifpo.models.registry import describe_hf_config, weight_rules_for

CHECKPOINT_FORMAT = "nemo_infifpo.megatron_model"
FORMAT_VERSION = 1
METADATA_FILE = "nemo_infifpo_model.json"
HF_ASSETS_DIR = "hf_assets"
WEIGHTS_DIR = "weights"

# GPTModel parameters whose first axis is the (padded) vocabulary.
VOCAB_PARAMETERS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class CheckpointMetadata:
    architecture: str
    family: str
    vocab_size: int  # the real vocabulary; rows at or above it are padding
    padded_vocab_size: int
    params_dtype: str
    saved_tensor_parallel_size: int
    saved_pipeline_model_parallel_size: int
    source_path: str | None = None
    source_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = CHECKPOINT_FORMAT
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        (directory / METADATA_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "CheckpointMetadata":
        path = Path(directory) / METADATA_FILE
        if not path.is_file():
            raise CheckpointFormatError(f"{directory} has no {METADATA_FILE}: not a complete model checkpoint")
        data = json.loads(path.read_text())
        if data.get("format") != CHECKPOINT_FORMAT or int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"{path}: format {data.get('format')!r} v{data.get('format_version')} is not "
                f"readable by this version ({CHECKPOINT_FORMAT} v{FORMAT_VERSION})"
            )
        return cls(**data)


def is_megatron_checkpoint(path: str | Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def hf_assets_dir(path: str | Path) -> Path:
    """Where config and tokenizer of a model source live (either kind of directory)."""
    path = Path(path)
    return path / HF_ASSETS_DIR if is_megatron_checkpoint(path) else path


@dataclass
class LoadedModel:
    """This rank's part of a model plus everything needed to score, train or export it."""

    model: Any  # megatron GPTModel (this rank's pipeline stage, TP shard)
    arch: ArchitectureSpec
    hf_config: Any
    layout: ParallelLayout
    padded_vocab_size: int
    assets_dir: Path  # config.json, tokenizer files
    source_path: Path
    metadata: CheckpointMetadata | None = None  # None when loaded from an HF directory

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size


def _current_layout(tp: int | None, pp: int | None, first: int | None, last: int | None) -> ParallelLayout:
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("call nemo_infifpo.engine.distributed.init_distributed() before loading a model")
    actual = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )
    requested = (tp or actual[0], pp or actual[1])
    if requested != actual:
        raise ValueError(f"asked for tp={requested[0]}, pp={requested[1]} but distributed was initialised with tp={actual[0]}, pp={actual[1]}")
    return ParallelLayout(actual[0], actual[1], first, last)


def load_megatron_model(
    path: str | Path,
    tp: int | None = None,
    pp: int | None = None,
    *,
    first_stage_layers: int | None = None,
    last_stage_layers: int | None = None,
    params_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    use_transformer_engine: bool | None = None,
    vocab_divisor: int = DEFAULT_VOCAB_DIVISOR,
    config_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Build this rank's megatron model and fill it from an HF directory or a model checkpoint.

    Collective over all ranks. ``tp``/``pp`` default to (and must equal) the sizes
    ``init_distributed`` set up. ``params_dtype`` defaults to the source's dtype.
    """
    path = Path(path)
    layout = _current_layout(tp, pp, first_stage_layers, last_stage_layers)
    if is_megatron_checkpoint(path):
        return _load_from_checkpoint(path, layout, params_dtype, device, use_transformer_engine, vocab_divisor, config_overrides)
    if is_hf_checkpoint(path) or (path / CONFIG_FILE).is_file():
        return _load_from_hf(path, layout, params_dtype, device, use_transformer_engine, vocab_divisor, config_overrides)
    raise CheckpointFormatError(
        f"{path} is neither a Hugging Face model directory ({CONFIG_FILE} + safetensors) nor a "
        f"checkpoint written by this package ({METADATA_FILE})"
    )


def current_shard_context(arch: ArchitectureSpec, padded: int) -> ShardContext:
    """The mapping's TP context for this rank, from megatron's parallel state."""
    from megatron.core import parallel_state

    return ShardContext(
        arch=arch,
        padded_vocab_size=padded,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
    )


def _load_from_hf(
    path: Path,
    layout: ParallelLayout,
    params_dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    use_transformer_engine: bool | None,
    vocab_divisor: int,
    config_overrides: dict[str, Any] | None,
) -> LoadedModel:
    hf_config = load_hf_config(path)
    arch = describe_hf_config(hf_config)
    validate_parallel_layout(arch, layout)
    rules = weight_rules_for(arch)
    padded = padded_vocab_size(arch.vocab_size, layout.tensor_parallel, divisor=vocab_divisor)
    with HFCheckpointReader(path) as reader:
        # Validate names and shapes before building anything: errors name the tensor.
        optional = ["lm_head.weight"] if arch.tied_embeddings else []
        reader.validate(expected_hf_names(rules, arch.num_layers), expected_hf_shapes(hf_config), optional=optional)
        model = build_gpt_model(
            arch,
            layout,
            padded_vocab_size=padded,
            params_dtype=parse_dtype(params_dtype, arch.dtype),
            device=device,
            use_transformer_engine=use_transformer_engine,
            config_overrides=config_overrides,
        )
        load_hf_weights(model, rules, reader, current_shard_context(arch, padded))
    return LoadedModel(model, arch, hf_config, layout, padded, path, path)


# --------------------------------------------------------------------------- dist checkpoint


def model_sharded_state_dict(model: Any) -> dict[str, Any]:
    """The model's ``dist_checkpointing`` state: its sharded state dict without Transformer
    Engine's ``_extra_state`` (kernel metadata, not model state; absent in the local spec)."""
    sharded = model.sharded_state_dict()
    return {k: v for k, v in sharded.items() if not k.endswith("_extra_state")}


def _load_from_checkpoint(
    path: Path,
    layout: ParallelLayout,
    params_dtype: torch.dtype | str | None,
    device: torch.device | str | None,
    use_transformer_engine: bool | None,
    vocab_divisor: int,
    config_overrides: dict[str, Any] | None,
) -> LoadedModel:
    from megatron.core import dist_checkpointing

    metadata = CheckpointMetadata.read(path)
    assets = path / HF_ASSETS_DIR
    hf_config = load_hf_config(assets)
    arch = describe_hf_config(hf_config)
    validate_parallel_layout(arch, layout)
    padded = padded_vocab_size(
        arch.vocab_size, layout.tensor_parallel, divisor=vocab_divisor, preferred=metadata.padded_vocab_size
    )
    model = build_gpt_model(
        arch,
        layout,
        padded_vocab_size=padded,
        params_dtype=parse_dtype(
            params_dtype, parse_dtype(metadata.params_dtype, arch.dtype, key=f"params_dtype in {path}")
        ),
        device=device,
        use_transformer_engine=use_transformer_engine,
        config_overrides=config_overrides,
    )
    sharded = model_sharded_state_dict(model)
    repad = padded != metadata.padded_vocab_size
    resized = _request_whole_vocab_tensors(model, sharded, metadata.padded_vocab_size) if repad else set()
    # Whole-tensor requests overlap across ranks by design; the same decision is taken on
    # every rank (it depends on sizes only), as the validation is collective.
    state = dist_checkpointing.load(sharded, str(path / WEIGHTS_DIR), validate_access_integrity=not repad)
    for name in resized:
        _copy_repadded_rows(model.get_parameter(name), state.pop(name), arch.vocab_size)
    _assign_loaded_state(model, state, resized)
    return LoadedModel(model, arch, hf_config, layout, padded, assets, path, metadata)


def _assign_loaded_state(model: Any, state: dict[str, Any], loaded_separately: set[str]) -> None:
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state") and k not in loaded_separately]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _request_whole_vocab_tensors(model: Any, sharded: dict[str, Any], saved_rows: int) -> set[str]:
    """Replace this rank's vocab-sharded requests by whole-tensor ones, in place.

    Used when TP does not divide the saved padded vocabulary (e.g. a checkpoint padded to an
    odd size, loaded at TP=2): the saved rows cannot be sharded the way the model needs, so
    every rank reads the whole (saved) tensor and keeps its own rows after re-padding.
    """
    from megatron.core.dist_checkpointing import ShardedTensor

    names = set()
    for name in VOCAB_PARAMETERS:
        if name in sharded:
            param = model.get_parameter(name)
            whole = torch.empty(saved_rows, param.shape[1], dtype=param.dtype, device=param.device)
            sharded[name] = ShardedTensor.from_rank_offsets(sharded[name].key, whole, replica_id=dist.get_rank())
            names.add(name)
    return names


@torch.no_grad()
def _copy_repadded_rows(param: torch.nn.Parameter, saved: torch.Tensor, vocab_size: int) -> None:
    """This TP rank's rows of the real vocabulary; padding rows are zero."""
    from megatron.core import parallel_state

    rows = param.shape[0]
    start = parallel_state.get_tensor_model_parallel_rank() * rows
    stop = min(start + rows, vocab_size)
    param.zero_()
    if stop > start:
        param[: stop - start].copy_(saved[start:stop])


def save_megatron_model(
    model: Any,
    path: str | Path,
    *,
    arch: ArchitectureSpec,
    assets_from: str | Path,
    padded_vocab_size: int,
    source_path: str | Path | None = None,
    source_fingerprint: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (this rank's part) as a model checkpoint. Collective over all ranks.

    Call under ``if __name__ == "__main__":`` in scripts: megatron's checkpoint writer starts
    a ``multiprocessing.Manager`` whose child re-imports ``__main__``.
    """
    from megatron.core import dist_checkpointing, parallel_state

    path = Path(path)
    weights = path / WEIGHTS_DIR
    is_writer = not dist.is_initialized() or dist.get_rank() == 0
    if is_writer:
        weights.mkdir(parents=True, exist_ok=True)
        (path / METADATA_FILE).unlink(missing_ok=True)  # incomplete until rewritten below
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(model), str(weights))
    if dist.is_initialized():
        dist.barrier()
    if is_writer:
        copy_hf_assets(assets_from, path / HF_ASSETS_DIR)
        CheckpointMetadata(
            architecture=arch.architecture,
            family=arch.family,
            vocab_size=arch.vocab_size,
            padded_vocab_size=padded_vocab_size,
            params_dtype=str(model.config.params_dtype).removeprefix("torch."),
            saved_tensor_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
            saved_pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
            source_path=str(source_path) if source_path is not None else None,
            source_fingerprint=source_fingerprint,
            extra=dict(extra or {}),
        ).write(path)
    if dist.is_initialized():
        dist.barrier()
    return path


def save_loaded_model(loaded: LoadedModel, path: str | Path, **kwargs: Any) -> Path:
    """:func:`save_megatron_model` for a :class:`LoadedModel` (keeps its source and assets)."""
    source = loaded.metadata.source_path if loaded.metadata else str(loaded.source_path)
    fingerprint = loaded.metadata.source_fingerprint if loaded.metadata else None
    kwargs.setdefault("source_path", source)
    kwargs.setdefault("source_fingerprint", fingerprint)
    return save_megatron_model(
        loaded.model, path, arch=loaded.arch, assets_from=loaded.assets_dir, padded_vocab_size=loaded.padded_vocab_size, **kwargs
    )

