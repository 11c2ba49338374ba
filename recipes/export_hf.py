"""Export a model checkpoint (any TP/PP it was saved at) to a Hugging Face directory.

    python recipes/export_hf.py checkpoint_path=DIR output_path=DIR [max_shard_size=5GB]
    torchrun --nproc_per_node=4 recipes/export_hf.py ... tensor_model_parallel_size=2 \
        pipeline_model_parallel_size=2        # spread the model over processes

The output loads with ``AutoModelForCausalLM.from_pretrained``. ``checkpoint_path`` may also
be an HF directory (a re-shard/re-dtype round trip). See configs/export_hf.yaml.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

log = logging.getLogger("export_hf")


@hydra.main(config_path="../configs", config_name="export_hf", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.locking import OutputLockedError, lock_on_rank0, sibling_lock_path
    from nemo_infifpo.models.conversion import export_checkpoint_to_hf
    from nemo_infifpo.training.checkpoint import CHECKSUMS_FILE, verify_checkpoint

    info = init_distributed(
        int(cfg.tensor_model_parallel_size), int(cfg.pipeline_model_parallel_size), device=cfg.device
    )
    lock = None
    try:
        # A damaged training checkpoint must not become a plausible-looking HF model.
        problems = verify_checkpoint(cfg.checkpoint_path) if (Path(cfg.checkpoint_path) / CHECKSUMS_FILE).is_file() else []
        if problems:
            raise _Refused(f"{cfg.checkpoint_path} is damaged: {'; '.join(problems[:5])}")
        try:
            lock = lock_on_rank0(sibling_lock_path(cfg.output_path), stage="export", output=cfg.output_path)
        except OutputLockedError as error:
            raise _Refused(str(error)) from None
        path = export_checkpoint_to_hf(
            cfg.checkpoint_path,
            cfg.output_path,
            max_shard_size=cfg.max_shard_size,
            dtype=cfg.dtype,
            overwrite=bool(cfg.overwrite),
            device=info.device,
        )
    except _Refused as error:
        print(f"export refused: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        if lock is not None:
            lock.release()
        destroy_distributed()
    if info.rank == 0:
        log.info("exported %s -> %s", cfg.checkpoint_path, path)


class _Refused(RuntimeError):
    """A reason to stop that needs a person, not a traceback."""


if __name__ == "__main__":
    main()
