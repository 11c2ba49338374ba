"""One model answers every prompt ``sampling.n`` times (Hydra app; see configs/generate.yaml).

    python recipes/generate.py model.path=/models/phi-4 data.path=prompts.jsonl output_dir=gen/pivot

The work itself is :func:`nemo_infifpo.generation.generate.run_generation`.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="generate", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    from nemo_infifpo.data.errors import exit_on_input_error
    from nemo_infifpo.generation.generate import GenerateConfig, run_generation
    from nemo_infifpo.generation.outputs import OutputMismatchError
    from nemo_infifpo.locking import OutputLockedError

    # Bad options, prompts, templates or paths end with one message naming them, no traceback.
    with exit_on_input_error(OutputMismatchError, OutputLockedError, stage="generate"):
        run_generation(GenerateConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True)))  # type: ignore[arg-type]


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
