"""Import a Hugging Face model into this package's megatron-core model checkpoint.

    python recipes/import_hf.py hf_path=DIR output_path=DIR [dtype=bfloat16] [overwrite=true]

Runs as one process on the CPU (conversion needs no GPU). Tensors are read one at a time
from memory-mapped safetensors files, so peak memory is one copy of the model plus one
tensor. See configs/import_hf.yaml for the options.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("import_hf")


@hydra.main(config_path="../configs", config_name="import_hf", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.engine.distributed import read_launch_env
    from nemo_infifpo.models.conversion import import_hf_checkpoint

    if read_launch_env().world_size != 1:
        raise SystemExit("import_hf.py runs as a single process; launch it with plain python, not torchrun/srun")
    from nemo_infifpo.locking import OutputLock, OutputLockedError, sibling_lock_path

    init_distributed(1, 1, device="cpu")
    try:
        lock = OutputLock(sibling_lock_path(cfg.output_path), stage="import", output=cfg.output_path).acquire()
    except OutputLockedError as error:
        destroy_distributed()
        raise SystemExit(f"import refused: {error}") from None
    try:
        path = import_hf_checkpoint(
            cfg.hf_path,
            cfg.output_path,
            params_dtype=cfg.dtype,
            vocab_divisor=int(cfg.vocab_divisor),
            overwrite=bool(cfg.overwrite),
        )
    finally:
        lock.release()
        destroy_distributed()
    log.info("imported %s -> %s", cfg.hf_path, path)


# Saving must stay under this guard: megatron's checkpoint writer starts a
# multiprocessing.Manager whose child process re-imports __main__.
if __name__ == "__main__":
    main()
