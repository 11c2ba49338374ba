"""On-policy preference pairs: the rejected answer is the initial pivot's own mistake.

    python -m nemo_infifpo.demo.pairs --model models/hf/p0 \\
        --inputs world/data/pairs_train.jsonl world/data/pairs_heldout.jsonl \\
        --outputs data/pairs_train.jsonl data/pairs_heldout.jsonl --stats data/pairs.json

For every prompt the pivot p0 answers greedily; where that answer is wrong it becomes the
rejected response, and where p0 is right the world's synthetic near miss stays. This is the
paper's construction in miniature (y_l drawn from the pivot's own samples, y_w the best
response; here the checker is the reward model and the correct answer the best response):
pairs whose rejected side p0 already finds unlikely teach it little, so purely synthetic
mistakes barely move a pivot that ranks them correctly already.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "pivot_mistake_pairs"]

ON_POLICY = "pivot_greedy"  # the `corruption` of rows whose rejected answer is p0's own


@torch.no_grad()
def pivot_mistake_pairs(
    loaded: tuple[Any, Any, Any], records: list[dict[str, Any]], *, max_new_tokens: int, batch_size: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``records`` with ``rejected`` replaced by p0's wrong greedy answer where it has one.

    ``loaded`` is :func:`nemo_infifpo.demo.evaluate.load_model` of p0.
    """
    from nemo_infifpo.data.rows import rows_from_records
    from nemo_infifpo.demo.evaluate import greedy_decode
    from nemo_infifpo.demo.world import skill_of

    model, tokenizer, response = loaded
    rows = rows_from_records(records)
    prompts = [response.render_ids(row.prompt, add_generation_prompt=True) for row in rows]
    answers = greedy_decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    out: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = defaultdict(lambda: {"rows": 0, "pivot_correct": 0, "on_policy": 0})
    for record, answer in zip(records, answers, strict=True):
        stats = counts[skill_of(record["id"])]
        stats["rows"] += 1
        record = dict(record)
        if answer == record["chosen"]:
            stats["pivot_correct"] += 1
        elif answer:  # an empty answer is no response to prefer against: keep the near miss
            record["rejected"] = answer
            record["corruption"] = ON_POLICY
            stats["on_policy"] += 1
        out.append(record)
    return out, dict(counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the initial pivot p0 (HF directory)")
    parser.add_argument("--inputs", nargs="+", required=True, help="the world's pair files")
    parser.add_argument("--outputs", nargs="+", required=True, help="one output per input")
    parser.add_argument("--stats", required=True, help="JSON: per file and skill, how many rows are on-policy")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if len(args.inputs) != len(args.outputs):
        parser.error("--inputs and --outputs must have the same length")

    from nemo_infifpo.demo.evaluate import load_model
    from nemo_infifpo.demo.world import read_jsonl, write_jsonl

    torch.set_num_threads(1)  # one CPU slot per stage (see nemo_infifpo.demo.pipeline)
    loaded = load_model(args.model)
    report: dict[str, Any] = {}
    for source, target in zip(args.inputs, args.outputs, strict=True):
        records, stats = pivot_mistake_pairs(
            loaded, read_jsonl(source), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
        write_jsonl(Path(target), records)
        report[Path(target).name] = stats
        print(f"{target}: {json.dumps(stats, sort_keys=True)}")
    Path(args.stats).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
