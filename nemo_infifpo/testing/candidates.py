"""Synthetic outputs of the generate and judge stages (no model involved), in the exact
on-disk format the stages write, for build_pairs tests and the streaming benchmark.

Texts are slices of a fixed pseudo-English corpus (words of 2-9 letters), so they compress
like text and cost nothing to make; scores are seeded Gaussian draws; a chosen fraction of
answers is truncated, empty or a duplicate of the prompt's first answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nemo_infifpo.generation import outputs
from nemo_infifpo.generation.prompts import prompts_fingerprint, read_prompt_rows

__all__ = ["write_synthetic_run"]

_CORPUS_CHARS = 1 << 22


def _corpus(seed: int) -> str:
    rng = random.Random(seed)
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(5000)]
    text: list[str] = []
    size = 0
    while size < _CORPUS_CHARS:
        word = rng.choice(words)
        text.append(word)
        size += len(word) + 1
    return " ".join(text)


def write_synthetic_run(
    root: str | Path,
    *,
    num_prompts: int,
    samples: Mapping[str, int],
    answer_chars: tuple[int, int] = (200, 4000),
    generation_shards: int = 1,
    judge_shards: int = 1,
    truncated: float = 0.05,
    empty: float = 0.01,
    duplicate: float = 0.01,
    unjudged: float = 0.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``root/prompts.jsonl``, ``root/gen/<model>/`` (one per entry of ``samples``: model
    name -> samples per prompt) and ``root/judge/``; return their paths. Memory holds one
    generation shard and the judge scores (a few bytes per answer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(seed)
    rng = random.Random(seed)
    prompts_path = root / "prompts.jsonl"
    with prompts_path.open("w", encoding="utf-8") as handle:
        for i in range(num_prompts):
            start = rng.randrange(len(corpus) - 600)
            handle.write(json.dumps({"id": f"q{i:07d}", "prompt": corpus[start:start + rng.randint(50, 600)] + "?",
                                     "source": "synthetic"}) + "\n")
    rows = read_prompt_rows(prompts_path).rows
    ids = [row.id for row in rows]
    generation_dirs: list[Path] = []
    digests = []
    judge_slices = outputs.shard_slices(len(ids), judge_shards)
    judge_parts: list[dict[str, list[Any]]] = [{name: [] for name in outputs.JUDGE_COLUMNS}
                                               for _ in range(judge_shards)]
    for model_index, (model, n) in enumerate(samples.items()):
        directory = root / "gen" / model
        directory.mkdir(parents=True, exist_ok=True)
        identity = outputs.StageIdentity("generate", {"model_name": model, "synthetic_seed": seed,
                                                      "prompts_fingerprint": prompts_fingerprint(rows, with_extra=False)},
                                         generation_shards)
        outputs.check_or_create_manifest(directory, identity, {"synthetic": True}, create=True)
        for shard, part in enumerate(outputs.shard_slices(len(ids), generation_shards)):
            columns: dict[str, list[Any]] = {name: [] for name in outputs.GENERATION_COLUMNS}
            for prompt_id in ids[part]:
                first = None
                for sample in range(n):
                    draw = rng.random()
                    if draw < empty:
                        text = ""
                    elif draw < empty + duplicate and first is not None:
                        text = first
                    else:
                        start = rng.randrange(len(corpus) - answer_chars[1])
                        text = corpus[start:start + rng.randint(*answer_chars)]
                    first = text if first is None else first
                    cut = rng.random() < truncated
                    columns["prompt_id"].append(prompt_id)
                    columns["sample_index"].append(sample)
                    columns["model"].append(model)
                    columns["text"].append(text)
                    columns["num_tokens"].append(max(1, len(text) // 4))
                    columns["finish_reason"].append("length" if cut else "stop")
                    columns["prompt_tokens"].append(64)
            table = outputs.record_table("generate", columns)
            outputs.write_shard(directory, shard, identity, table, num_prompts=len(ids[part]))
        outputs.refresh_manifest(directory)
        generation_dirs.append(directory)
        digests.append([model, identity.digest()])
        for shard, part in enumerate(judge_slices):
            for prompt_id in ids[part]:
                for sample in range(n):
                    if rng.random() < unjudged:
                        continue
                    judge_parts[shard]["prompt_id"].append(prompt_id)
                    judge_parts[shard]["model"].append(model)
                    judge_parts[shard]["sample_index"].append(sample)
                    judge_parts[shard]["score"].append(rng.gauss(model_index * 0.1, 1.0))
    judge_dir = root / "judge"
    judge_dir.mkdir(exist_ok=True)
    identity = outputs.StageIdentity("judge", {"prompts_fingerprint": prompts_fingerprint(rows, with_extra=True),
                                               "generations": digests, "judge": {"type": "synthetic", "seed": seed}},
                                     judge_shards)
    outputs.check_or_create_manifest(judge_dir, identity, {"synthetic": True}, create=True)
    order = {model: i for i, model in enumerate(samples)}
    for shard, part in enumerate(judge_parts):
        keys = sorted(range(len(part["prompt_id"])),
                      key=lambda i: (part["prompt_id"][i], order[part["model"][i]], part["sample_index"][i]))
        table = outputs.record_table("judge", {name: [part[name][i] for i in keys] for name in outputs.JUDGE_COLUMNS})
        outputs.write_shard(judge_dir, shard, identity, table, num_prompts=len(ids[judge_slices[shard]]))
    outputs.refresh_manifest(judge_dir)
    return {"prompts": prompts_path, "generation_dirs": generation_dirs, "judge_dir": judge_dir}
