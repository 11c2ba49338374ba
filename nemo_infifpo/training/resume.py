"""The resume guard: a run continues a checkpoint only with the inputs it was started with.

A rerun with the same ``output_dir`` resumes from its latest checkpoint: weights, optimizer
moments and data position come from there. Had the config meanwhile changed its pivot, data,
loss, optimizer, seed or schedule, the resumed run would silently be a mix of two runs (and
``config.yaml`` would name the new one). Every checkpoint therefore records the run's inputs
(:func:`run_inputs`), and :func:`check_resume` compares them with the new config before any
weight is loaded: a difference refuses the resume unless the key is listed in
``checkpoint.allow_changes``; an allowed change of the learning-rate schedule is logged with
the jump it causes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch

from nemo_infifpo.training.config import RESUME_GUARDED_KEYS, ConfigError, TrainConfig, config_to_dict
from nemo_infifpo.training.schedule import CosineSchedule

__all__ = ["check_resume", "data_fingerprint", "run_inputs"]

log = logging.getLogger(__name__)


def data_fingerprint(ids: list[str], lengths: torch.Tensor, scores: dict[str, torch.Tensor]) -> str:
    """sha256 of what training reads from the data: row ids in order, token lengths and the
    precomputed scores. A moved copy of the same file has the same fingerprint."""
    digest = hashlib.sha256()
    for row_id in ids:
        digest.update(row_id.encode("utf-8") + b"\n")
    digest.update(lengths.to(torch.int64).contiguous().numpy().tobytes())
    for name in sorted(scores):
        digest.update(name.encode("utf-8"))
        digest.update(scores[name].to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_inputs(config: TrainConfig, data_fingerprint: str) -> dict[str, Any]:
    """The guarded inputs of this run, flat (``"optim.lr": 1e-6``), as stored in checkpoints."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(config).items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    inputs = {key: flat[key] for key in RESUME_GUARDED_KEYS}
    inputs["model.path"] = str(Path(config.model.path).resolve())
    inputs["data.path"] = str(Path(config.data.path).resolve())
    inputs["data.fingerprint"] = data_fingerprint
    return inputs


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, str]:
    """Guarded key -> "checkpoint X, now Y" for every difference (keys a checkpoint of an older
    version did not record are not compared)."""
    out: dict[str, str] = {}
    for key in RESUME_GUARDED_KEYS:
        if key not in saved or saved[key] == current[key]:
            continue
        if key == "data.path" and saved.get("data.fingerprint") == current["data.fingerprint"]:
            continue  # the same data at another path (e.g. copied to scratch)
        out[key] = f"checkpoint {saved[key]!r}, now {current[key]!r}"
    if "data.fingerprint" in saved and saved["data.fingerprint"] != current["data.fingerprint"] and "data.path" not in out:
        out["data.path"] = f"the file {current['data.path']!r} has other contents than when the checkpoint was trained"
    return out


def _schedule(inputs: dict[str, Any], total_steps: int) -> CosineSchedule:
    return CosineSchedule.from_fraction(inputs["optim.lr"], inputs["optim.min_lr"], total_steps, inputs["optim.warmup_fraction"])


def check_resume(
    checkpoint: Path,
    saved_inputs: dict[str, Any],
    saved_total_steps: int | None,
    step: int,
    current_inputs: dict[str, Any],
    total_steps: int,
    allowed: tuple[str, ...],
) -> None:
    """Raise :class:`ConfigError` when the new run differs from the checkpoint's in a guarded
    key not in ``allowed``; log allowed differences and a learning-rate jump."""
    if not saved_inputs:
        log.warning("%s records no run inputs (an older checkpoint): the resume guard cannot check it", checkpoint)
        return
    differences = _differences(saved_inputs, current_inputs)
    refused = {k: v for k, v in differences.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: {v}" for k, v in refused.items())
        raise ConfigError(
            f"cannot resume {checkpoint} with a different configuration ({listed}). Its weights and "
            "optimizer state belong to the run it was saved from. Start a new output_dir, restore the "
            f"old values, or accept the change with checkpoint.allow_changes=[{','.join(refused)}]"
        )
    for key, text in differences.items():
        log.warning("resuming %s with a changed %s (allowed by checkpoint.allow_changes): %s", checkpoint, key, text)
    if differences and saved_total_steps is not None and all(k in saved_inputs for k in ("optim.lr", "optim.min_lr", "optim.warmup_fraction")):
        before = _schedule(saved_inputs, saved_total_steps).lr(step)
        after = _schedule(current_inputs, total_steps).lr(step)
        if abs(after - before) > 1e-12 * max(abs(before), 1e-30):
            log.warning(
                "the learning rate jumps from %.4g to %.4g at step %d: the schedule is now computed over "
                "%d steps (was %d)", before, after, step, total_steps, saved_total_steps,
            )
