"""Choose the demo's training settings on the validation prompts (nemo_infifpo/demo/sweep.py).

    python recipes/demo_sweep.py                                  # -> demo-output-sweep/sweep.md
    python recipes/demo_sweep.py --lr 1e-4 3e-4 --beta 0.5 -- world.prompts_train_per_skill=256

Arguments after ``--`` are overrides of configs/demo.yaml (the demo's own keys). Runs whose
evaluation exists are not run again (delete the output directory to start over).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from nemo_infifpo.demo.sweep import SweepGrid

    defaults = SweepGrid()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output-sweep"))
    parser.add_argument("--config-name", default="demo")
    parser.add_argument("--sft-lr", type=float, nargs="*", default=list(defaults.sft_lr))
    parser.add_argument("--sft-steps", type=int, nargs="*", default=list(defaults.sft_steps))
    parser.add_argument("--lr", type=float, nargs="*", default=list(defaults.lr), help="preference learning rates (none: no preference grid)")
    parser.add_argument("--beta", type=float, nargs="*", default=list(defaults.beta))
    parser.add_argument("overrides", nargs="*", help="configs/demo.yaml overrides (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)

    from hydra import compose, initialize_config_dir

    from nemo_infifpo.demo.config import load_demo_config
    from nemo_infifpo.demo.pipeline import StageFailed
    from nemo_infifpo.demo.sweep import run_sweep

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        raw = compose(config_name=args.config_name, overrides=args.overrides)
    try:
        config = load_demo_config(raw)
    except Exception as error:  # omegaconf validation errors: name the key
        print(f"configuration error: {error}", file=sys.stderr)
        return 2
    grid = SweepGrid(tuple(args.sft_lr), tuple(args.sft_steps), tuple(args.lr), tuple(args.beta))
    try:
        table = run_sweep(config, grid, args.output_dir, config_name=args.config_name)
    except StageFailed:
        return 1
    print(f"{table.read_text()}\ntable: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # every stage runs offline: nemo_infifpo.demo.pipeline.stage_env
