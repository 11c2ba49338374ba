"""Shared by the training tests and their workers: a tiny pivot, a scored toy set, configs.

Importable from tests (``from workers.train_common import ...``) and from worker scripts
(``import train_common``; their directory is on ``sys.path``).

The scored set's p0 scores are computed here with plain transformers (the HF model's own
forward, float32) over the project's response-token definition (ResponseTokenizer), i.e.
independently of the megatron path training uses; the two sources are synthetic: p0's sums
shifted by a per-row offset, with their own token counts, as if from other tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

PIVOT_FAMILY = "phi3"  # Phi-4-like template; GQA 4 heads / 2 KV heads, 4 layers (TP=2, PP=2)
SOURCE_NAMES = ("qwen", "llama")

ROWS: list[dict[str, Any]] = [
    {"id": "capital", "prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Rome, I think."},
    {"id": "legs", "prompt": "How many legs does a spider have?", "chosen": "Eight legs.", "rejected": "Six."},
    {"id": "code", "prompt": "def add(a, b):", "chosen": "    return a + b\n", "rejected": "pass"},
    {"id": "math", "prompt": "12 * 7 = ?", "chosen": "84", "rejected": "It is 74, or so."},
    {"id": "sea", "prompt": "The sea at night?", "chosen": "Dark and quiet.", "rejected": "Bright."},
    {"id": "thanks", "prompt": "Thank you!", "chosen": "Sure.", "rejected": "I cannot help with that."},
    {"id": "sky", "prompt": "Why is the sky blue?", "chosen": "Sunlight scatters.", "rejected": "Paint."},
    {"id": "days", "prompt": "Name a day.", "chosen": "Monday.", "rejected": "January February"},
    {
        "id": "multi",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a month."},
            {"role": "assistant", "content": "May."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "June.",
        "rejected": "No.",
    },
    {"id": "solve", "prompt": "Solve 3x + 5 = 20.", "chosen": "x = 5", "rejected": "x = 3"},
    {"id": "poem", "prompt": "A poem about the sea?", "chosen": "The sea is dark and quiet.", "rejected": "No."},
    {"id": "sqrt", "prompt": "import math", "chosen": "print(math.sqrt(16))", "rejected": "print(4)"},
]


def build_pivot(root: Path) -> Path:
    from nemo_infifpo.testing.models import save_tiny_hf_model

    return save_tiny_hf_model(PIVOT_FAMILY, root / "pivot", seed=1)


@torch.no_grad()
def hf_scores(model_dir: Path, rows: list[Any], chat_template: str | None = None) -> list[tuple[float, float, int, int]]:
    """(chosen sum, rejected sum, chosen T, rejected T) per row with the HF model in float32."""
    from transformers import AutoModelForCausalLM

    from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = ResponseTokenizer(load_tokenizer(model_dir), chat_template)
    out = []
    for row in rows:
        pair = tokenizer.encode_pair(row)
        sides = []
        for seq in (pair.chosen, pair.rejected):
            ids = torch.tensor([seq.input_ids])
            logps = model(ids).logits.float()[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            sides.append((float(logps[seq.response_start - 1 :].double().sum()), seq.num_response_tokens))
        out.append((sides[0][0], sides[1][0], sides[0][1], sides[1][1]))
    return out


def write_scored_set(root: Path, pivot: Path, *, rows: list[dict[str, Any]] | None = None, name: str = "scored.parquet") -> Path:
    """The toy scored set (p0 = HF scores of ``pivot``), with the pivot's tokenizer fingerprint."""
    from nemo_infifpo.data.rows import rows_from_records
    from nemo_infifpo.data.scored_set import ModelScores, write_scored_set as write
    from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer

    preference_rows = rows_from_records(rows or ROWS)
    p0 = hf_scores(pivot, preference_rows)
    ref = ModelScores.from_lists(*zip(*p0))
    generator = torch.Generator().manual_seed(0)
    sources = []
    for j, _ in enumerate(SOURCE_NAMES):
        # Another tokenizer: other counts; another model: other (mostly lower) log-probs.
        counts_c = [c + j + 1 for _, _, c, _ in p0]
        counts_r = [r + 2 * j for _, _, _, r in p0]
        shift = torch.randn(len(p0), 2, generator=generator, dtype=torch.float64) * 3.0 - 2.0
        sums_c = [s + float(shift[i, 0]) for i, (s, _, _, _) in enumerate(p0)]
        sums_r = [s + float(shift[i, 1]) for i, (_, s, _, _) in enumerate(p0)]
        sources.append(ModelScores.from_lists(sums_c, sums_r, counts_c, counts_r))
    tokenizer = ResponseTokenizer(load_tokenizer(pivot))
    path = root / name
    write(
        path,
        preference_rows,
        ref,
        sources,
        source_names=SOURCE_NAMES,
        pivot_fingerprints={
            "tokenizer_fingerprint": tokenizer.fingerprint(),
            "chat_template": tokenizer.template_name,
            "model_path": str(pivot),
        },
    )
    return path


def build_fixture(root: Path) -> dict[str, str]:
    """Pivot + scored set under ``root`` (created once per test module)."""
    root.mkdir(parents=True, exist_ok=True)
    pivot = build_pivot(root)
    scored = write_scored_set(root, pivot)
    return {"pivot": str(pivot), "scored": str(scored)}


def config_dict(fixture: dict[str, str], output_dir: str | Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny CPU config (as plain data); ``sections`` update individual sections."""
    base: dict[str, Any] = {
        "seed": 1234,
        "output_dir": str(output_dir),
        "model": {
            "path": fixture["pivot"],
            "tensor_model_parallel_size": 1,
            "pipeline_model_parallel_size": 1,
            "micro_batch_size": 1,
            "global_batch_size": 4,
            "precision": "fp32",
            "use_transformer_engine": False,
        },
        "data": {"path": fixture["scored"], "max_length": 120, "shuffle": True},
        "loss": {"type": "infifpo", "beta": 2.5, "fusion": "max_margin", "length_norm": True},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_fraction": 0.0, "weight_decay": 0.01, "grad_clip": 1.0},
        "trainer": {"max_steps": 4, "step0_parity_atol": 1e-4},
        "checkpoint": {"interval": 0, "keep_last": 2, "save_final": False},
        "logging": {"tensorboard": False, "progress_bar": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(base.get(name), dict):
            base[name] = {**base[name], **values}
        else:
            base[name] = values
    return base


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def full_weights(model: Any) -> dict[str, torch.Tensor] | None:
    """HF-named full tensors of a trained MegatronInfiFPOModel on global rank 0 (collective)."""
    from nemo_infifpo.models.checkpoint import current_shard_context
    from nemo_infifpo.models.mapping import iter_hf_tensors
    from nemo_infifpo.models.registry import weight_rules_for

    loaded = model.loaded
    tensors = dict(iter_hf_tensors(loaded.model, weight_rules_for(loaded.arch), current_shard_context(loaded.arch, loaded.padded_vocab_size)))
    return tensors or None
