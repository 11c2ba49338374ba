"""Worker (one process): what a resume does after damage and after config changes.

Usage: ``python train_crash.py FIXTURE_JSON OUT_DIR``. Scenarios, recorded in
``OUT_DIR/result.json``:

* ``fallback``: 2 steps with a checkpoint after each (reference weights). A byte of a weights
  file of the newest checkpoint is flipped; the rerun must skip it (naming the file), resume
  from step 1, retrain step 2 and end with the reference weights exactly. With every
  checkpoint damaged the next rerun is refused.
* ``guard``: a resume with another ``optim.lr`` is refused before anything is written
  (``config.yaml`` keeps the old value); with ``checkpoint.allow_changes`` and a longer
  schedule it trains on. A torn last line in ``metrics.jsonl`` (a crash mid-write) does not
  stop that resume.
* The process umask is 002: every file of the run must be group-readable and -writable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

import train_common as tc

from nemo_infifpo.engine.distributed import destroy_distributed
from nemo_infifpo.training.config import parse_config
from nemo_infifpo.training.loop import train


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def attempt(fixture, out_dir: Path, **sections) -> dict:
    config = parse_config(tc.config_dict(fixture, out_dir, **sections))
    collect = Collect()
    logging.getLogger("nemo_infifpo").addHandler(collect)
    try:
        result = train(config)
        weights = tc.full_weights(result.model)
        outcome = {"error": None, "message": "", "step": result.step}
    except Exception as error:  # recorded for the test to assert on
        weights = None
        outcome = {"error": type(error).__name__, "message": str(error)}
    finally:
        logging.getLogger("nemo_infifpo").removeHandler(collect)
        destroy_distributed()
    outcome["logged"] = collect.messages
    return outcome, weights


def max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def fallback(fixture, out: Path) -> dict:
    run = out / "fallback"
    sections = dict(trainer={"max_steps": 2}, checkpoint={"interval": 1, "keep_last": 3, "save_final": True})
    first, reference = attempt(fixture, run, **sections)
    newest = run / "checkpoints" / "step_0000002"
    victim = sorted((newest / "weights").rglob("*.distcp"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    second, weights = attempt(fixture, run, **sections)
    for step in ("step_0000001", "step_0000002"):
        for file in (run / "checkpoints" / step / "weights").rglob("*.distcp"):
            with open(file, "r+b") as handle:
                handle.truncate(max(file.stat().st_size // 2, 1))
    third, _ = attempt(fixture, run, **sections)
    return {
        "first": first, "second": second, "third": third, "victim": str(victim.relative_to(run)),
        "weights_diff": max_diff(reference, weights) if weights is not None else None,
        "steps_logged": [r["step"] for r in tc.read_metrics(run)],
    }


def guard(fixture, out: Path) -> dict:
    run = out / "guard"
    sections = dict(trainer={"max_steps": 2}, checkpoint={"interval": 0, "save_final": True})
    first, _ = attempt(fixture, run, **sections)
    config_before = (run / "config.yaml").read_text()
    changed, _ = attempt(fixture, run, optim={"lr": 5e-4}, **sections)
    config_after_refusal = (run / "config.yaml").read_text()
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 3, "loss": 0.69')  # a write cut short by a crash
    allowed, _ = attempt(
        fixture, run, optim={"lr": 5e-4}, trainer={"max_steps": 5},
        checkpoint={"interval": 0, "save_final": True, "allow_changes": ["optim.lr", "trainer.max_steps"]},
    )
    return {
        "first": first, "changed": changed, "allowed": allowed,
        "config_unchanged_by_refusal": config_before == config_after_refusal,
        "steps_logged": [r["step"] for r in tc.read_metrics(run)],
    }


def modes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in root.rglob("*") if p.is_file()}


def main(fixture_path: str, out_dir: str) -> None:
    os.umask(0o002)
    torch.manual_seed(0)
    fixture = json.loads(Path(fixture_path).read_text())
    out = Path(out_dir)
    result = {"fallback": fallback(fixture, out), "guard": guard(fixture, out)}
    result["modes"] = modes(out / "guard")
    result["run_dirs"] = {"fallback": str(out / "fallback"), "guard": str(out / "guard")}
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
