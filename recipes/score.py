"""Score one model on the preference data (Hydra app; see configs/score.yaml).

Runs single-process with ``python recipes/score.py key=value ...`` and multi-rank under
``torchrun`` or ``srun``; the work itself is :func:`nemo_infifpo.scoring.run_scoring`.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="score", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(ranks=True)
    from nemo_infifpo.data.errors import exit_on_input_error
    from nemo_infifpo.scoring.backends import shutdown_distributed
    from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
    from nemo_infifpo.scoring.manifest import ScoringMismatchError

    # Bad options, data, templates or paths end with one message naming them, no traceback.
    with exit_on_input_error(ScoringMismatchError, stage="score"):
        config = ScoreConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        try:
            run_scoring(config)
        finally:
            shutdown_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
