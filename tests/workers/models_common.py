"""Shared by the model tests and their torchrun workers: test cases and HF reference numbers.

Imported as ``models_common`` by workers (their directory is on ``sys.path``) and as
``workers.models_common`` by the tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# name -> tiny_hf_model kwargs. The first four cover each family's weight layout; the others
# cover config features that change the numbers (tied output, sliding window, llama3 RoPE).
CASES: dict[str, dict[str, Any]] = {
    "phi3": dict(family="phi3"),
    "llama": dict(family="llama"),
    "mistral": dict(family="mistral"),
    "qwen2_tied": dict(family="qwen2", tied=True),
    "phi3_tied": dict(family="phi3", tied=True, seed=3),
    "mistral_window": dict(family="mistral", sliding_window=5, seed=1),
    "llama_rope3": dict(
        family="llama",
        seed=2,
        max_position_embeddings=16384,  # transformers wants it above the original 8192
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
}
CORE_CASES = ("phi3", "llama", "mistral", "qwen2_tied")

# Extra imports: name -> (case whose HF model is imported, import_hf_checkpoint kwargs).
# With vocab_divisor=1 the checkpoint's padded vocabulary is the odd real one (301), which
# TP=2 cannot split: loading it at TP=2 must re-pad the vocabulary tensors.
EXTRA_IMPORTS: dict[str, tuple[str, dict[str, Any]]] = {"phi3_divisor1": ("phi3", {"vocab_divisor": 1})}

BATCH, SEQ = 3, 16


def save_case(name: str, directory: str | Path) -> Path:
    from nemo_infifpo.testing.models import save_tiny_hf_model

    return save_tiny_hf_model(directory=directory, **CASES[name])


def make_batch(vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and a response mask starting at a different position in each row."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)
    starts = torch.tensor([3, 7, 1])
    response_mask = torch.arange(SEQ).unsqueeze(0) >= starts.unsqueeze(1)
    return tokens, response_mask


def hf_token_logprobs(model: Any, tokens: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] log p(token t | < t) under an HF model, 0 at t=0 and outside the mask."""
    logits = model(tokens).logits.float()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    aligned = torch.cat([torch.zeros(tokens.size(0), 1), logps], dim=1)
    return torch.where(response_mask, aligned, torch.zeros_like(aligned))


def hf_summed_logprob_grads(model: Any, tokens: torch.Tensor, response_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of the summed response log-prob w.r.t. every HF parameter."""
    model.zero_grad(set_to_none=True)
    hf_token_logprobs(model, tokens, response_mask).sum().backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def compare_grads(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, padding_idx: int | None
) -> dict[str, float]:
    """Relative error per HF tensor. The embedding row of ``padding_idx`` is left out:
    HF's ``nn.Embedding(padding_idx=...)`` never gives that row a gradient from the input
    lookup, while megatron's embedding does (the pad token is an ordinary id there)."""
    errors = {}
    for name, reference in expected.items():
        mine = actual[name]
        if name == "model.embed_tokens.weight" and padding_idx is not None:
            keep = torch.arange(reference.shape[0]) != padding_idx
            mine, reference = mine[keep], reference[keep]
        errors[name] = relative_error(mine, reference)
    return errors


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30))
