"""Train the pivot with InfiFPO (or DPO / IPO / SFT) on megatron-core (Hydra app).

    torchrun --nproc_per_node=8 recipes/train_infifpo.py --config-name infifpo_phi4 \\
        model.path=/ckpt/phi4-sft data.path=/data/scored.parquet output_dir=/runs/infifpo
    python recipes/train_infifpo.py --config-name infifpo_tiny model.path=... data.path=...

The configuration is validated (unknown keys, types, allowed values) before any process
group or model is set up; the work itself is :func:`nemo_infifpo.training.loop.train`.
Rerunning with the same ``output_dir`` resumes from its latest checkpoint. SIGTERM/SIGUSR1
finish the current step, save a checkpoint and exit 0.
"""

from __future__ import annotations

import os
import sys

# Before anything slow: a SIGTERM/SIGUSR1 during start-up (imports, model load, step-0 check)
# is recorded and ends the run cleanly instead of killing the ranks (Slurm then requeues).
from nemo_infifpo.training.signals import StopSignals

STOP_SIGNALS = StopSignals().__enter__() if __name__ == "__main__" else None

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from nemo_infifpo.logs import setup_logging  # noqa: E402


@hydra.main(config_path="../configs", config_name="infifpo_phi4", version_base=None)
def main(cfg: DictConfig) -> None:
    setup_logging(ranks=True)
    from nemo_infifpo.training.config import ConfigError, parse_config

    try:
        config = parse_config(cfg)
    except ConfigError as error:
        # A configuration mistake: say which key, without a traceback through Hydra.
        print(f"configuration error: {error}", file=sys.stderr)
        sys.exit(2)
    from nemo_infifpo.data.errors import exit_on_input_error
    from nemo_infifpo.locking import OutputLockedError
    from nemo_infifpo.training.checkpoint import CheckpointCorruptError
    from nemo_infifpo.training.dataset import FingerprintMismatchError
    from nemo_infifpo.training.loop import train
    from nemo_infifpo.training.parity import Step0ParityError

    # Bad data or templates (too many invalid rows, another tokenizer than scoring's, a step-0
    # mismatch): "error: train: <message>", exit 1, no traceback.
    with exit_on_input_error(FingerprintMismatchError, Step0ParityError, stage="train"):
        try:
            train(config, signals=STOP_SIGNALS)
        except (ConfigError, OutputLockedError, CheckpointCorruptError) as error:
            # Refusals that need a person (a changed config on resume, a second run, damaged
            # checkpoints): one clear message, exit 2.
            print(f"training refused: {error}", file=sys.stderr)
            sys.exit(2)


if __name__ == "__main__":  # required: checkpoint saving re-imports __main__ in a helper process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
