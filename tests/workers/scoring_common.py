"""Shared set-up for the scoring tests and workers: tiny models with different tokenizers and
chat templates, a small preference data set, an independent reference scorer, and helpers
to run the scoring recipe in a subprocess.

Importable from tests (``from workers.scoring_common import ...``) and from worker scripts
(``import scoring_common``, their directory is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SCORE_RECIPE = REPO / "recipes" / "score.py"

# name -> (tiny family, seed). The pivot is Phi-3 (Phi-4-like tokenizer and template, scored
# with megatron); the sources are Qwen2 (ChatML) and Llama (Llama-3 header template, BOS).
MODELS: dict[str, tuple[str, int]] = {"pivot": ("phi3", 1), "qwen": ("qwen2", 2), "llama": ("llama", 3)}

# Short texts: the tiny byte-level BPE needs several tokens per word, and the tiny models have
# 128 positions. Row "long" is longer than the sources' max_length but not the pivot's.
ROWS: list[dict[str, Any]] = [
    {
        "id": "capital",
        "prompt": "What is the capital of France?",
        "chosen": "Paris.",
        "rejected": "Rome, I think.",
    },
    {
        "id": "legs",
        "prompt": "How many legs does a spider have?",
        "chosen": "Eight legs.",
        "rejected": "Six.",
    },
    {
        "id": "multi",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a day."},
            {"role": "assistant", "content": "Monday."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "Friday.",
        "rejected": "No.",
    },
    {"id": "code", "prompt": "def add(a, b):", "chosen": "    return a + b\n", "rejected": "pass"},
    {"id": "math", "prompt": "12 * 7 = ?", "chosen": "84", "rejected": "It is 74, or so."},
    {"id": "sea", "prompt": "The sea at night?", "chosen": "Dark and quiet.", "rejected": "Bright."},
    {"id": "thanks", "prompt": "Thank you!", "chosen": "Sure.", "rejected": "I cannot help with that."},
    {"id": "accent", "prompt": "Café?", "chosen": "Café, naïve.", "rejected": "über"},
    {"id": "sky", "prompt": "Why is the sky blue?", "chosen": "Sunlight scatters.", "rejected": "Paint."},
    {
        "id": "long",
        "prompt": "Please write a short poem about the sea at night.",
        "chosen": "The sea at night is dark and quiet, and the stars are bright above the waves.",
        "rejected": "No.",
    },
]
PIVOT_MAX_LENGTH = 120
SOURCE_MAX_LENGTH = 90


def build_models(root: Path) -> dict[str, Path]:
    """Save the tiny models (each with its own tokenizer) under ``root``; returns their dirs."""
    from nemo_infifpo.testing.models import save_tiny_hf_model

    dirs = {}
    for name, (family, seed) in MODELS.items():
        dirs[name] = save_tiny_hf_model(family, root / name, seed=seed)
    return dirs


def write_data(path: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in (rows or ROWS)), encoding="utf-8")
    return path


def reference_scores(model_dir: Path, rows: list[dict[str, Any]], max_length: int | None) -> dict[str, Any]:
    """Independent plain-transformers scores: id -> (chosen sum, rejected sum, chosen T,
    rejected T), or id -> None when a sequence is longer than ``max_length``.

    Written without the project's code: AutoTokenizer.apply_chat_template for the boundary,
    the model's own forward, log_softmax, gather, sum.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, local_files_only=True
    ).eval()
    out: dict[str, Any] = {}
    for row in rows:
        prompt = (
            row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        )
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        values = []
        for side in ("chosen", "rejected"):
            messages = prompt + [{"role": "assistant", "content": row[side]}]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            assert ids[: len(prompt_ids)] == prompt_ids, (row["id"], side)
            if max_length is not None and len(ids) > max_length:
                values = None
                break
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].float()
            logp = torch.log_softmax(logits, dim=-1)
            positions = range(len(prompt_ids), len(ids))
            total = sum(float(logp[t - 1, ids[t]]) for t in positions)
            values.append((total, len(positions)))
        out[row["id"]] = None if values is None else (values[0][0], values[1][0], values[0][1], values[1][1])
    return out


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        }
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    if extra:
        env.update(extra)
    return env


def score_args(model_dir: Path, data: Path, output_dir: Path, **options: Any) -> list[str]:
    """``key=value`` overrides for recipes/score.py (float32 for exact comparisons)."""
    args = {
        "model.path": str(model_dir),
        "data.path": str(data),
        "output_dir": str(output_dir),
        "dtype": "float32",
        **{key.replace("__", "."): value for key, value in options.items()},
    }
    return [f"{key}={'null' if value is None else value}" for key, value in args.items()]


def run_score_recipe(
    args: list[str], *, script: Path = SCORE_RECIPE, timeout: float = 300
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script.name} {' '.join(args)} exited {proc.returncode}\n{proc.stderr[-8000:]}"
        )
    return proc
