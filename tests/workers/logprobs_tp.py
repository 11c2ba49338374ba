"""Worker: vocab-parallel log-probs at TP=2 against the single-process full-vocabulary result.

Usage: ``torchrun --nproc_per_node=2 logprobs_tp.py OUT_DIR``. Every rank builds the same
full logits (same seed), keeps its contiguous vocabulary shard, and compares values and the
gradient w.r.t. its shard with ``torch.log_softmax`` on the full vocabulary. Writes
``OUT_DIR/rank{r}.json`` with the max abs errors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
from nemo_infifpo.logprobs import vocab_parallel_token_logprobs


def naive(full: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.log_softmax(full[..., :vocab_size].float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def check(case: str, vocab_size: int, padded: int, dtype: torch.dtype, tp_rank: int, tp: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(11)
    full = (torch.randn(3, 7, padded, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab_size, (3, 7), generator=gen)
    targets[0, 0] = vocab_size - 1  # highest real id, on the last shard
    targets[0, 1] = 0  # lowest id, on the first shard
    grad_out = torch.randn(3, 7, generator=gen)

    ref_in = full.clone().requires_grad_(True)
    ref = naive(ref_in, targets, vocab_size)
    (ref * grad_out).sum().backward()

    local_v = padded // tp
    shard = full[..., tp_rank * local_v : (tp_rank + 1) * local_v].clone().requires_grad_(True)
    out = vocab_parallel_token_logprobs(shard, targets, vocab_size=vocab_size)  # default TP group
    (out * grad_out).sum().backward()
    ref_shard_grad = ref_in.grad[..., tp_rank * local_v : (tp_rank + 1) * local_v]
    return {
        f"{case}_value_err": float((out - ref).detach().abs().max()),
        f"{case}_grad_err": float((shard.grad.float() - ref_shard_grad.float()).abs().max()),
        f"{case}_pad_grad": float(shard.grad[..., max(0, vocab_size - tp_rank * local_v) :].abs().sum()),
        f"{case}_dtype_ok": float(out.dtype == torch.float32 and shard.grad.dtype == dtype),
    }


def main(out_dir: Path) -> None:
    info = init_distributed(2, 1)
    result: dict[str, float] = {"tp": float(info.tp)}
    result.update(check("even", 64, 64, torch.float32, info.tp_rank, info.tp))
    result.update(check("odd_padded", 101, 102, torch.float32, info.tp_rank, info.tp))
    # Padding larger than a shard: rank 1's shard is mostly padding.
    result.update(check("heavy_pad", 37, 64, torch.float32, info.tp_rank, info.tp))
    result.update(check("bf16", 101, 102, torch.bfloat16, info.tp_rank, info.tp))

    # A target in the padding must be rejected on every rank.
    try:
        vocab_parallel_token_logprobs(torch.zeros(2, 51), torch.tensor([0, 101]), vocab_size=101)
        result["pad_target_raises"] = 0.0
    except ValueError:
        result["pad_target_raises"] = 1.0
    destroy_distributed()
    (out_dir / f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
