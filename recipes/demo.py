"""The offline demo: the paper's recipe in a tiny world, on CPU (``make demo``).

    python recipes/demo.py                              # configs/demo.yaml -> demo-output/
    python recipes/demo.py --config-name demo_ci        # the reduced configuration CI runs
    python recipes/demo.py seed=1 output_dir=/tmp/demo  # any key of configs/demo.yaml

Makes two specialist sources and a weak pivot (different families, tokenizers and chat
templates), then runs the recipe's stages as subprocesses of their entry points -- generate,
judge, build pairs, SFT, export, scoring, merge, InfiFPO and DPO under torchrun, export,
lm-eval evaluation -- and writes ``report.md``, ``summary.json`` and plots into ``output_dir``.
See nemo_infifpo/demo/.
"""

from __future__ import annotations

import logging
import os
import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../configs", config_name="demo", version_base=None)
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    from hydra.core.hydra_config import HydraConfig

    from nemo_infifpo.demo.config import load_demo_config
    from nemo_infifpo.demo.pipeline import StageFailed, run_demo

    try:
        import matplotlib  # noqa: F401  (checked first: the report's plots need it)
    except ImportError:
        print("the demo's report needs matplotlib: pip install matplotlib", file=sys.stderr)
        sys.exit(2)
    try:
        config = load_demo_config(cfg)
    except Exception as error:  # omegaconf validation errors: name the key, no Hydra traceback
        print(f"configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        report = run_demo(config, config_name=HydraConfig.get().job.config_name or "demo")
    except StageFailed:
        sys.exit(1)  # run_demo logged the failing stage and its log tail
    print(f"\nreport: {report}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
