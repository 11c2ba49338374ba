"""Score every candidate answer of every model (Hydra app; see configs/judge.yaml).

    python recipes/judge.py data.path=prompts.jsonl generation_dirs=[gen/pivot,gen/qwen] \
        judge.type=reward_model judge.model_path=/models/Skywork-Reward output_dir=judge
    torchrun --nproc_per_node=8 recipes/judge.py ...          (ranks share the reward model's batches)

The work itself is :func:`nemo_infifpo.generation.judging.run_judge`.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="judge", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(ranks=True)
    import torch.distributed as dist

    from nemo_infifpo.data.errors import exit_on_input_error
    from nemo_infifpo.generation.judging import JudgeConfig, run_judge
    from nemo_infifpo.generation.outputs import OutputMismatchError
    from nemo_infifpo.locking import OutputLockedError

    with exit_on_input_error(OutputMismatchError, OutputLockedError, stage="judge"):
        try:
            run_judge(JudgeConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
