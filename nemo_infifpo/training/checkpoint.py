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
        trainer_state.json      and the loop's position: step, consumed samples, layout, and
                                the run's inputs (model, data fingerprint, loss, optimizer,
                                seed, schedule) that a resume must match,
        checksums.json          size and CRC-32 of every other file, verified before a resume.
      .tmp.step_0000009/        a checkpoint being written (never read; removed on restart)

A checkpoint is written into ``.tmp.<name>`` by all ranks, renamed to ``<name>`` once every
rank has finished, and only then is ``latest`` pointed at it, so a crash at any moment leaves
the previous checkpoint intact and ``latest`` never names a partial one. Before the rename
every file is fsynced and checksummed (the ranks share the files); a resume verifies the
checksums the same way and, when the newest checkpoint is damaged (a truncated file, a
flipped bit), says which file and falls back to the newest intact one.

Resuming at another layout: model weights and the CPU optimizer's moments reshard through
``dist_checkpointing`` (each moment carries its parameter's sharding); the GPU distributed
optimizer is saved in megatron's ``fully_sharded_model_space`` form (each rank writes its own
shard, mapped to the parameters' global shapes), which reshards too without ever gathering
the optimizer state on one rank. RNG states
are per rank and only restored when TP, PP and DP are unchanged (dropout is 0 for every
supported model, and data order does not depend on them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from nemo_infifpo.atomic import fsync_directory, write_json_atomic, write_text_atomic
from nemo_infifpo.models.checkpoint import model_sharded_state_dict
from nemo_infifpo.training.optimizer import TrainingOptimizer

__all__ = [
    "CHECKPOINTS_DIR",
    "CHECKSUMS_FILE",
    "CheckpointCorruptError",
    "LATEST_FILE",
    "TRAINER_STATE_FILE",
    "TrainerState",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "load_train_state",
    "remove_stale_temporaries",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAIN_STATE_DIR = "train_state"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
_CHUNK = 16 << 20
_TMP_PREFIX = ".tmp."
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointCorruptError(RuntimeError):
    """No checkpoint of a run can be resumed from, although some exist."""


@dataclass
class TrainerState:
    """Where the loop is: completed updates and rows consumed (the data position), the layout,
    and what the run was started with (``inputs``, see :mod:`nemo_infifpo.training.resume`)."""

    step: int = 0
    consumed_samples: int = 0
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: int = 1
    total_steps: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        write_text_atomic(directory / TRAINER_STATE_FILE, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        path = directory / TRAINER_STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise CheckpointCorruptError(f"{path}: unreadable trainer state ({error})") from None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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


# ----------------------------------------------------------------------------- checksums


def _files(directory: Path) -> list[str]:
    """Every file of a checkpoint but the checksum list, as sorted relative paths."""
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE
    )


def _size_and_crc(path: Path, *, sync: bool) -> tuple[int, int]:
    """Size and CRC-32 in one read (CRC-32 runs at several GB/s: storage corruption, not
    tampering, is what it is for); with ``sync`` the file is fsynced on the way."""
    crc, size = 0, 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if sync:
            os.fsync(handle.fileno())
    return size, crc


def _my_share(names: list[str]) -> list[str]:
    """Ranks split the files round-robin, so hashing a large checkpoint is parallel."""
    if not dist.is_initialized():
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(part: dict[str, Any]) -> dict[str, Any]:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return part
    parts: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in (p or {}).items()}


def _record_checksums(directory: Path) -> None:
    """fsync and checksum every file of ``directory`` (collective); rank 0 writes the list."""
    names = _files(directory)
    mine = {name: list(_size_and_crc(directory / name, sync=True)) for name in _my_share(names)}
    everything = _gather(mine)
    if _is_rank0():
        write_json_atomic(directory / CHECKSUMS_FILE, {"algorithm": "crc32", "files": everything})
        for sub in {(directory / name).parent for name in names}:
            fsync_directory(sub)


def verify_checkpoint(path: str | Path) -> list[str]:
    """What is wrong with checkpoint ``path`` against its ``checksums.json`` (empty: intact).

    Collective when torch.distributed is initialised (ranks share the files); also usable in
    a single process (export). A checkpoint without a checksum list (written by an older
    version) passes with a warning.
    """
    path = Path(path)
    listing = path / CHECKSUMS_FILE
    if not listing.is_file():
        log.warning("%s has no %s: its files cannot be verified", path, CHECKSUMS_FILE)
        return []
    try:
        expected = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{listing}: unreadable ({error})"]
    problems: dict[str, str] = {}
    for name in _my_share(sorted(expected)):
        file = path / name
        size, crc = expected[name]
        if not file.is_file():
            problems[name] = f"{file}: missing"
            continue
        actual_size, actual_crc = _size_and_crc(file, sync=False)
        if actual_size != size:
            problems[name] = f"{file}: {actual_size} bytes, {size} when saved (truncated or overwritten)"
        elif actual_crc != crc:
            problems[name] = f"{file}: contents changed since it was saved (checksum mismatch)"
    for name in _my_share(_files(path)):
        if name not in expected:
            problems[name] = f"{path / name}: not part of the checkpoint when it was saved"
    merged = _gather(problems)
    return [merged[k] for k in sorted(merged)]


def _steps_newest_first(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.glob("step_*") if _STEP_DIR.match(p.name) and p.is_dir()),
        key=lambda p: -int(_STEP_DIR.match(p.name).group(1)),  # type: ignore[union-attr]
    )


def find_resumable_checkpoint(output_dir: str | Path, *, verify: bool = True) -> Path | None:
    """The newest complete checkpoint whose files match their checksums, or None when the
    run has none yet (collective with ``verify``).

    Damaged checkpoints are skipped with an error naming the broken files; if every existing
    checkpoint is damaged, :class:`CheckpointCorruptError` is raised rather than silently
    starting over from the pivot.
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    first = find_latest_checkpoint(output_dir)
    if first is None:
        return None
    candidates = [first] + [p for p in _steps_newest_first(root) if p != first and _is_complete(p)]
    rejected = []
    for candidate in candidates:
        problems = verify_checkpoint(candidate) if verify else []
        if not problems:
            try:
                TrainerState.read(candidate)
            except CheckpointCorruptError as error:
                problems = [str(error)]
        if not problems:
            if rejected:
                log.error("resuming from %s, the newest intact checkpoint", candidate)
            return candidate
        rejected.append(candidate)
        log.error(
            "checkpoint %s is damaged and is skipped: %s%s",
            candidate, "; ".join(problems[:5]), f" (+{len(problems) - 5} more)" if len(problems) > 5 else "",
        )
    raise CheckpointCorruptError(
        f"every checkpoint under {root} is damaged ({', '.join(p.name for p in rejected)}; see the errors "
        "above for the files). Restore them from a copy, or move them aside to start over from the pivot."
    )


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a killed run (rank 0; call before training)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if _is_rank0() and root.is_dir():
        for path in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    _barrier()


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

    with stop_signals_deferred(), optimizer.parameters_synchronized():
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
        "optimizer": optimizer.sharded_state_dict(model_sharded_state_dict(model.module)),
        "rng": _rng_sharded_object(state),
    }
    dist_checkpointing.save(sharded, str(tmp / TRAIN_STATE_DIR))
    _barrier()

    if _is_rank0():
        state.write(tmp)
    _barrier()
    _record_checksums(tmp)
    _barrier()

    if _is_rank0():
        if final.exists():  # the same step saved before (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_directory(root)
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
    request: dict[str, Any] = {"optimizer": optimizer.sharded_state_dict(model_sharded_state_dict(model.module), is_loading=True)}
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
        total_steps=state.total_steps,
        inputs=state.inputs,
    )
