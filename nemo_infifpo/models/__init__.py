"""HF decoder-only models on megatron-core: architecture registry, weight mapping, checkpoints.

Supported: ``Phi3ForCausalLM`` (Phi-3, Phi-4), ``LlamaForCausalLM``, ``MistralForCausalLM``,
``Qwen2ForCausalLM``.

* :func:`load_megatron_model` - this rank's megatron ``GPTModel`` from an HF directory or a
  model checkpoint, at the TP/PP ``init_distributed`` set up (the ``model.path`` of every stage).
* :func:`save_megatron_model` / :func:`save_loaded_model` - write a model checkpoint.
* :func:`import_hf_checkpoint` / :func:`export_to_hf` / :func:`export_checkpoint_to_hf` -
  what ``recipes/import_hf.py`` and ``recipes/export_hf.py`` run.
* :func:`describe_hf_config` - an HF config as an :class:`ArchitectureSpec`.

Modules: ``architecture`` (spec + config readers), ``families/`` (per-family config quirks and
weight tables), ``registry``, ``parallel`` (TP/PP validation, vocab padding),
``megatron_model`` (TransformerConfig, layer specs, GPTModel), ``mapping`` (the declarative
weight mapping engine), ``hf_io`` (safetensors reading/writing), ``checkpoint`` (directory
layout, load/save), ``conversion`` (import/export), ``errors``.
"""

from nemo_infifpo.models.architecture import ArchitectureSpec, RopeSpec
from nemo_infifpo.models.checkpoint import (
    CheckpointMetadata,
    LoadedModel,
    hf_assets_dir,
    is_megatron_checkpoint,
    load_megatron_model,
    save_loaded_model,
    save_megatron_model,
)
from nemo_infifpo.models.conversion import export_checkpoint_to_hf, export_to_hf, import_hf_checkpoint
from nemo_infifpo.models.parallel import ParallelLayout, padded_vocab_size, validate_parallel_layout
from nemo_infifpo.models.registry import SUPPORTED_ARCHITECTURES, describe_hf_config

__all__ = [
    "ArchitectureSpec",
    "CheckpointMetadata",
    "LoadedModel",
    "ParallelLayout",
    "RopeSpec",
    "SUPPORTED_ARCHITECTURES",
    "describe_hf_config",
    "export_checkpoint_to_hf",
    "export_to_hf",
    "hf_assets_dir",
    "import_hf_checkpoint",
    "is_megatron_checkpoint",
    "load_megatron_model",
    "padded_vocab_size",
    "save_loaded_model",
    "save_megatron_model",
    "validate_parallel_layout",
]
