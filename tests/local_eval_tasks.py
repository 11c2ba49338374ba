"""Small local lm-eval tasks (task YAML + JSONL, no download) and an independent reference
computation with plain transformers, shared by the evaluation tests and the Slurm pipeline test.

Two tasks, written into one ``include_path`` directory:

- ``tiny_echo`` (``generate_until``, exact match): prompt -> greedy continuation, cut at a newline;
- ``tiny_choice`` (``multiple_choice``, acc / acc_norm): question -> one of three answers by
  log-likelihood.

The reference side builds prompts with the tokenizer's chat template, generates greedily with
``model.generate`` and sums log-probs of each answer's tokens itself; it shares no code with
lm-eval.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import torch

GENERATE_TASK = "tiny_echo"
CHOICE_TASK = "tiny_choice"
MAX_GEN_TOKS = 6
STOP = "\n"

PROMPTS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Please write a short poem about the sea.",
    "Explain why the sky looks blue.",
    "def add(a, b):",
    "The pivot model learns from several sources.",
    "A preference row holds a prompt.",
    "Each source scores the preferred answer.",
)
QUESTIONS = (
    ("The capital of France is", ("Paris", "the sea", "eight legs")),
    ("A spider has", ("eight legs", "Paris", "a prompt")),
    ("The sky looks", ("blue", "dark and quiet", "red")),
    ("Short waves scatter", ("more", "less", "never")),
    ("A preference row holds", ("a prompt", "the stars", "a poem")),
    ("def add(a, b): return", ("a + b", "a - b", "Paris")),
    ("The sea at night is", ("dark and quiet", "blue", "short")),
    ("Each source has its own", ("tokenizer", "capital", "legs")),
)


def write_tasks(directory: Path, echo_rows: list[dict[str, str]], choice_rows: list[dict[str, Any]]) -> Path:
    """Write both tasks' YAML and JSONL into ``directory`` (an lm-eval ``include_path``)."""
    directory.mkdir(parents=True, exist_ok=True)
    echo_data = directory / "tiny_echo.jsonl"
    choice_data = directory / "tiny_choice.jsonl"
    echo_data.write_text("".join(json.dumps(r) + "\n" for r in echo_rows))
    choice_data.write_text("".join(json.dumps(r) + "\n" for r in choice_rows))
    (directory / "tiny_echo.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {GENERATE_TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {json.dumps(str(echo_data))}
            test_split: test
            output_type: generate_until
            doc_to_text: "{{{{prompt}}}}"
            doc_to_target: "{{{{answer}}}}"
            generation_kwargs:
              until: [{json.dumps(STOP)}]
              max_gen_toks: {MAX_GEN_TOKS}
              do_sample: false
            metric_list:
              - metric: exact_match
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 1.0
            """
        )
    )
    (directory / "tiny_choice.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: {CHOICE_TASK}
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {json.dumps(str(choice_data))}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: label
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
              - metric: acc_norm
                aggregation: mean
                higher_is_better: true
            metadata:
              version: 1.0
            """
        )
    )
    return directory


def choice_rows() -> list[dict[str, Any]]:
    return [{"question": q, "choices": list(c), "label": 0} for q, c in QUESTIONS]


class Reference:
    """Greedy generation and answer log-likelihoods of one HF checkpoint, with chat template."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def context(self, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    @torch.no_grad()
    def greedy(self, text: str) -> str:
        ids = self.tokenizer(self.context(text), add_special_tokens=False, return_tensors="pt").input_ids
        out = self.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_GEN_TOKS, do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        decoded = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        # Stop strings: the task's and the end-of-sequence token's text.
        for stop in (STOP, self.tokenizer.eos_token):
            decoded = decoded.split(stop)[0]
        return decoded

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> float:
        """log p(continuation | context): the tokens of context+continuation after those of context."""
        context_ids = self.tokenizer(context, add_special_tokens=False).input_ids
        whole_ids = self.tokenizer(context + continuation, add_special_tokens=False).input_ids
        assert whole_ids[: len(context_ids)] == context_ids, "context tokens must be a prefix"
        ids = torch.tensor([whole_ids])
        logprobs = torch.log_softmax(self.model(ids).logits[0].float(), dim=-1)
        return sum(logprobs[i - 1, whole_ids[i]].item() for i in range(len(context_ids), len(whole_ids)))

    def choice_scores(self, row: dict[str, Any]) -> list[float]:
        # The answer is the start of the assistant's turn: no separator after the generation prompt.
        context = self.context(row["question"])
        return [self.loglikelihood(context, choice) for choice in row["choices"]]


def expected_metrics(reference: Reference, echo_rows: list[dict[str, str]], choices: list[dict[str, Any]]) -> dict[str, float]:
    """exact_match of tiny_echo, acc and acc_norm of tiny_choice, computed by ``reference``."""
    exact = [reference.greedy(r["prompt"]) == r["answer"] for r in echo_rows]
    acc, acc_norm = [], []
    for row in choices:
        scores = reference.choice_scores(row)
        lengths = [len(c) for c in row["choices"]]  # acc_norm: per character of the answer
        acc.append(_argmax(scores) == row["label"])
        acc_norm.append(_argmax([s / n for s, n in zip(scores, lengths)]) == row["label"])
    return {
        "exact_match": sum(exact) / len(exact),
        "acc": sum(acc) / len(acc),
        "acc_norm": sum(acc_norm) / len(acc_norm),
    }


def _argmax(values: list[float]) -> int:
    best = max(range(len(values)), key=lambda i: values[i])
    assert all(math.isfinite(v) for v in values)
    return best
