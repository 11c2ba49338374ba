"""The recipes' one logging set-up: single-process at INFO, multi-rank tagged by rank."""

from __future__ import annotations

import subprocess
import sys

import pytest

_SHOW = (
    "import logging; from nemo_infifpo.logs import setup_logging; setup_logging(ranks={ranks}); "
    "root = logging.getLogger(); print(logging.getLevelName(root.level), root.handlers[0].formatter._fmt)"
)


@pytest.mark.parametrize(
    ("ranks", "env", "expected"),
    [
        (False, {"RANK": "3"}, "INFO %(asctime)s %(levelname)s %(name)s: %(message)s"),
        (True, {}, "INFO %(asctime)s [rank 0] %(levelname)s %(name)s: %(message)s"),
        (True, {"RANK": "2"}, "WARNING %(asctime)s [rank 2] %(levelname)s %(name)s: %(message)s"),
        (True, {"SLURM_PROCID": "5"}, "WARNING %(asctime)s [rank 5] %(levelname)s %(name)s: %(message)s"),
    ],
)
def test_setup_logging_levels_per_rank(ranks: bool, env: dict[str, str], expected: str) -> None:
    clean = {"PATH": "/usr/bin:/bin", **env}
    out = subprocess.run([sys.executable, "-c", _SHOW.format(ranks=ranks)], env=clean, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == expected
