"""Training checkpoints: atomic, resumable, loadable at another TP/PP, exportable.

Layout under ``output_dir``::

    checkpoints/
      latest                    name of the newest complete checkpoint (replaced atomically)
      step_0000006/             one checkpoint = a model checkpoint of nemo_infifpo.models
        nemo_infifpo_model.json   (metadata, hf_assets/, weights/: what recipes/export_hf.py
        hf_assets/                 and every model.path reader load, at any TP/PP) ...
        weights/
        train_state/            ... plus a dist_checkpointing checkpoint of the optimizer
                                (AdamW moments sharded like their parameters) and each rank's
                                RNG state,
        trainer_state.json      and the loop's position: step, consumed samples, layout.
      .tmp.step_0000009/        a checkpoint being written (never read; removed on restart)

A checkpoint is written into ``.tmp.<name>`` by all ranks, renamed to ``<name>`` once every
rank has finished, and only then is ``latest`` pointed at it, so a crash at any moment leaves
the previous checkpoint intact and ``latest`` never names a partial one.

Resuming at another layout: model weights and the CPU optimizer's moments reshard through
``dist_checkpointing`` (each moment carries its parameter's sharding); the GPU distributed
optimizer is saved in megatron's ``fully_reshardable`` form, which reshards too. RNG states
are per rank and only restored when TP, PP and DP are unchanged (dropout is 0 for every
supported model, and data order does not depend on them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_infifpo.atomic import write_text_atomic
from nemo_infifpo.training.optimizer import TrainingOptimizer

__all__ = [
    "CHECKPOINTS_DIR",
    "LATEST_FILE",
    "TRAINER_STATE_FILE",
    "TrainerState",
    "find_latest_checkpoint",
    "load_train_state",
    "remove_stale_temporaries",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAIN_STATE_DIR = "train_state"
TRAINER_STATE_FILE = "trainer_state.json"
_TMP_PREFIX = ".tmp."
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainerState:
    """Where the loop is: completed updates and rows consumed (the data position)."""

    step: int = 0
    consumed_samples: int = 0
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1

    def write(self, directory: Path) -> None:
        write_text_atomic(directory / TRAINER_STATE_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        return cls(**json.loads((directory / TRAINER_STATE_FILE).read_text()))


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_complete(path: Path) -> bool:
    from nemo_infifpo.models.checkpoint import METADATA_FILE

    return (path / METADATA_FILE).is_file() and (path / TRAINER_STATE_FILE).is_file() and (path / TRAIN_STATE_DIR).is_dir()


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def find_latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or else the newest complete one, or None."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    pointer = root / LATEST_FILE
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if _is_complete(named):
            return named
        log.warning("%s names %s, which is not a complete checkpoint; looking for others", pointer, named)
    complete = sorted(
        (p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and _is_complete(p)),
        key=lambda p: int(_STEP_DIR.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    return complete[-1] if complete else None


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a killed run (rank 0; call before training)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if _is_rank0() and root.is_dir():
        for path in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    _barrier()


def _model_sharded_state_dict(module: torch.nn.Module) -> dict[str, Any]:
    # The same filter as nemo_infifpo.models.checkpoint: TE's _extra_state is not model state.
    return {k: v for k, v in module.sharded_state_dict().items() if not k.endswith("_extra_state")}


def _rng_sharded_object(state: TrainerState) -> Any:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    rng = {
        "python_torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    return ShardedObject(
        "rng_state",
        rng,
        (state.pipeline_model_parallel_size, state.tensor_model_parallel_size, state.data_parallel_size),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


def save_checkpoint(
    output_dir: str | Path,
    model: Any,
    optimizer: TrainingOptimizer,
    state: TrainerState,
    *,
    keep_last: int,
) -> Path:
    """Write a checkpoint of ``model`` (a MegatronInfiFPOModel), ``optimizer`` and ``state``.

    Collective over all ranks. Run under ``if __name__ == "__main__":`` (see
    ``nemo_infifpo.models.checkpoint.save_megatron_model``).
    """
    from nemo_infifpo.models.checkpoint import hf_assets_dir
    from nemo_infifpo.training.signals import stop_signals_deferred

    with stop_signals_deferred():
        final = _save_checkpoint(output_dir, model, optimizer, state, keep_last=keep_last)
    # The newest checkpoint now holds the model's HF assets and is never pruned, whereas the
    # directory they were copied from (a resumed-from checkpoint) may be pruned later.
    model.loaded.assets_dir = hf_assets_dir(final)
    return final


def _save_checkpoint(output_dir: str | Path, model: Any, optimizer: TrainingOptimizer, state: TrainerState, *, keep_last: int) -> Path:
    from megatron.core import dist_checkpointing

    from nemo_infifpo.models.checkpoint import save_loaded_model

    root = Path(output_dir) / CHECKPOINTS_DIR
    name = checkpoint_name(state.step)
    tmp, final = root / f"{_TMP_PREFIX}{name}", root / name
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / TRAIN_STATE_DIR).mkdir(parents=True)
    _barrier()

    save_loaded_model(model.loaded, tmp, extra={"training_step": state.step, "consumed_samples": state.consumed_samples})
    sharded = {
        "optimizer": optimizer.sharded_state_dict(_model_sharded_state_dict(model.module)),
        "rng": _rng_sharded_object(state),
    }
    dist_checkpointing.save(sharded, str(tmp / TRAIN_STATE_DIR))
    _barrier()

    if _is_rank0():
        state.write(tmp)
        if final.exists():  # the same step saved before (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST_FILE, name + "\n")
        _prune(root, keep_last, keep=name)
    _barrier()
    return final


def _prune(root: Path, keep_last: int, *, keep: str) -> None:
    steps = sorted(
        (p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)),
        key=lambda p: int(_STEP_DIR.match(p.name).group(1)),  # type: ignore[union-attr]
    )
    for path in steps[:-keep_last]:
        if path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def load_train_state(path: str | Path, model: Any, optimizer: TrainingOptimizer, state: TrainerState) -> TrainerState:
    """Restore optimizer (and, at the same layout, RNG) from checkpoint ``path`` whose model
    weights ``model`` was already loaded from. ``state`` describes the current layout.
    Returns the saved position with the current layout. Collective over all ranks."""
    from megatron.core import dist_checkpointing, tensor_parallel

    path = Path(path)
    saved = TrainerState.read(path)
    same_layout = (
        saved.tensor_model_parallel_size,
        saved.pipeline_model_parallel_size,
        saved.data_parallel_size,
    ) == (state.tensor_model_parallel_size, state.pipeline_model_parallel_size, state.data_parallel_size)
    request: dict[str, Any] = {"optimizer": optimizer.sharded_state_dict(_model_sharded_state_dict(model.module), is_loading=True)}
    if same_layout:
        request["rng"] = _rng_sharded_object(state)
    loaded = dist_checkpointing.load(request, str(path / TRAIN_STATE_DIR))
    optimizer.load_state_dict(loaded["optimizer"])
    if same_layout:
        rng = loaded["rng"]
        torch.set_rng_state(rng["python_torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
    else:
        log.info(
            "resuming %s saved at TP=%d PP=%d DP=%d with TP=%d PP=%d DP=%d: weights and optimizer "
            "state resharded, per-rank RNG states not restored",
            path, saved.tensor_model_parallel_size, saved.pipeline_model_parallel_size, saved.data_parallel_size,
            state.tensor_model_parallel_size, state.pipeline_model_parallel_size, state.data_parallel_size,
        )
    return TrainerState(
        step=saved.step,
        consumed_samples=saved.consumed_samples,
        tensor_model_parallel_size=state.tensor_model_parallel_size,
        pipeline_model_parallel_size=state.pipeline_model_parallel_size,
        data_parallel_size=state.data_parallel_size,
    )
