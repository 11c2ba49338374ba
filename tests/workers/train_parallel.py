"""Worker: end-to-end training runs at TP=2 and PP=2 (2 gloo ranks), one launch for many checks.

Usage: ``torchrun --nproc_per_node=2 train_parallel.py FIXTURE_JSON OUT_DIR``. Runs, in order:

1. ``tp2``: InfiFPO, TP=2, the whole toy set as one global batch (the same batch every step),
   6 steps.
2. ``pp2``: the same at PP=2 (6 micro-batches through the pipeline schedule).
3. ``tp2_padded`` / ``tp2_packed``: one step without / with ``data.pack_sequences=true``.
4. ``dpo``: ``loss.type=dpo`` (sums, no length norm), 2 steps; after step 1 the policy's
   sequence scores of step 2's batch are recomputed, so the test can hand them to TRL.
5. ``sft``: ``loss.type=sft``, 4 steps on the same batch.
6. Equivalence: the same 2 pairs per step as (DP=2, mbs=1), (TP=2: DP=1, mbs=2) and
   (PP=2: DP=1, mbs=1, 2 micro-batches), 2 steps each; final weights kept.

Rank 0 writes ``OUT_DIR/result.json`` (losses, parity, scores) and ``OUT_DIR/*.pt`` (weights).
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

ALL = len(tc.ROWS)


def run(fixture, out: Path, name: str, *, keep_step1: bool = False, callbacks=(), **sections):
    config = parse_config(tc.config_dict(fixture, out / name, **sections))
    captured = {}

    def capture(ctx):
        if keep_step1 and ctx.step == 1:
            captured["step1"] = tc.full_weights(ctx.model)

    result = train(config, callbacks=[capture, *callbacks])
    final = tc.full_weights(result.model)
    metrics = tc.read_metrics(out / name) if torch.distributed.get_rank() == 0 else []
    destroy_distributed()
    return {
        "losses": [r["loss"] for r in metrics],
        "records": metrics,
        "parity": result.parity_max_abs_diff,
        "step1_weights": captured.get("step1"),
        "final_weights": final,
    }


def main(fixture_path: str, out_dir: str) -> None:
    fixture = json.loads(Path(fixture_path).read_text())
    out = Path(out_dir)
    whole = {"global_batch_size": ALL, "micro_batch_size": 2}
    steady = {"shuffle": False}
    results = {}

    results["tp2"] = run(fixture, out, "tp2", model={**whole, "tensor_model_parallel_size": 2},
                         data=steady, trainer={"max_steps": 6})
    results["pp2"] = run(fixture, out, "pp2", model={**whole, "pipeline_model_parallel_size": 2},
                         data=steady, trainer={"max_steps": 6})
    # Packed vs padded: one step each. A large adam_eps makes the first AdamW update
    # proportional to the gradient (instead of ~lr * sign(g), which turns rounding-level
    # gradient differences into lr-sized weight differences), so weights compare tightly.
    smooth = {"adam_eps": 1.0, "lr": 1e-2}
    for name, packing in (("tp2_padded", {}), ("tp2_packed", {"pack_sequences": True, "pack_length": 256})):
        results[name] = run(fixture, out, name, keep_step1=True, model={**whole, "tensor_model_parallel_size": 2},
                            data={**steady, **packing}, trainer={"max_steps": 1}, optim=smooth)

    # DPO: after step 1, recompute the policy's scores of step 2's global batch.
    dpo_scores = {}

    def policy_scores(ctx):
        if ctx.step != 1:
            return
        from nemo_infifpo.engine.forward import compute_sequence_logprobs
        from nemo_infifpo.training.dataset import load_training_data

        data = load_training_data(dpo_config)
        rows = list(range(ALL))  # shuffle off, one global batch = every row
        pairs = data.pairs(rows)
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        length = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), length, dtype=torch.long)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s.input_ids)
            mask[k, s.response_start : len(s)] = True
        sums, _ = compute_sequence_logprobs(ctx.model.module, tokens, mask, micro_batch_size=4, vocab_size=ctx.model.vocab_size)
        dpo_scores["rows"] = rows
        dpo_scores["chosen"] = sums[:ALL].double().tolist()
        dpo_scores["rejected"] = sums[ALL:].double().tolist()

    dpo_sections = dict(model={**whole, "tensor_model_parallel_size": 2}, data=steady, trainer={"max_steps": 2},
                        loss={"type": "dpo", "beta": 0.1, "length_norm": False}, optim={"lr": 1e-3, "grad_clip": 0.0})
    dpo_config = parse_config(tc.config_dict(fixture, out / "dpo", **dpo_sections))
    results["dpo"] = run(fixture, out, "dpo", callbacks=[policy_scores], **dpo_sections)
    results["dpo"]["policy_step2"] = dpo_scores

    results["sft"] = run(fixture, out, "sft", model={**whole, "tensor_model_parallel_size": 2}, data=steady,
                         trainer={"max_steps": 4}, loss={"type": "sft"})

    pair2 = {"global_batch_size": 2, "micro_batch_size": 1}
    equivalence = {"trainer": {"max_steps": 2, "step0_parity_check": False}, "optim": smooth}
    results["dp2_mbs1"] = run(fixture, out, "dp2_mbs1", model=pair2, **equivalence)
    results["tp2_mbs2"] = run(fixture, out, "tp2_mbs2", model={**pair2, "micro_batch_size": 2, "tensor_model_parallel_size": 2},
                              **equivalence)
    results["pp2_2micro"] = run(fixture, out, "pp2_2micro", model={**pair2, "pipeline_model_parallel_size": 2}, **equivalence)

    if torch.distributed.get_rank() == 0:
        summary = {}
        for name, result in results.items():
            for kind in ("step1_weights", "final_weights"):
                if result.get(kind) is not None:
                    torch.save(result.pop(kind), out / f"{name}.{kind}.pt")
                else:
                    result.pop(kind, None)
            summary[name] = result
        (out / "result.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.distributed.init_process_group("gloo")  # kept across runs; init_distributed reuses it
    main(sys.argv[1], sys.argv[2])
