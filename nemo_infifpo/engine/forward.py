"""Forward-only per-sequence log-probs through megatron's pipeline schedule.

Used by scoring (megatron backend) and by training's step-0 check, so both read log-probs
through exactly the same code: shift (:func:`~nemo_infifpo.logprobs.shift_for_next_token`),
vocab-parallel log-softmax on the last pipeline stage
(:func:`~nemo_infifpo.logprobs.vocab_parallel_token_logprobs`), masked sums.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from nemo_infifpo.logprobs import (
    check_target_ids,
    sequence_logprob_sums,
    shift_for_next_token,
    vocab_parallel_token_logprobs,
)


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Megatron's attention-mask convention: bool ``[1, 1, s, s]``, True = masked (future)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)
    return mask.view(1, 1, seq_len, seq_len)


def _model_chunks(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _logprob_loss(batch: dict[str, torch.Tensor], vocab_size: int, output: torch.Tensor):
    """Last-stage "loss" for the schedule: per-token log-probs of the micro-batch's targets."""
    # GPTModel without labels returns logits [b, s, V_local] (this rank's vocab shard).
    token_logps = vocab_parallel_token_logprobs(output, batch["targets"], vocab_size=vocab_size)
    token_logps = torch.where(batch["mask"], token_logps, torch.zeros_like(token_logps))
    # The schedule wants a scalar to (not) backprop and a dict it stores per micro-batch.
    return token_logps.sum(), {"token_logps": token_logps.detach()}


def _forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module, vocab_size: int):
    batch = next(data_iterator)
    output = model(batch["inputs"], batch["position_ids"], batch["attention_mask"])
    return output, partial(_logprob_loss, batch, vocab_size)


def compute_sequence_logprobs(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    micro_batch_size: int,
    vocab_size: int,
    return_token_logprobs: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Sum of response-token log-probs per sequence, on every rank of the pipeline.

    Args:
        model: a megatron ``GPTModel`` (this rank's TP/PP part) or its list of model chunks.
        tokens: ``[B, S]`` long, padded; identical on every rank of the model-parallel group.
        response_mask: ``[B, S]`` bool, True on the response tokens to score (never token 0).
        micro_batch_size: sequences per forward; ``B`` is padded up to a multiple of it.
        vocab_size: real vocabulary size (padding columns of the output layer get p = 0).
        return_token_logprobs: also return ``[B, S]`` float32 per-token log-probs aligned with
            ``tokens`` (entry ``t`` = log p(tokens[t] | tokens[<t]); 0 outside the mask).

    Returns:
        ``(sums float32 [B], counts int64 [B])`` (plus the token log-probs if asked), on the
        CPU, the same on every rank. Runs in eval mode without gradients; the model's
        training flag is restored afterwards.
    """
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    chunks = _model_chunks(model)
    if tokens.dim() != 2 or tokens.shape != response_mask.shape:
        raise ValueError("tokens and response_mask must both be [B, S]")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    batch_size = tokens.size(0)
    device = next(chunks[0].parameters()).device

    inputs, targets, target_mask = shift_for_next_token(tokens.long(), response_mask)
    check_target_ids(targets.cpu(), vocab_size, "vocab_size")  # once, on the host (no GPU sync per micro-batch)
    # The pipeline schedule sends fixed-shape activations between stages, so every
    # micro-batch has micro_batch_size rows: pad with copies of row 0, fully masked.
    num_micro = -(-batch_size // micro_batch_size)
    pad = num_micro * micro_batch_size - batch_size
    if pad:
        inputs = torch.cat([inputs, inputs[:1].expand(pad, -1)])
        targets = torch.cat([targets, targets[:1].expand(pad, -1)])
        target_mask = torch.cat([target_mask, torch.zeros_like(target_mask[:1]).expand(pad, -1)])
    seq_len = inputs.size(1)
    position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand(micro_batch_size, -1)
    attention_mask = causal_attention_mask(seq_len, device=device)

    def micro_batches() -> Iterator[dict[str, torch.Tensor]]:
        for i in range(num_micro):
            rows = slice(i * micro_batch_size, (i + 1) * micro_batch_size)
            yield {
                "inputs": inputs[rows].to(device),
                "targets": targets[rows].to(device),
                "mask": target_mask[rows].to(device),
                "position_ids": position_ids,
                "attention_mask": attention_mask,
            }

    config = get_model_config(chunks[0])
    if config.pipeline_dtype is None:
        # p2p buffers between stages are allocated with this dtype.
        config.pipeline_dtype = config.params_dtype
    # Interleaved schedules call each model chunk with its own iterator over all micro-batches.
    data_iterator: Any = micro_batches() if len(chunks) == 1 else [micro_batches() for _ in chunks]

    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, vocab_size=vocab_size),
                data_iterator=data_iterator,
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=num_micro,
                seq_length=seq_len,
                micro_batch_size=micro_batch_size,
                forward_only=True,
            )
    finally:
        for c, flag in zip(chunks, was_training):
            c.train(flag)

    # Only the last stage computed log-probs; it broadcasts them along the pipeline. Counts
    # need no communication: they come from the mask, which every rank holds.
    rows = num_micro * micro_batch_size
    token_logps = torch.zeros(rows, seq_len, dtype=torch.float32, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        token_logps = torch.cat([o["token_logps"] for o in outputs]).float().to(device)
    sums, _ = sequence_logprob_sums(token_logps, target_mask.to(device))
    payload = token_logps if return_token_logprobs else sums
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        last = parallel_state.get_pipeline_model_parallel_last_rank()
        dist.broadcast(payload, src=last, group=pp_group)

    counts = target_mask[:batch_size].sum(dim=-1, dtype=torch.int64).cpu()
    if not return_token_logprobs:
        return payload[:batch_size].cpu(), counts
    # Both on the CPU: callers may hand in tokens (and so the mask) on the GPU.
    token_logps = token_logps[:batch_size].cpu()
    sums, _ = sequence_logprob_sums(token_logps, target_mask[:batch_size].cpu())
    # Re-align to `tokens`: the log-prob of token t was computed at position t - 1.
    aligned = torch.cat([torch.zeros(batch_size, 1), token_logps], dim=1)
    return sums, counts, aligned
