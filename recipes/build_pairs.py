"""Judged candidates -> SFT rows and preference pairs (Hydra app; see configs/build_pairs.yaml).

    python recipes/build_pairs.py data.path=prompts.jsonl generation_dirs=[gen/pivot,gen/qwen] \
        judge_dir=judge output_dir=pairs

The work itself is :func:`nemo_infifpo.generation.build.build_pairs`.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="build_pairs", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    from nemo_infifpo.data.errors import exit_on_input_error
    from nemo_infifpo.generation.build import BuildPairsConfig, build_pairs
    from nemo_infifpo.generation.outputs import OutputMismatchError
    from nemo_infifpo.locking import OutputLockedError

    with exit_on_input_error(OutputMismatchError, OutputLockedError, stage="build_pairs"):
        build_pairs(BuildPairsConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
