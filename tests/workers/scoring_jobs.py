"""Worker: run several scoring jobs one after the other in one process (or one torchrun launch).

Usage: ``python scoring_jobs.py JOBS.json`` or ``torchrun --nproc_per_node=2 scoring_jobs.py
JOBS.json``, where JOBS.json is a list of :class:`nemo_infifpo.scoring.ScoreConfig` fields.
One process for many jobs saves the interpreter + megatron start-up per job; it also checks
that megatron jobs of different layouts and hf jobs can share one process group.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from nemo_infifpo.scoring.backends import shutdown_distributed
from nemo_infifpo.scoring.job import ScoreConfig, run_scoring


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    jobs = json.loads(open(sys.argv[1], encoding="utf-8").read())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Owned here, so that tearing down megatron's groups between jobs of different
        # TP/PP layouts keeps the process group.
        torch.distributed.init_process_group("gloo")
    layout = None
    try:
        for job in jobs:
            config = ScoreConfig(**job)
            if config.backend == "megatron":
                wanted = (config.tensor_model_parallel_size, config.pipeline_model_parallel_size)
                if layout is not None and layout != wanted:
                    from nemo_infifpo.engine.distributed import destroy_distributed

                    destroy_distributed()
                layout = wanted
            run_scoring(config)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
