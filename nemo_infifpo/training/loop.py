"""The InfiFPO training loop (``recipes/train_infifpo.py`` calls :func:`train`).

Reads top to bottom: distributed set-up, the output directory's lock, data, the resume guard,
model, optimizer and schedule, resume, the step-0 parity check, then one global batch per step
through megatron's forward-backward schedule (pipeline parallel included), the update, metrics,
checkpoints. A stop signal (SIGTERM/SIGUSR1) ends the run after the current step with a
checkpoint and a normal return; during start-up, with a normal return before the first step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from nemo_infifpo.engine.batches import MicroBatch, pack_micro_batches, pad_micro_batches, padded_length
from nemo_infifpo.training.config import ConfigError, TrainConfig, config_to_dict

__all__ = ["LOCK_FILE", "StepContext", "TrainResult", "train", "train_step"]

log = logging.getLogger(__name__)

# The output directory's lock (nemo_infifpo.locking): one training run per output_dir.
LOCK_FILE = ".lock"


@dataclass
class StepContext:
    """What a callback sees after each completed step."""

    step: int
    record: dict[str, Any]
    model: Any  # MegatronInfiFPOModel
    optimizer: Any  # TrainingOptimizer


@dataclass
class TrainResult:
    model: Any
    optimizer: Any
    step: int
    checkpoint: Path | None
    stopped_by_signal: bool
    parity_max_abs_diff: float | None


def _check_launch(config: TrainConfig, info: Any) -> None:
    """Checks that need the launch: data-parallel size and device."""
    m = config.model
    per_step = m.micro_batch_size * info.dp
    if m.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'model.global_batch_size' ({m.global_batch_size}) must be a multiple of "
            f"model.micro_batch_size x data-parallel size = {m.micro_batch_size} x {info.dp} = {per_step} "
            f"(data-parallel size = {info.world_size} ranks / (TP {info.tp} x PP {info.pp}))"
        )
    if info.device.type == "cpu" and m.precision != "fp32":
        raise ConfigError(
            f"config key 'model.precision' is {m.precision!r}, but this run is on CPU, which trains "
            "in fp32 only: set model.precision=fp32 (or run on GPUs)"
        )


def _micro_batches(config: TrainConfig, data: Any, rows: list[int], *, pad_multiple: int, te: bool) -> list[MicroBatch]:
    pairs = data.pairs(rows)
    chosen_only = config.loss.type == "sft"
    if config.data.pack_sequences:
        return pack_micro_batches(
            pairs, rows, data.scores, bin_length=padded_length(config.pack_length, pad_multiple),
            chosen_only=chosen_only, use_transformer_engine=te,
        )
    longest = max(max(len(p.chosen), 0 if chosen_only else len(p.rejected)) for p in pairs)
    return pad_micro_batches(
        pairs, rows, data.scores, micro_batch_size=config.model.micro_batch_size,
        seq_length=padded_length(longest, pad_multiple), chosen_only=chosen_only, explicit_mask=not te,
    )


def _global_tokens(config: TrainConfig, data: Any, rows: list[int]) -> int:
    lengths = data.lengths[torch.as_tensor(rows, dtype=torch.long)]
    return int(lengths[:, 0].sum() if config.loss.type == "sft" else lengths.sum())


def train_step(model: Any, optimizer: Any, micro: list[MicroBatch], lr: float, forward_backward: Any) -> tuple[dict[str, float], float]:
    """One update: forward/backward over the micro-batches (any PP), then the optimizer.

    Returns the step's metrics (reduced over the global batch, on every rank) and the gradient
    norm. Raises ``NonFiniteError`` before the update on a non-finite loss or gradient norm.
    """
    from nemo_infifpo.training.errors import NonFiniteError

    optimizer.zero_grad()
    losses_reduced = forward_backward(
        forward_step_func=model.forward_step,
        data_iterator=iter(micro),
        model=optimizer.model_chunks,
        num_microbatches=len(micro),
        seq_length=micro[0].seq_length,
        micro_batch_size=int(micro[0].input_ids.shape[0]),
        forward_only=False,
    )
    metrics = model.objective.summarize(model.reduce_stats(losses_reduced))
    if not math.isfinite(metrics["loss"]):
        # Same value on every rank (reduced and broadcast), so all ranks stop here together.
        raise NonFiniteError(f"the loss is {metrics['loss']} (non-finite log-probs or loss)")
    return metrics, optimizer.step(lr)


def train(
    config: TrainConfig,
    *,
    callbacks: Sequence[Callable[[StepContext], None]] = (),
    signals: Any = None,
) -> TrainResult:
    """Train the pivot as configured. Collective: every rank of the job calls it.

    ``signals``: an active :class:`~nemo_infifpo.training.signals.StopSignals` that the caller
    installed early (the recipe does, before its imports); otherwise one is installed here.
    A stop signal at any point, start-up included, ends the run cleanly (return, exit 0).

    Scripts calling this must do so under ``if __name__ == "__main__":`` (checkpoint saving
    starts a process that re-imports ``__main__``).
    """
    from nemo_infifpo.training.signals import StopSignals

    if signals is not None:
        return _train(config, callbacks, signals)
    with StopSignals() as own:
        return _train(config, callbacks, own)


def _train(config: TrainConfig, callbacks: Sequence[Callable[[StepContext], None]], signals: Any) -> TrainResult:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_infifpo.atomic import write_text_atomic
    from nemo_infifpo.engine.distributed import init_distributed
    from nemo_infifpo.locking import lock_on_rank0
    from nemo_infifpo.training.checkpoint import (
        TrainerState,
        find_latest_checkpoint,
        find_resumable_checkpoint,
        load_train_state,
        remove_stale_temporaries,
        save_checkpoint,
    )
    from nemo_infifpo.training.dataset import load_training_data
    from nemo_infifpo.training.errors import NonFiniteError
    from nemo_infifpo.training.metrics import MetricsLogger, peak_flops_per_second, training_flops
    from nemo_infifpo.training.model import MegatronInfiFPOModel
    from nemo_infifpo.training.optimizer import build_optimizer
    from nemo_infifpo.training.parity import check_step0_parity
    from nemo_infifpo.training.resume import check_resume, data_fingerprint, run_inputs
    from nemo_infifpo.training.sampler import BatchPlan
    from nemo_infifpo.training.schedule import CosineSchedule

    # ---- launch; one run per output_dir (a second one is refused, on every rank)
    m = config.model
    info = init_distributed(m.tensor_model_parallel_size, m.pipeline_model_parallel_size, seed=config.seed)
    _check_launch(config, info)
    is_rank0 = info.rank == 0
    output_dir = Path(config.output_dir)
    lock = lock_on_rank0(output_dir / LOCK_FILE, stage="training")
    try:
        remove_stale_temporaries(output_dir)
        resume_from = (
            find_resumable_checkpoint(output_dir, verify=config.checkpoint.verify_checksums)
            if config.checkpoint.resume else None
        )

        # ---- data and plan; a resume must continue the run its checkpoint was saved from
        data = load_training_data(config)
        plan = BatchPlan.create(
            num_rows=len(data), global_batch_size=m.global_batch_size, data_parallel_size=info.dp,
            seed=config.seed, shuffle=config.data.shuffle, max_steps=config.trainer.max_steps,
            max_epochs=config.trainer.max_epochs,
        )
        inputs = run_inputs(config, data_fingerprint(data.ids, data.lengths, data.scores))
        if resume_from is not None:
            saved = TrainerState.read(resume_from)
            check_resume(
                resume_from, saved.inputs, saved.total_steps, saved.step, inputs, plan.total_steps,
                config.checkpoint.allow_changes,
            )
        if is_rank0:
            from omegaconf import OmegaConf

            write_text_atomic(output_dir / "config.yaml", OmegaConf.to_yaml(config_to_dict(config)))

        # ---- model, optimizer, resume
        model = MegatronInfiFPOModel.from_config(
            config, data.source_names, path=str(resume_from) if resume_from else None
        )
        optimizer = build_optimizer(model.module, config, info.device)
        schedule = CosineSchedule.from_fraction(config.optim.lr, config.optim.min_lr, plan.total_steps, config.optim.warmup_fraction)
        state = TrainerState(
            tensor_model_parallel_size=info.tp, pipeline_model_parallel_size=info.pp, data_parallel_size=info.dp,
            total_steps=plan.total_steps, inputs=inputs,
        )
        if resume_from is not None:
            state = load_train_state(resume_from, model, optimizer, state)
            if state.consumed_samples != state.step * m.global_batch_size:
                # The data position is step-based: another global batch size would replay or skip rows.
                raise ConfigError(
                    f"config key 'model.global_batch_size' is {m.global_batch_size}, but {resume_from} was "
                    f"trained with {state.consumed_samples // max(state.step, 1)} pairs per step; resume with "
                    "the same global batch size (or start a new output_dir)"
                )
            log.info("resumed from %s at step %d", resume_from, state.step)
        if _stopped_during_startup(signals, info, "loading the model", resume_from):
            return TrainResult(model, optimizer, state.step, resume_from, True, None)
        te = model.uses_transformer_engine
        # Sequence parallelism splits the sequence over TP ranks: lengths must divide evenly.
        pad_multiple = math.lcm(config.data.pad_to_multiple_of, info.tp if m.sequence_parallel else 1)

        # ---- step-0 parity: the pivot must reproduce the precomputed p0 scores
        forward_backward = get_forward_backward_func()
        parity = None
        if state.step == 0 and config.trainer.step0_parity_check and config.needs_p0_scores:
            # Step 1's own micro-batches through the training forward (forward only).
            first = _micro_batches(config, data, plan.rank_share(0, info.dp_rank), pad_multiple=pad_multiple, te=te)
            report = check_step0_parity(
                model, first, optimizer.model_chunks, data,
                length_norm=config.loss.length_norm, atol=config.trainer.step0_parity_atol,
            )
            parity = report.max_abs_diff
            log.info("step-0 parity: %d scores match p0 (%s; max |diff| %.3g)", len(report.rows), report.tolerance_text(), parity)
            if _stopped_during_startup(signals, info, "the step-0 parity check", resume_from):
                return TrainResult(model, optimizer, state.step, resume_from, True, parity)

        logger = MetricsLogger(
            output_dir, config.logging, enabled=is_rank0, total_steps=plan.total_steps, start_step=state.step,
            run_config=config_to_dict(config),
        )
        peak = peak_flops_per_second(info.device)
        checkpoint: Path | None = None
        stopped = False

        # ---- the loop
        while state.step < plan.total_steps:
            rows = plan.rank_share(state.step, info.dp_rank)
            micro = _micro_batches(config, data, rows, pad_multiple=pad_multiple, te=te)
            lr = schedule.lr(state.step)
            started = time.perf_counter()
            try:
                metrics, grad_norm = train_step(model, optimizer, micro, lr, forward_backward)
            except NonFiniteError as error:
                raise NonFiniteError(
                    f"step {state.step + 1}: {error}. Stopped before the update; nothing was saved "
                    f"(last checkpoint: {find_latest_checkpoint(output_dir)}). Lower optim.lr or "
                    "check the data for extreme scores."
                ) from error
            if info.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started

            state.step += 1
            state.consumed_samples += m.global_batch_size
            global_rows = plan.global_batch(state.step - 1)
            tokens = _global_tokens(config, data, global_rows)
            record: dict[str, Any] = {
                "step": state.step, **metrics, "lr": lr, "grad_norm": grad_norm,
                "step_time_s": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                "consumed_samples": state.consumed_samples,
            }
            if peak is not None:
                lengths = data.lengths[torch.as_tensor(global_rows)]
                seqs = lengths[:, 0].tolist() if config.loss.type == "sft" else lengths.flatten().tolist()
                flops = training_flops(model.loaded.arch, seqs, model.loaded.padded_vocab_size)
                record["mfu"] = flops / elapsed / (peak * info.world_size)
            if parity is not None and state.step == 1:
                record["step0_parity_max_abs_diff"] = parity
            logger.log(record)
            for callback in callbacks:
                callback(StepContext(state.step, record, model, optimizer))

            stopped = signals.stop_requested(info.device)
            done = state.step >= plan.total_steps
            interval = config.checkpoint.interval
            if stopped or (interval and state.step % interval == 0) or (done and config.checkpoint.save_final):
                checkpoint = save_checkpoint(output_dir, model, optimizer, state, keep_last=config.checkpoint.keep_last)
                log.info("saved %s", checkpoint)
            if stopped:
                log.warning("stop signal received: saved step %d to %s, exiting", state.step, checkpoint)
                break
        logger.close()
        return TrainResult(model, optimizer, state.step, checkpoint, stopped, parity)
    finally:
        if lock is not None:
            lock.release()


def _stopped_during_startup(signals: Any, info: Any, stage: str, resume_from: Path | None) -> bool:
    """A stop signal that arrived before the first step: nothing new to save, so every rank
    just returns (exit 0; Slurm requeues and the next run starts where this one would have)."""
    if not signals.stop_requested(info.device):
        return False
    log.warning(
        "stop signal received during start-up (by the end of %s): exiting before the first step; "
        "the next run resumes from %s", stage, resume_from or "the pivot (no checkpoint yet)",
    )
    return True
