"""Worker (one process): runs that must stop, and how.

Usage: ``python train_failures.py FIXTURE_JSON OUT_DIR``. Scenarios, each recorded in
``OUT_DIR/result.json`` as the exception type and message (or "no error"):

* ``wrong_template``: the scored set was scored with the pivot's own chat template; training
  is configured with the built-in ``plain`` template and the fingerprint check off, so the
  step-0 parity check must stop the run.
* ``fingerprint``: the same with the fingerprint check on: stopped before any model is built.
* ``nan``: after step 1 (checkpointed) a weight is set to NaN; step 2 must stop with a
  non-finite error before the update, leaving ``latest`` at step 1 and no partial checkpoint.
* ``bf16_on_cpu``: ``model.precision=bf16`` on CPU is refused at launch.
* ``broken_packing``: packed training with a packing bug injected (every packed sequence
  also attends to the sequences before it in its bin): step-0 parity runs the training
  forward, so it must stop the run. ``packing_ok`` is the same run without the bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import train_common as tc

from nemo_infifpo.engine.distributed import destroy_distributed
from nemo_infifpo.training.config import parse_config
from nemo_infifpo.training.loop import train


def attempt(fixture, out_dir: Path, callbacks=(), **sections) -> dict:
    config = parse_config(tc.config_dict(fixture, out_dir, **sections))
    try:
        train(config, callbacks=callbacks)
        outcome = {"error": None, "message": "no error"}
    except Exception as error:  # recorded for the test to assert on
        outcome = {"error": type(error).__name__, "message": str(error)}
    destroy_distributed()
    return outcome


def poison_after_step_1(ctx) -> None:
    if ctx.step == 1:
        with torch.no_grad():
            next(ctx.model.module.parameters()).view(-1)[0] = float("nan")


def leaky_packing(original):
    """pack_micro_batches with a plain causal mask over the whole bin: sequences see each other."""
    def pack(*args, **kwargs):
        batches = original(*args, **kwargs)
        for batch in batches:
            s = batch.attention_mask.shape[-1]
            batch.attention_mask = torch.ones(s, s, dtype=torch.bool).triu(1).view(1, 1, s, s)
        return batches
    return pack


def main(fixture_path: str, out_dir: str) -> None:
    fixture = json.loads(Path(fixture_path).read_text())
    out = Path(out_dir)
    result = {
        "wrong_template": attempt(fixture, out / "wrong_template", tokenizer={"chat_template": "plain"},
                                  data={"check_fingerprint": False}),
        "fingerprint": attempt(fixture, out / "fingerprint", tokenizer={"chat_template": "plain"}),
        "nan": attempt(fixture, out / "nan", callbacks=[poison_after_step_1], trainer={"max_steps": 3},
                       checkpoint={"interval": 1}),
        "bf16_on_cpu": attempt(fixture, out / "bf16", model={"precision": "bf16"}),
        "packing_ok": attempt(fixture, out / "packing_ok", data={"pack_sequences": True}, trainer={"max_steps": 1}),
    }
    import nemo_infifpo.training.loop as loop

    original = loop.pack_micro_batches
    loop.pack_micro_batches = leaky_packing(original)
    try:
        result["broken_packing"] = attempt(fixture, out / "broken_packing", data={"pack_sequences": True},
                                           trainer={"max_steps": 1})
    finally:
        loop.pack_micro_batches = original
    checkpoints = out / "nan" / "checkpoints"
    result["nan"]["checkpoints"] = sorted(p.name for p in checkpoints.iterdir()) if checkpoints.is_dir() else []
    result["nan"]["latest"] = (checkpoints / "latest").read_text().strip() if (checkpoints / "latest").is_file() else None
    result["nan"]["steps_logged"] = [r["step"] for r in tc.read_metrics(out / "nan")]
    (out / "result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
