"""Evaluate Hugging Face checkpoints with lm-evaluation-harness and compare them in one table
(Hydra app; see configs/evaluate.yaml).

    python recipes/evaluate.py models='[{name: p0, path: /models/phi-4}, {name: fused, path: /runs/x/hf}]' \
        output_dir=/runs/x/eval
    python recipes/evaluate.py model.path=DIR model.name=fused tasks=[gsm8k_cot] limit=50 output_dir=DIR

Writes ``<output_dir>/<model>/results.json`` per model and ``<output_dir>/summary.{md,json}``;
a rerun skips models whose results exist for the same settings. The work itself is
:func:`nemo_infifpo.evaluation.run.run_evaluation`.
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from nemo_infifpo.logs import setup_logging


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging()
    from nemo_infifpo.evaluation.config import ConfigError, parse_eval_config

    try:
        config = parse_eval_config(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
        from nemo_infifpo.evaluation.run import run_evaluation

        report = run_evaluation(config)
    except ConfigError as error:
        # A configuration mistake: say which key, without a traceback through Hydra.
        print(f"configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"evaluated: {', '.join(report.evaluated) or '-'}; skipped (results exist): {', '.join(report.skipped) or '-'}")
    print(f"summary: {report.output_dir / 'summary.md'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
