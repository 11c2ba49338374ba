"""How a recipe sets up logging: one call at the top of its ``main``.

Single-process stages log at INFO. Stages that run as several ranks (``torchrun`` / ``srun``)
tag each line with the rank; rank 0 reports progress at INFO and the other ranks only speak
up for warnings and errors. Imports nothing heavy, so it runs before the slow imports.
"""

from __future__ import annotations

import logging
import os

__all__ = ["launch_rank", "setup_logging"]


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def setup_logging(*, ranks: bool = False) -> None:
    """Configure the root logger for a recipe; ``ranks``: the stage may run as several ranks."""
    if not ranks:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    rank = launch_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
