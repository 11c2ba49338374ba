"""Worker: checkpoints, SIGTERM, resume (also at another layout), export of the final checkpoint.

Usage: ``torchrun --nproc_per_node=2 train_resume.py FIXTURE_JSON OUT_DIR``. In one launch:

1. ``straight``: TP=2, 6 steps (two epochs of 3 global batches, shuffled), final checkpoint.
2. ``interrupted``: the same run; after step 3 rank 0 alone sends itself SIGTERM. The run must
   finish step 3, save, and return normally on both ranks. Its output dir is then copied to
   ``other_layout``.
3. ``interrupted`` again: resumes from step 3 and runs to 6 at TP=2.
4. ``other_layout``: resumes the copy from step 3 at PP=2 and runs to 6.
5. The final checkpoint of (1) is exported to HF with nemo_infifpo.models' export path.

Rank 0 writes ``OUT_DIR/result.json`` and the final weights of each run as ``*.pt``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import train_common as tc

from nemo_infifpo.engine.distributed import destroy_distributed
from nemo_infifpo.training.config import parse_config
from nemo_infifpo.training.loop import train

SECTIONS = dict(
    model={"global_batch_size": 4, "micro_batch_size": 2},
    trainer={"max_steps": 6},
    checkpoint={"interval": 2, "keep_last": 2, "save_final": True},
    # adam_eps=1: updates proportional to the (momentum-averaged) gradient, so runs at another
    # layout agree to rounding, while a lost or mangled optimizer state would show at ~lr*|g|.
    optim={"warmup_fraction": 0.3, "lr": 1e-2, "adam_eps": 1.0},
)


def run(fixture, out_dir: Path, *, tp: int = 1, pp: int = 1, callbacks=()):
    sections = {**SECTIONS, "model": {**SECTIONS["model"], "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}}
    config = parse_config(tc.config_dict(fixture, out_dir, **sections))
    result = train(config, callbacks=callbacks)
    weights = tc.full_weights(result.model)
    destroy_distributed()
    return result, weights


def sigterm_after_step_3(ctx) -> None:
    if ctx.step == 3 and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGTERM)


def main(fixture_path: str, out_dir: str) -> None:
    fixture = json.loads(Path(fixture_path).read_text())
    out = Path(out_dir)
    rank0 = dist.get_rank() == 0
    summary: dict = {}
    weights: dict = {}

    straight, weights["straight"] = run(fixture, out / "straight", tp=2)
    summary["straight"] = {"step": straight.step, "checkpoint": str(straight.checkpoint)}

    interrupted, _ = run(fixture, out / "interrupted", tp=2, callbacks=[sigterm_after_step_3])
    summary["interrupted"] = {
        "step": interrupted.step,
        "stopped_by_signal": interrupted.stopped_by_signal,
        "checkpoint": str(interrupted.checkpoint),
        "checkpoints_after_stop": sorted(p.name for p in (out / "interrupted" / "checkpoints").iterdir()) if rank0 else [],
        "handler_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
    }
    if rank0:
        shutil.copytree(out / "interrupted", out / "other_layout")
    dist.barrier()

    resumed, weights["resumed"] = run(fixture, out / "interrupted", tp=2)
    summary["resumed"] = {
        "step": resumed.step,
        "parity": resumed.parity_max_abs_diff,
        # The checkpoint resumed from (step 3) is pruned by now: the model's HF assets must
        # come from a checkpoint that still exists, or later saves copy nothing.
        "assets_dir": str(resumed.model.loaded.assets_dir),
        "assets_dir_has_config": (resumed.model.loaded.assets_dir / "config.json").is_file(),
    }
    moved, weights["other_layout"] = run(fixture, out / "other_layout", pp=2)
    summary["other_layout"] = {"step": moved.step}

    # The final checkpoint through the models package's export (at TP=1 here).
    from nemo_infifpo.engine.distributed import init_distributed
    from nemo_infifpo.models.conversion import export_checkpoint_to_hf

    init_distributed(1, 1)
    export_checkpoint_to_hf(straight.checkpoint, out / "exported")
    destroy_distributed()

    if rank0:
        for name in ("straight", "interrupted", "other_layout"):
            summary[name]["losses"] = [r["loss"] for r in tc.read_metrics(out / name)]
            summary[name]["steps_logged"] = [r["step"] for r in tc.read_metrics(out / name)]
        summary["straight"]["checkpoints"] = sorted(p.name for p in (out / "straight" / "checkpoints").iterdir())
        summary["resumed"]["checkpoints_with_assets"] = {
            p.name: (p / "hf_assets" / "config.json").is_file()
            for p in (out / "interrupted" / "checkpoints").iterdir() if p.is_dir()
        }
        for name, tensors in weights.items():
            torch.save(tensors, out / f"{name}.pt")
        (out / "result.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dist.init_process_group("gloo")
    main(sys.argv[1], sys.argv[2])
