"""Gradient synchronisation + AdamW + gradient clipping, behind one interface.

megatron-core's optimizers and ``clip_grads`` only run on CUDA, so there are two
implementations with the same semantics:

* :class:`MegatronOptimizer` (GPU): megatron DDP (gradient buffers, reduction in fp32) and
  ``get_megatron_optimizer`` (bf16 params with fp32 main params; the distributed optimizer
  shards the optimizer state over data-parallel ranks);
* :class:`CpuAdamW` (CPU, fp32): ``torch.optim.AdamW`` plus the same gradient reduction written
  out: sum over data-parallel ranks, layer-norm gradients over tensor-parallel ranks with
  sequence parallelism, tied-embedding gradients between first and last pipeline stage, then
  division by the global count of the ``[sum, count]`` losses; the clipping norm is taken over
  tensor and pipeline ranks counting every parameter once (tensor-parallel duplicates and the
  last stage's copy of a tied embedding are skipped), as megatron does.

Both install :meth:`finalize_grads` as megatron's ``finalize_model_grads_func``, which the
pipeline schedule calls after the last backward of a step with the summed count. Both decay
matrices only (no weight decay on norms and biases, megatron's default). :meth:`step` checks
the gradient norm *before* touching any weight: a non-finite norm raises
:class:`NonFiniteError` and leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from typing import Any, Iterator

import torch
import torch.distributed as dist

from nemo_infifpo.training.config import TrainConfig
from nemo_infifpo.training.errors import NonFiniteError

__all__ = [
    "CpuAdamW",
    "MegatronOptimizer",
    "NonFiniteError",
    "TrainingOptimizer",
    "apply_param_group_schedule",
    "build_optimizer",
    "effective_weight_decay",
]


def effective_weight_decay(name: str, param: torch.nn.Parameter, weight_decay: float) -> float:
    """The weight decay a parameter gets on either path: megatron's standard rule, none on
    1-D parameters (norms) and biases."""
    return 0.0 if param.ndim == 1 or name.endswith(".bias") else weight_decay


def apply_param_group_schedule(param_groups: list[dict[str, Any]], lr: float, weight_decay: float) -> None:
    """Set one step's learning rate and weight decay on megatron's parameter groups.

    megatron builds its Adam groups with the full ``weight_decay`` and records the per-group
    multipliers (``wd_mult=0`` for norms and biases, ``lr_mult``) for megatron-LM's parameter
    scheduler to apply each step; without that scheduler they must be applied here, or norms
    and biases are decayed too.
    """
    for group in param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


class TrainingOptimizer(ABC):
    """What the loop needs from an optimizer, whatever the device."""

    #: the modules the schedule runs (DDP-wrapped on GPU)
    model_chunks: list[torch.nn.Module]

    @abstractmethod
    def zero_grad(self) -> None: ...

    @abstractmethod
    def finalize_grads(
        self, model_chunks: list[torch.nn.Module], num_tokens: torch.Tensor | None, pg_collection: Any = None,
        force_all_reduce: bool | None = False,
    ) -> None:
        """Reduce the micro-batch gradients of a step and divide them by the global count."""

    @abstractmethod
    def step(self, lr: float) -> float:
        """Clip and apply the gradients with learning rate ``lr``; return the gradient norm
        (before clipping). Raises :class:`NonFiniteError` before any update if it is not finite."""

    @abstractmethod
    def sharded_state_dict(self, model_sharded_state_dict: dict[str, Any], is_loading: bool = False) -> dict[str, Any]:
        """The optimizer state as a ``dist_checkpointing`` sharded state dict."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...

    @contextlib.contextmanager
    def parameters_synchronized(self) -> Iterator[None]:
        """While active, the model's parameters hold the latest update on every rank (for
        checkpoints and exports). Nothing to do unless parameter all-gathers are overlapped."""
        yield


def _check_norm(norm: float) -> None:
    if not math.isfinite(norm):
        raise NonFiniteError(f"the gradient norm is {norm}")


# --------------------------------------------------------------------------- CPU


class CpuAdamW(TrainingOptimizer):
    """fp32 AdamW with megatron's gradient semantics, for CPU/gloo runs (see module docstring)."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        o = config.optim
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                (decay if effective_weight_decay(name, param, 1.0) else no_decay).append(param)
        self.model = model
        self.params = decay + no_decay
        self.grad_clip = o.grad_clip
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=(o.adam_beta1, o.adam_beta2),
            eps=o.adam_eps,
            foreach=False,  # the same arithmetic whatever the parameter grouping
        )
        self.model_chunks = [model]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    def finalize_grads(self, model_chunks, num_tokens, pg_collection=None, force_all_reduce=False) -> None:
        from megatron.core import parallel_state as ps

        for param in self.params:
            if param.grad is None:  # every rank must bring the same buffers to the collectives
                param.grad = torch.zeros_like(param)
        _all_reduce_coalesced([p.grad for p in self.params], ps.get_data_parallel_group())

        config = self.model.config
        if config.sequence_parallel:
            # Layer norms see only this rank's slice of the sequence: sum their gradients.
            sp = [p.grad for p in self.params if getattr(p, "sequence_parallel", False)]
            _all_reduce_coalesced(sp, ps.get_tensor_model_parallel_group())

        if getattr(self.model, "share_embeddings_and_output_weights", False):
            group = ps.get_embedding_group(check_initialized=False)
            if group is not None and dist.get_world_size(group) > 1 and dist.get_rank() in dist.get_process_group_ranks(group):
                weight = self.model.shared_embedding_or_output_weight()
                if weight is not None and weight.grad is not None:
                    dist.all_reduce(weight.grad, group=group)

        if num_tokens is not None:
            # Only the last pipeline stage computed losses (and counts): share, then sum over DP.
            pp_group = ps.get_pipeline_model_parallel_group()
            if dist.get_world_size(pp_group) > 1:
                dist.broadcast(num_tokens, src=ps.get_pipeline_model_parallel_last_rank(), group=pp_group)
            dp_group = ps.get_data_parallel_group()
            if dist.get_world_size(dp_group) > 1:
                dist.all_reduce(num_tokens, group=dp_group)
            if int(num_tokens) > 0:
                for param in self.params:
                    param.grad.div_(float(num_tokens))

    def grad_norm(self) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        squares = torch.zeros((), dtype=torch.float64)
        for param in self.params:
            if param_is_not_shared(param) and param_is_not_tensor_parallel_duplicate(param):
                squares += param.grad.double().pow(2).sum()
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(squares, group=group)
        return float(squares.sqrt())

    @torch.no_grad()
    def step(self, lr: float) -> float:
        norm = self.grad_norm()
        _check_norm(norm)
        if self.grad_clip > 0:
            coefficient = self.grad_clip / (norm + 1.0e-6)  # megatron's clip coefficient
            if coefficient < 1.0:
                for param in self.params:
                    param.grad.mul_(coefficient)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        return norm

    def _init_state(self) -> None:
        """Create AdamW's state so a checkpoint has tensors to load into."""
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                state = self.optimizer.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False) -> dict[str, Any]:
        # Each AdamW moment gets the sharding of its parameter (megatron's helpers), so the
        # optimizer state reshards across TP/PP exactly like the weights do.
        from megatron.core.dist_checkpointing.optimizer import (
            get_param_id_to_sharded_param_map,
            optim_state_to_sharding_state,
        )

        if is_loading or not self.optimizer.state:
            self._init_state()
        state = self.optimizer.state_dict()
        id_map = get_param_id_to_sharded_param_map(model_sharded_state_dict, self.params)
        steps = {float(s["step"]) for s in state["state"].values()}
        if len(steps) != 1:
            raise RuntimeError(f"AdamW steps differ between parameters: {sorted(steps)}")
        optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
        state["common_step"] = steps.pop()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        step = state_dict.pop("common_step")
        for param_state in state_dict["state"].values():
            param_state["step"] = torch.tensor(float(step))
        self.optimizer.load_state_dict(state_dict)


def _all_reduce_coalesced(tensors: list[torch.Tensor], group: Any) -> None:
    if not tensors or group is None or dist.get_world_size(group) == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    for tensor, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        tensor.copy_(synced)


# --------------------------------------------------------------------------- GPU


class MegatronOptimizer(TrainingOptimizer):
    """megatron DDP + ``get_megatron_optimizer`` (distributed optimizer when configured).

    Communication overlaps compute by default: gradients are reduce-scattered in buckets as
    the backward pass produces them (``model.overlap_grad_reduce``), and under the distributed
    optimizer the updated parameters are all-gathered bucket by bucket ahead of the next
    forward pass (``model.overlap_param_gather``). The schedule learns about it through the
    model config's ``no_sync_func`` (no reduction before the last micro-batch) and
    ``grad_sync_func``, as megatron-LM's training loop sets them.
    """

    # Distributed-optimizer checkpoints: every rank writes its own shard of the fp32 main
    # parameters and Adam moments, each mapped to its model parameter's global shape, so no
    # rank ever gathers the whole optimizer state (megatron's "fully_reshardable" form
    # all-gathers it into host memory on every data-parallel rank: ~44 GB per rank for Phi-4
    # at TP2.PP2, see configs/infifpo_phi4.yaml), and the checkpoint still reshards across
    # TP, PP and DP.
    SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_sharded_model_space"}

    def __init__(self, model: torch.nn.Module, config: TrainConfig) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        o, m = config.optim, config.model
        bf16 = m.precision == "bf16"
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=m.overlap_grad_reduce,
            overlap_param_gather=m.overlap_param_gather and m.use_distributed_optimizer,
            use_distributed_optimizer=m.use_distributed_optimizer,
            bucket_size=m.ddp_bucket_size,
        )
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.grad_clip,
                bf16=bf16,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
                use_distributed_optimizer=m.use_distributed_optimizer,
            ),
            [ddp],
        )
        self.model_chunks = [ddp]
        self.weight_decay = o.weight_decay
        self.grad_clip = o.grad_clip
        if ddp_config.overlap_grad_reduce:
            model.config.no_sync_func = ddp.no_sync
            model.config.grad_sync_func = ddp.start_grad_sync

    def zero_grad(self) -> None:
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        # Under overlap_param_gather this also dispatches the first parameter all-gather.
        self.optimizer.zero_grad()

    def finalize_grads(self, model_chunks, num_tokens, pg_collection=None, force_all_reduce=False) -> None:
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(model_chunks, num_tokens, pg_collection=pg_collection, force_all_reduce=force_all_reduce)

    def _inner_optimizers(self) -> list[Any]:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def step(self, lr: float) -> float:
        """megatron's ``step`` split open so the gradient norm is computed once (for the check,
        the clipping and the metrics) and a non-finite norm stops before any weight changes."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        apply_param_group_schedule(self.optimizer.param_groups, lr, self.weight_decay)
        if self.optimizer.prepare_grads():  # copies model grads to the fp32 main grads
            raise NonFiniteError("megatron's optimizer found inf/nan in the gradients")
        norm = float(self.optimizer.get_grad_norm())
        _check_norm(norm)
        if self.grad_clip > 0:
            for inner in self._inner_optimizers():
                if getattr(inner, "is_stub_optimizer", False):
                    continue
                params = inner.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(
                        params, max_norm=self.grad_clip, total_norm=norm,
                        use_decoupled_grad=inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8,
                    )
        if not self.optimizer.step_with_ready_grads():
            raise NonFiniteError("megatron's optimizer skipped the update")
        return norm

    @contextlib.contextmanager
    def parameters_synchronized(self) -> Iterator[None]:
        # With overlapped parameter all-gathers the model's weights are only complete after the
        # next forward's pre-hooks ran: finish the gather before anything reads them.
        chunks = [c for c in self.model_chunks if getattr(c, "use_forward_hook", False)]
        for chunk in chunks:
            chunk.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for chunk in chunks:
                chunk.enable_forward_pre_hook()

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False) -> dict[str, Any]:
        return self.optimizer.sharded_state_dict(
            model_sharded_state_dict, is_loading=is_loading, metadata=self.SHARDING_METADATA
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)


def build_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> TrainingOptimizer:
    """The optimizer for ``model`` (this rank's GPTModel) on ``device``, hooked into its config."""
    optimizer: TrainingOptimizer = (
        MegatronOptimizer(model, config) if device.type == "cuda" else CpuAdamW(model, config)
    )
    model.config.finalize_model_grads_func = optimizer.finalize_grads
    return optimizer
