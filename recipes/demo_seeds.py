"""The demo over several seeds (``make demo-seeds``): one full demo per seed, then the table of
means and standard errors over seeds (nemo_infifpo/demo/seeds.py).

    python recipes/demo_seeds.py                                   # seeds 0 1 2 -> demo-output-seeds/seeds.md
    python recipes/demo_seeds.py --seeds 0 1 2 3 4 --output-dir /tmp/seeds -- preference.beta=1.0

Arguments after ``--`` are passed to every ``recipes/demo.py`` run. A seed whose run already
finished (its summary.json exists) is not run again; ``--rerun`` runs every seed anew.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", type=Path, default=Path("demo-output-seeds"))
    parser.add_argument("--config-name", default="demo")
    parser.add_argument("--rerun", action="store_true", help="run every seed, even one that finished before")
    parser.add_argument("overrides", nargs="*", help="recipes/demo.py overrides for every run (after --)")
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has duplicates: {args.seeds}")

    from nemo_infifpo.demo.report import label_map
    from nemo_infifpo.demo.seeds import write_seed_table

    output_dir = args.output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for seed in args.seeds:
        run_dir = output_dir / f"seed-{seed}"
        summary = run_dir / "summary.json"
        if summary.is_file() and not args.rerun:
            print(f"seed {seed}: finished before ({summary})", flush=True)
        else:
            command = [sys.executable, str(REPO / "recipes" / "demo.py"), "--config-name", args.config_name,
                       f"seed={seed}", f"output_dir={run_dir}", "overwrite=true", *args.overrides]
            print(f"seed {seed}: {' '.join(command)}", flush=True)
            if subprocess.run(command, cwd=REPO, env=os.environ).returncode != 0:
                print(f"seed {seed} failed: see {run_dir / 'logs'}", file=sys.stderr)
                return 1
        summaries.append(summary)
    table = write_seed_table(summaries, output_dir, label_map(json.loads(summaries[0].read_text())))
    print(f"{table.read_text()}\ntable: {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())  # every stage runs offline: nemo_infifpo.demo.pipeline.stage_env
