"""Evaluate one exported Hugging Face checkpoint on the held-out pairs, with plain transformers.

    python -m nemo_infifpo.demo.evaluate --model DIR --name NAME --data pairs_heldout.jsonl \\
        --output eval/NAME.json

Two numbers per skill:

- **preference accuracy**: does the model give the chosen response a higher *length-normalised*
  log-prob (mean over its own response tokens, end-of-turn marker included) than the rejected
  one? The response tokens are those of :class:`~nemo_infifpo.data.templates.ResponseTokenizer`,
  the definition scoring and training use. Ties count as wrong.
- **exact match**: greedy decoding from the templated prompt until the end-of-turn token; the
  decoded text (special tokens dropped, whitespace stripped) must equal the correct answer.

The model is loaded with ``AutoModelForCausalLM.from_pretrained`` from the exported directory:
what is measured is the checkpoint a user would download, not the training process's weights.
Prompts are batched only with prompts of the same token length, so no padding (and no
padding-dependent numerics) enters the greedy decode.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

__all__ = ["evaluate_model", "greedy_decode", "load_model", "main"]


def _response_logprob_means(model: Any, sequences: list[tuple[list[int], int]], batch_size: int) -> list[float]:
    """Mean log-prob of ``ids[start:]`` given the preceding tokens, per (ids, start)."""
    means: list[float] = []
    for first in range(0, len(sequences), batch_size):
        chunk = sequences[first : first + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        # Right padding: positions of real tokens are unchanged, and padded positions are
        # masked out of attention and never scored.
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, (ids, _) in enumerate(chunk):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        logits = model(input_ids=input_ids, attention_mask=attention).logits.float()
        logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        for i, (ids, start) in enumerate(chunk):
            # Token t is predicted at position t - 1.
            response = logps[i, start - 1 : len(ids) - 1].double()
            means.append(float(response.mean()))
    return means


def greedy_decode(model: Any, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy continuations of token-id prompts, up to the end-of-turn (eos) token, decoded
    without special tokens and stripped."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(prompts):
        by_length[len(ids)].append(index)
    outputs: list[str] = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for length in sorted(by_length):
        indices = by_length[length]
        for first in range(0, len(indices), batch_size):
            chunk = indices[first : first + batch_size]
            input_ids = torch.tensor([prompts[i] for i in chunk])
            generated = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
            for row, index in enumerate(chunk):
                new = generated[row, length:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                outputs[index] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return outputs


def load_model(model_dir: str | Path) -> tuple[Any, Any, Any]:
    """(model, tokenizer, ResponseTokenizer) of an HF directory, float32, eval mode."""
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tokenizer, ResponseTokenizer(tokenizer)


@torch.no_grad()
def evaluate_model(
    model_dir: str | Path,
    records: list[dict[str, Any]],
    *,
    name: str,
    max_new_tokens: int = 10,
    batch_size: int = 64,
    examples_per_skill: int = 3,
) -> dict[str, Any]:
    """Per-skill preference accuracy and greedy exact match of the HF model in ``model_dir``."""
    from nemo_infifpo.data.rows import rows_from_records
    from nemo_infifpo.demo.world import skill_of

    model, tokenizer, response = load_model(model_dir)
    rows = rows_from_records(records)
    pairs = [response.encode_pair(row) for row in rows]

    sequences = [(p.chosen.input_ids, p.chosen.response_start) for p in pairs]
    sequences += [(p.rejected.input_ids, p.rejected.response_start) for p in pairs]
    means = _response_logprob_means(model, sequences, batch_size)
    chosen, rejected = means[: len(pairs)], means[len(pairs) :]

    prompts = [response.render_ids(row.prompt, add_generation_prompt=True) for row in rows]
    generations = greedy_decode(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)

    per_skill: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for i, record in enumerate(records):
        skill = skill_of(record["id"])
        stats = per_skill[skill]
        stats["preferred"].append(chosen[i] > rejected[i])
        stats["margin"].append(chosen[i] - rejected[i])
        stats["chosen_logp"].append(chosen[i])
        stats["exact"].append(generations[i] == record["chosen"])
        if len(stats["examples"]) < examples_per_skill:
            stats["examples"].append({"prompt": record["prompt"], "answer": record["chosen"], "output": generations[i]})

    skills: dict[str, Any] = {}
    for skill, stats in per_skill.items():
        n = len(stats["exact"])
        skills[skill] = {
            "n": n,
            "exact_match": sum(stats["exact"]) / n,
            "preference_accuracy": sum(stats["preferred"]) / n,
            "mean_margin": sum(stats["margin"]) / n,
            "mean_chosen_logp": sum(stats["chosen_logp"]) / n,
            "examples": stats["examples"],
        }
    n_all = len(records)
    overall = {
        "n": n_all,
        "exact_match": sum(s["exact_match"] * s["n"] for s in skills.values()) / n_all,
        "preference_accuracy": sum(s["preference_accuracy"] * s["n"] for s in skills.values()) / n_all,
    }
    for value in (*overall.values(), *(v for s in skills.values() for k, v in s.items() if k != "examples")):
        if not math.isfinite(float(value)):
            raise ValueError(f"{name}: non-finite evaluation result {value!r}")
    return {"name": name, "path": str(model_dir), "skills": skills, "overall": overall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="exported Hugging Face directory")
    parser.add_argument("--name", required=True)
    parser.add_argument("--data", required=True, help="held-out pairs (JSONL with ids <skill>/...)")
    parser.add_argument("--output", required=True, help="JSON result file")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=3, help="generations kept per skill")
    args = parser.parse_args(argv)

    from nemo_infifpo.demo.world import read_jsonl

    torch.set_num_threads(1)  # one CPU slot per stage (see nemo_infifpo.demo.pipeline)
    result = evaluate_model(
        args.model, read_jsonl(args.data), name=args.name, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, examples_per_skill=args.examples,
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    summary = ", ".join(
        f"{skill}: exact {s['exact_match']:.3f} pref {s['preference_accuracy']:.3f}" for skill, s in sorted(result["skills"].items())
    )
    print(f"{args.name}: {summary}")


if __name__ == "__main__":
    main()
