"""Worker: ``recipes/score.py`` with every hf batch slowed down, so a test can kill the job
between two shards. Usage: ``python scoring_slow.py SECONDS_PER_BATCH key=value ...``."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path

from nemo_infifpo.scoring import backends

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    delay = float(sys.argv[1])
    original = backends.HFBackend.score

    def slow_score(self, tokens, response_mask):  # type: ignore[no-untyped-def]
        time.sleep(delay)
        return original(self, tokens, response_mask)

    backends.HFBackend.score = slow_score  # type: ignore[method-assign]
    recipe = REPO / "recipes" / "score.py"
    sys.argv = [str(recipe), *sys.argv[2:]]
    runpy.run_path(str(recipe), run_name="__main__")


if __name__ == "__main__":
    main()
