"""The one forward pass: a micro-batch through the pivot (any TP/PP) to response log-probs.

Every pass of the recipe goes through :func:`forward_step` (megatron's ``forward_step_func``)
on :class:`~nemo_infifpo.engine.batches.MicroBatch` es: the training step (with the
objective's loss), the step-0 parity check and the megatron scoring back end (forward only,
:func:`forward_only`), and the token-level parity checks against transformers
(:func:`compute_sequence_logprobs`). They differ only in the *head* applied to the last
stage's logits: the loss, per-sequence sums, or per-token log-probs; the log-probs themselves
are always :func:`sequence_logprobs` (vocab-parallel log-softmax, per-sequence masked sums).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from nemo_infifpo.engine.batches import MicroBatch, causal_attention_mask, packed_micro_batches, padded_micro_batches
from nemo_infifpo.logprobs import check_target_ids, sequence_logprob_sums, vocab_parallel_token_logprobs

__all__ = [
    "causal_attention_mask",
    "compute_sequence_logprobs",
    "forward_only",
    "forward_step",
    "sequence_logprobs",
    "uses_transformer_engine",
]

# head(batch, logits) -> what the pipeline schedule expects from a loss function.
Head = Callable[[MicroBatch, torch.Tensor], Any]


def uses_transformer_engine(model: torch.nn.Module) -> bool:
    """Whether ``model`` was built with the Transformer Engine layer spec (which fuses the
    norms into the next GEMM: ``...layer_norm_weight``); packed batches then use THD."""
    return any("layer_norm_weight" in name for name, _ in model.named_parameters())


def sequence_logprobs(batch: MicroBatch, logits: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence response log-prob sums (float32) and token counts of ``batch``, from the
    last stage's logits ``[b, s, V/TP]`` (this rank's vocabulary shard)."""
    token_logps = vocab_parallel_token_logprobs(logits, batch.labels, vocab_size=vocab_size)
    return sequence_logprob_sums(token_logps, batch.loss_mask, batch.sequence_index, batch.num_sequences)


def forward_step(
    data_iterator: Iterator[MicroBatch], model: torch.nn.Module, *, vocab_size: int, head: Head
) -> tuple[torch.Tensor, Any]:
    """megatron's ``forward_step_func``: the next micro-batch through ``model`` (this rank's
    chunk as the schedule sees it, possibly DDP-wrapped); ``head`` turns the logits into the
    schedule's loss output on the last stage."""
    device = next(model.parameters()).device
    batch = next(data_iterator)
    check_target_ids(batch.labels, vocab_size, "the model's vocab_size")  # on the host: no GPU sync
    batch = batch.to(device)
    output = model(batch.input_ids, batch.position_ids, batch.attention_mask, packed_seq_params=batch.packed_seq_params)
    return output, partial(head, batch)


def _nothing(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Forward only: no loss, no count (calculate_per_token_loss expects a count all the same).
    return torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.int32, device=device)


def _scores_head(vocab_size: int, batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    sums, _ = sequence_logprobs(batch, logits, vocab_size)
    return (*_nothing(sums.device), {"values": sums.detach()})


def _tokens_head(vocab_size: int, batch: MicroBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    token_logps = vocab_parallel_token_logprobs(logits, batch.labels, vocab_size=vocab_size)
    masked = torch.where(batch.loss_mask, token_logps.float(), torch.zeros((), device=token_logps.device))
    return (*_nothing(masked.device), {"values": masked.detach()})


def _chunks(model: torch.nn.Module | Sequence[torch.nn.Module]) -> list[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def forward_only(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    micro_batches: list[MicroBatch],
    *,
    vocab_size: int,
    token_level: bool = False,
) -> list[torch.Tensor]:
    """Forward-only pass of ``micro_batches`` through megatron's schedule (any PP), in eval
    mode without gradients. Returns, per micro-batch and on every rank (CPU): the sequences'
    response log-prob sums ``[num_sequences]`` (float32), or with ``token_level`` the masked
    per-token log-probs ``[b, s]`` (position t: log p(token t+1)). Collective over the
    model-parallel group."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    chunks = _chunks(model)
    config = get_model_config(chunks[0])
    if config.pipeline_dtype is None:
        config.pipeline_dtype = config.params_dtype  # p2p buffers between stages use it
    head = partial(_tokens_head if token_level else _scores_head, vocab_size)
    # Interleaved schedules call each model chunk with its own iterator over all micro-batches.
    data: Any = iter(micro_batches) if len(chunks) == 1 else [iter(micro_batches) for _ in chunks]
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=partial(forward_step, vocab_size=vocab_size, head=head),
                data_iterator=data,
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(micro_batches),
                seq_length=micro_batches[0].seq_length,
                micro_batch_size=int(micro_batches[0].input_ids.shape[0]),
                forward_only=True,
            )
    finally:
        for c, flag in zip(chunks, was_training):
            c.train(flag)

    # Only the last stage has results; it broadcasts them along the pipeline in one tensor.
    shapes = [tuple(b.input_ids.shape) if token_level else (b.num_sequences,) for b in micro_batches]
    device = next(chunks[0].parameters()).device
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        flat = torch.cat([o["values"].float().flatten() for o in outputs])
    else:
        flat = torch.zeros(sum(math.prod(s) for s in shapes), dtype=torch.float32, device=device)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.is_initialized() and dist.get_world_size(pp_group) > 1:
        dist.broadcast(flat, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    flat = flat.cpu()
    sizes = [math.prod(s) for s in shapes]
    return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]


def compute_sequence_logprobs(
    model: torch.nn.Module | Sequence[torch.nn.Module],
    tokens: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    micro_batch_size: int,
    vocab_size: int,
    return_token_logprobs: bool = False,
    pack_length: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Sum of response-token log-probs per sequence of a right-padded batch, on every rank.

    Args:
        model: a megatron ``GPTModel`` (this rank's TP/PP part) or its list of model chunks.
        tokens: ``[B, S]`` long, right-padded; identical on every rank of the model-parallel group.
        response_mask: ``[B, S]`` bool, True on the response tokens to score (never token 0).
        micro_batch_size: sequences per forward; ``B`` is padded up to a multiple of it.
        vocab_size: real vocabulary size (padding columns of the output layer get p = 0).
        return_token_logprobs: also return ``[B, S]`` float32 per-token log-probs aligned with
            ``tokens`` (entry ``t`` = log p(tokens[t] | tokens[<t]); 0 outside the mask).
        pack_length: pack the sequences (each ending at its last response token) into bins of
            this many tokens instead of padding them (:func:`~nemo_infifpo.engine.batches.
            packed_micro_batches`; THD with Transformer Engine); ``micro_batch_size`` is then
            unused. Not with ``return_token_logprobs``.

    Returns:
        ``(sums float32 [B], counts int64 [B])`` (plus the token log-probs if asked), on the
        CPU, the same on every rank: :func:`forward_only` on the micro-batches.
    """
    batch_size = tokens.size(0)
    if pack_length is not None:
        if return_token_logprobs:
            raise ValueError("token-level log-probs are computed on padded micro-batches only")
        chunk = _chunks(model)[0]
        micro = packed_micro_batches(
            tokens, response_mask, bin_length=pack_length, use_transformer_engine=uses_transformer_engine(chunk)
        )
    else:
        micro = padded_micro_batches(tokens, response_mask, micro_batch_size=micro_batch_size)
    if not return_token_logprobs:
        sums = torch.zeros(batch_size, dtype=torch.float32)
        counts = torch.zeros(batch_size, dtype=torch.int64)
        for batch, values in zip(micro, forward_only(model, micro, vocab_size=vocab_size), strict=True):
            # Sequence k of a micro-batch is row row_indices[k] (rows >= B fill the last one).
            rows = torch.tensor(batch.row_indices, dtype=torch.long)
            keep = rows < batch_size
            per_sequence = torch.bincount(batch.sequence_index[batch.loss_mask], minlength=batch.num_sequences)
            sums[rows[keep]] = values[keep]
            counts[rows[keep]] = per_sequence[keep]
        return sums, counts
    counts = torch.cat([b.loss_mask.sum(dim=-1) for b in micro])[:batch_size].to(torch.int64)
    token_logps = torch.cat(forward_only(model, micro, vocab_size=vocab_size, token_level=True))[:batch_size]
    sums = token_logps.sum(dim=-1)
    # Re-align to `tokens`: the log-prob of token t was computed at position t - 1.
    aligned = torch.cat([torch.zeros(batch_size, 1), token_logps[:, :-1]], dim=1)
    return sums, counts, aligned
