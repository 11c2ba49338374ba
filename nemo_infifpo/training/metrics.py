"""Per-step metrics: ``metrics.jsonl`` (always), TensorBoard, W&B, a progress bar; and MFU.

Only global rank 0 writes. ``metrics.jsonl`` holds one JSON object per completed step with at
least ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``step_time_s`` and, for
preference losses, ``reward_chosen``, ``reward_rejected`` (both beta-scaled), ``margin``,
``accuracy`` and the fusion diagnostics (``fusion/clipped_fraction``,
``fusion/selected/<candidate>`` for max_margin, ``fusion/weight/<candidate>``); ``mfu`` on GPU.
``tokens`` (and ``tokens_per_s``) count every token of every sequence of the global batch,
prompts included, padding excluded.
Step 1's loss is that of the first global batch at the initial weights (the update follows
the forward pass that measured it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from nemo_infifpo.atomic import write_text_atomic
from nemo_infifpo.training.config import LoggingConfig

__all__ = ["MetricsLogger", "peak_flops_per_second", "training_flops"]

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 tensor-core peak per GPU (no sparsity), by device-name fragment.
_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "B200": 2250e12}


def peak_flops_per_second(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of ``device``, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in _PEAK_BF16.items() if key in name), None)


def training_flops(arch: Any, sequence_lengths: list[int], vocab_size: int | None = None) -> float:
    """Model FLOPs of one forward + backward over sequences of the given lengths.

    Matrix multiplies: 2 FLOPs per weight per token forward, 3x for forward + backward; causal
    attention adds ``QK^T`` and ``AV`` over on average ``(s + 1) / 2`` keys. Activation
    recomputation is not counted (it is overhead, not model FLOPs, in MFU).
    """
    h, layers, heads, groups, d = arch.hidden_size, arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.head_dim
    qkv = h * (heads + 2 * groups) * d
    proj = heads * d * h
    mlp = 3 * h * arch.ffn_hidden_size  # gate, up, down (SwiGLU)
    matmul_weights = layers * (qkv + proj + mlp) + (vocab_size or arch.vocab_size) * h
    flops = 0.0
    for s in sequence_lengths:
        flops += 2 * matmul_weights * s
        flops += 2 * 2 * layers * heads * d * s * (s + 1) / 2
    return 3 * flops


class MetricsLogger:
    """Writes step records on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        output_dir: str | Path,
        config: LoggingConfig,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        run_config: dict[str, Any],
    ) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self._file = self.path.open("a", encoding="utf-8")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                log.warning("logging.tensorboard=true but tensorboard is not installed; skipping it")
        if config.wandb:
            import wandb  # an explicit request: fail loudly if missing

            self._wandb = wandb.init(
                project=config.wandb_project, name=config.wandb_name, config=run_config, dir=str(output_dir), resume="allow"
            )
        if config.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run repeats them from its checkpoint)
        and repair a torn end: a node crash or a full disk can leave a partial or NUL-padded
        last line, which is dropped with a warning (its step is repeated as well)."""
        if not self.path.is_file():
            return
        raw = self.path.read_bytes()
        lines = raw.decode("utf-8", errors="replace").split("\n")
        kept: list[str] = []
        for number, line in enumerate(lines, start=1):
            text = line.replace("\x00", "").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                if any(rest.replace("\x00", "").strip() for rest in lines[number:]):
                    raise ValueError(
                        f"{self.path}, line {number}: not a metrics record ({error}); only the last "
                        "line can be torn by a crash. Move the file aside to start a new one."
                    ) from None
                log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", self.path, len(line))
                continue
            if record.get("step", 0) <= step:
                kept.append(text)
        repaired = "".join(line + "\n" for line in kept)
        if repaired.encode("utf-8") != raw:
            write_text_atomic(self.path, repaired)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(f"train/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"train/{k}": v for k, v in scalars.items()}, step=step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._bar is not None:
            self._bar.close()
