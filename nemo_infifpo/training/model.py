"""``MegatronInfiFPOModel``: the pivot being trained, as a NeMo model.

It owns this rank's part of the megatron-core ``GPTModel`` (loaded through
:func:`nemo_infifpo.models.checkpoint.load_megatron_model`, so any HF directory or imported
checkpoint at any TP/PP) and the forward step that megatron's pipeline schedule calls:

    micro-batch (pairs: chosen + rejected together)
      -> GPTModel logits (this rank's vocabulary shard)
      -> vocab-parallel token log-probs -> per-sequence sums and token counts
         (nemo_infifpo.engine.forward: the forward pass scoring and parity run too)
      -> Objective: sequence_scores -> infifpo_loss / dpo_loss / SFT, as [sum, count]

The optimisation loop itself is :mod:`nemo_infifpo.training.loop` (megatron's schedules and
optimizers, not Lightning's), so the Lightning/ModelPT data hooks are not used.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from nemo.core.classes import ModelPT
from nemo_infifpo.engine.batches import MicroBatch
from nemo_infifpo.engine.forward import forward_step, sequence_logprobs, uses_transformer_engine
from nemo_infifpo.training.config import TrainConfig, config_to_dict
from nemo_infifpo.training.objective import Objective

__all__ = ["MegatronInfiFPOModel", "training_config_overrides"]

_NOT_LIGHTNING = (
    "MegatronInfiFPOModel is trained by nemo_infifpo.training.loop.train (recipes/train_infifpo.py), "
    "which builds its own data pipeline from the config's `data` section; Lightning data hooks "
    "are not used"
)


def training_config_overrides(config: TrainConfig) -> dict[str, Any]:
    """megatron ``TransformerConfig`` fields that training sets on top of the architecture."""
    overrides: dict[str, Any] = {
        # Loss functions return [sum, count]; megatron then divides the summed gradients by
        # the total count over micro-batches and data-parallel ranks (see objective.py).
        "calculate_per_token_loss": True,
        "sequence_parallel": config.model.sequence_parallel,
    }
    if config.model.recompute == "selective":
        overrides["recompute_granularity"] = "selective"
    elif config.model.recompute == "full":
        overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return overrides


class MegatronInfiFPOModel(ModelPT):
    """The trained pivot plus its training forward step (see the module docstring)."""

    def __init__(self, cfg: DictConfig, loaded: Any, objective: Objective, trainer: Any = None) -> None:
        super().__init__(cfg=cfg, trainer=trainer)
        self.module = loaded.model
        # LoadedModel carries what checkpoints and export need (architecture, padded vocab,
        # HF assets); it is a plain dataclass, so the GPTModel is registered only once.
        self.loaded = loaded
        self.objective = objective

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls, config: TrainConfig, source_names: tuple[str, ...] = (), *, path: str | None = None
    ) -> "MegatronInfiFPOModel":
        """Load the pivot from ``path`` (default ``model.path``) at the configured TP/PP.

        Collective over all ranks; ``init_distributed`` must have run.
        """
        from nemo_infifpo.models.checkpoint import load_megatron_model

        m = config.model
        loaded = load_megatron_model(
            path or m.path,
            m.tensor_model_parallel_size,
            m.pipeline_model_parallel_size,
            params_dtype=torch.bfloat16 if m.precision == "bf16" else torch.float32,
            use_transformer_engine=m.use_transformer_engine,
            config_overrides=training_config_overrides(config),
        )
        loaded.model.train()
        # ModelPT stores its config under `cfg`; a `model` key is reserved there, hence `pivot`.
        plain = config_to_dict(config)
        cfg = OmegaConf.create({"pivot": plain["model"], "tokenizer": plain["tokenizer"], "loss": plain["loss"]})
        return cls(cfg, loaded, Objective(config.loss, source_names))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return int(self.loaded.vocab_size)

    @property
    def uses_transformer_engine(self) -> bool:
        return uses_transformer_engine(self.module)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        """Logits ``[b, s, V/TP]`` on the last pipeline stage, hidden states elsewhere."""
        return self.module(input_ids, position_ids, attention_mask, packed_seq_params=packed_seq_params)

    def forward_step(self, data_iterator: Iterator[MicroBatch], model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        """megatron's ``forward_step_func`` for training: the shared forward pass
        (:func:`nemo_infifpo.engine.forward.forward_step`) with the objective as its head."""
        return forward_step(data_iterator, model, vocab_size=self.vocab_size, head=self.loss_func)

    def loss_func(self, batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Last-stage loss for the schedule: ``(loss_sum, count, {"stats": sums})``."""
        sums, counts = sequence_logprobs(batch, logits, self.vocab_size)
        loss_sum, count, stats = self.objective(sums, counts, batch.num_pairs, batch.scores)
        return loss_sum, count, {"stats": stats}

    def reduce_stats(self, losses_reduced: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Stats summed over micro-batches and data-parallel ranks, on every rank (collective)."""
        from megatron.core import parallel_state

        device = next(self.module.parameters()).device
        total = torch.zeros(len(self.objective.stats), dtype=torch.float64, device=device)
        for reduced in losses_reduced:  # empty except on the last pipeline stage
            total += reduced["stats"].to(device)
        dp_group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(dp_group) > 1:
            dist.all_reduce(total, group=dp_group)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if dist.get_world_size(pp_group) > 1:
            dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
        return total

    # ------------------------------------------------------------------ ModelPT

    def setup_training_data(self, train_data_config: DictConfig | dict) -> None:
        raise NotImplementedError(_NOT_LIGHTNING)

    def setup_validation_data(self, val_data_config: DictConfig | dict) -> None:
        raise NotImplementedError(_NOT_LIGHTNING)

    @classmethod
    def list_available_models(cls) -> list[Any]:
        """No pretrained InfiFPO models are published on NGC."""
        return []
