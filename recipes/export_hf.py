"""Export a model checkpoint (any TP/PP it was saved at) to a Hugging Face directory.

    python recipes/export_hf.py checkpoint_path=DIR output_path=DIR [max_shard_size=5GB]
    torchrun --nproc_per_node=4 recipes/export_hf.py ... tensor_model_parallel_size=2 \
        pipeline_model_parallel_size=2        # spread the model over processes

The output loads with ``AutoModelForCausalLM.from_pretrained``. ``checkpoint_path`` may also
be an HF directory (a re-shard/re-dtype round trip). See configs/export_hf.yaml.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

log = logging.getLogger("export_hf")


@hydra.main(config_path="../configs", config_name="export_hf", version_base=None)
def main(cfg: DictConfig) -> None:
    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.models.conversion import export_checkpoint_to_hf

    info = init_distributed(
        int(cfg.tensor_model_parallel_size), int(cfg.pipeline_model_parallel_size), device=cfg.device
    )
    try:
        path = export_checkpoint_to_hf(
            cfg.checkpoint_path,
            cfg.output_path,
            max_shard_size=cfg.max_shard_size,
            dtype=cfg.dtype,
            overwrite=bool(cfg.overwrite),
            device=info.device,
        )
    finally:
        destroy_distributed()
    if info.rank == 0:
        log.info("exported %s -> %s", cfg.checkpoint_path, path)


if __name__ == "__main__":
    main()
