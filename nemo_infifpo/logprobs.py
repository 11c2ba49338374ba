"""Token and sequence log-probabilities: the one implementation scoring and training share.

Conventions
-----------
* Next-token shift: the log-prob of token ``t`` is read from the logits at position ``t-1``
  (:func:`shift_for_next_token`). Token 0 of a sequence is never scored.
* Targets are always valid vocabulary ids. Positions that should not count (prompt, padding)
  are excluded with a boolean mask at reduction time (:func:`sequence_logprob_sums`), never
  with an ignore index such as -100; a pad id is a fine placeholder target.
* Results are float32, whatever the logits' dtype.
* Vocabulary padding: megatron pads the vocabulary (e.g. to a multiple of 128 x TP) with rows
  that are not real tokens. Pass the real ``vocab_size`` and those columns get probability 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "vocab_parallel_token_logprobs",
    "token_logprobs_from_hidden",
    "sequence_logprob_sums",
    "shift_for_next_token",
]


# --------------------------------------------------------------------------- vocab-parallel


def _default_tp_group() -> dist.ProcessGroup | None:
    """megatron's tensor-parallel group when model parallel is initialised, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)


def check_target_ids(targets: torch.Tensor, limit: int, what: str) -> None:
    """Raise if a target id lies outside ``[0, limit)`` (a tokenizer/model vocabulary mismatch).

    An id beyond the padded vocabulary would otherwise be found on no tensor-parallel shard
    and give a finite, wrong log-prob. Only host tensors are checked: on a GPU the check is a
    host synchronisation per micro-batch, which stalls the pipeline schedule, so callers check
    their batches on the host before moving them (training's forward step, scoring).
    """
    if targets.device.type != "cpu":
        return
    if targets.numel() and (bool((targets < 0).any()) or bool((targets >= limit).any())):
        bad = targets[(targets < 0) | (targets >= limit)][:5].tolist()
        raise ValueError(
            f"target ids must lie in [0, {limit}) ({what}); got e.g. {bad}. Mask positions "
            "out with the loss mask instead of using an ignore index."
        )


class _VocabParallelLogProb(torch.autograd.Function):
    """log softmax(logits)[target] over a vocabulary split across a process group."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: torch.Tensor,
        targets: torch.Tensor,
        vocab_start: int,
        vocab_size: int | None,
        group: dist.ProcessGroup | None,
    ) -> torch.Tensor:
        local_v = logits.size(-1)
        x = logits.float()
        if vocab_size is not None and vocab_start + local_v > vocab_size:
            # Padding columns (ids >= vocab_size) are not tokens: exclude them from the softmax.
            ids = torch.arange(vocab_start, vocab_start + local_v, device=logits.device)
            x = x.masked_fill(ids >= vocab_size, float("-inf"))

        # Global max for a stable softmax. A shard that is all padding has max -inf locally;
        # the global max is finite as long as one real id exists.
        gmax = x.amax(dim=-1)
        _all_reduce(gmax, dist.ReduceOp.MAX, group)
        exp = (x - gmax.unsqueeze(-1)).exp_()  # new buffer; x may alias fp32 logits
        sum_exp = exp.sum(dim=-1)
        _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

        local = (targets >= vocab_start) & (targets < vocab_start + local_v)
        local_idx = torch.where(local, targets - vocab_start, torch.zeros_like(targets))
        target_logit = x.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1)
        target_logit = torch.where(local, target_logit, torch.zeros_like(target_logit))
        _all_reduce(target_logit, dist.ReduceOp.SUM, group)

        logp = target_logit - gmax - sum_exp.log()
        softmax = exp.div_(sum_exp.unsqueeze(-1))  # reuse the buffer for backward
        ctx.save_for_backward(softmax, local, local_idx)
        ctx.logits_dtype = logits.dtype
        return logp

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        softmax, local, local_idx = ctx.saved_tensors
        # d logp / d logit_j = 1[j == target] - softmax_j, for this rank's columns j.
        # Out of place: the saved softmax must survive a retain_graph=True second backward.
        grad = softmax * (-grad_out.unsqueeze(-1))
        onehot_grad = torch.where(local, grad_out, torch.zeros_like(grad_out))
        grad.scatter_add_(-1, local_idx.unsqueeze(-1), onehot_grad.unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_size: int | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Log-probability of ``targets`` under logits whose vocabulary is split across ``group``.

    Args:
        logits: ``[..., V_local]``, this rank's contiguous vocabulary shard: rank ``r`` of the
            group holds ids ``[r * V_local, (r + 1) * V_local)`` (megatron's layout).
        targets: ``[...]`` global token ids, all valid (see the module docstring).
        vocab_size: the real vocabulary size; ids at or above it are padding and get
            probability 0. ``None``: every column is a real token.
        group: the tensor-parallel group. ``None``: megatron's tensor-model-parallel group if
            model parallel is initialised, else this process alone.

    Returns:
        float32 ``[...]``. The full vocabulary is never gathered: only per-token max,
        sum-exp and target logit are all-reduced. Differentiable w.r.t. ``logits``.
    """
    if group is None:
        group = _default_tp_group()
    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    local_v = logits.size(-1)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != logits {tuple(logits.shape[:-1])}")
    total_v = world * local_v
    if vocab_size is not None and not 0 < vocab_size <= total_v:
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {total_v}] (padded vocab)")
    limit = total_v if vocab_size is None else vocab_size
    check_target_ids(targets, limit, "vocab_size" if vocab_size is not None else "padded vocab")
    return _VocabParallelLogProb.apply(logits, targets.long(), rank * local_v, vocab_size, group)


# --------------------------------------------------------------------------- chunked from hidden


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int | None) -> torch.Tensor:
    """float32 logits of one token chunk (matmul in the inputs' dtype, as the model does)."""
    logits = (h @ weight.t()).float()
    if vocab_size is not None and vocab_size < weight.size(0):
        logits[:, vocab_size:] = float("-inf")
    return logits


class _ChunkedHiddenLogProb(torch.autograd.Function):
    """Per-token log p(label) from hidden states, one token chunk of logits at a time.

    Forward keeps only the per-token log-sum-exp; backward recomputes each chunk's logits,
    so at most one ``[chunk, V]`` float32 buffer (plus its low-precision cast) is alive.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        chunk_size: int,
        vocab_size: int | None,
    ) -> torch.Tensor:
        n = hidden.size(0)
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight, vocab_size)
            target = logits.gather(1, labels[start:end].unsqueeze(1)).squeeze(1)
            # logsumexp in place on the one buffer: max, subtract, exp, sum.
            cmax = logits.amax(dim=1, keepdim=True)
            chunk_lse = logits.sub_(cmax).exp_().sum(dim=1).log_().add_(cmax.squeeze(1))
            lse[start:end] = chunk_lse
            logp[start:end] = target - chunk_lse
            del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk_size = chunk_size
        ctx.vocab_size = vocab_size
        return logp

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # Accumulate the weight gradient in float32 across chunks, cast once at the end.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_out = grad_out.float()
        for start in range(0, hidden.size(0), ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.size(0))
            h = hidden[start:end]
            g = grad_out[start:end]
            # d logp / d logits = onehot(label) - softmax, scaled by the incoming gradient.
            grad_logits = _chunk_logits(h, weight, ctx.vocab_size)
            grad_logits.sub_(lse[start:end].unsqueeze(1)).exp_().mul_(-g.unsqueeze(1))
            grad_logits.scatter_add_(1, labels[start:end].unsqueeze(1), g.unsqueeze(1))
            if grad_h is not None:
                grad_h[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h.float())
            del grad_logits
        return grad_h, (grad_w.to(weight.dtype) if grad_w is not None else None), None, None, None


def token_logprobs_from_hidden(
    hidden: torch.Tensor,
    output_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = 512,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """``log_softmax(hidden @ output_weight.T)[t, labels[t]]`` without the ``[T, V]`` matrix.

    Single process. ``hidden`` ``[T, H]``, ``output_weight`` ``[V, H]``, ``labels`` ``[T]``
    → float32 ``[T]``. Works chunk by chunk over tokens, so the extra memory is
    ``O(chunk_size x V)`` in forward and backward (logits are recomputed per chunk in
    backward): one float32 ``[chunk_size, V]`` buffer at a time. The default 512 keeps that
    under 1/8 of the naive path at T=4096 (benchmarks/logprob_memory.py: ratio ~0.07; 1024
    gives ~0.13), with matmuls still large enough to run at full speed. Differentiable w.r.t. ``hidden`` and ``output_weight``. Rows of
    ``output_weight`` at or above ``vocab_size`` are padding and get probability 0.
    """
    if hidden.dim() != 2 or output_weight.dim() != 2 or labels.dim() != 1:
        raise ValueError("expected hidden [T, H], output_weight [V, H], labels [T]")
    if hidden.size(0) != labels.size(0) or hidden.size(1) != output_weight.size(1):
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, output_weight "
            f"{tuple(output_weight.shape)}, labels {tuple(labels.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if vocab_size is not None and not 0 < vocab_size <= output_weight.size(0):
        raise ValueError(f"vocab_size {vocab_size} must be in (0, {output_weight.size(0)}]")
    check_target_ids(labels, vocab_size or output_weight.size(0), "vocabulary")
    return _ChunkedHiddenLogProb.apply(hidden, output_weight, labels.long(), int(chunk_size), vocab_size)


# --------------------------------------------------------------------------- reductions, shift


def sequence_logprob_sums(
    token_logps: torch.Tensor,
    loss_mask: torch.Tensor,
    sequence_index: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of token log-probs over ``loss_mask`` and the number of tokens counted.

    Padded layout (one sequence per row): ``token_logps`` ``[B, S]`` and ``loss_mask``
    ``[B, S]`` (bool or 0/1) -> (float32 ``[B]``, int64 ``[B]``). Packed layout (several
    sequences per row): ``sequence_index`` ``[B, S]`` names the sequence (``0 ..
    num_sequences-1``) of every position, and each masked value is added into its sequence's
    slot. Masked positions contribute exactly 0 even if their value is -inf/nan. No host
    synchronisation (this runs once per micro-batch of the pipeline schedule).
    """
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"shapes differ: {tuple(token_logps.shape)} vs {tuple(loss_mask.shape)}")
    mask = loss_mask.bool()
    values = torch.where(mask, token_logps.float(), torch.zeros((), dtype=torch.float32, device=token_logps.device))
    if sequence_index is None or num_sequences is None or num_sequences == token_logps.shape[0]:
        return values.sum(dim=-1), mask.sum(dim=-1, dtype=torch.int64)
    flat_mask = mask.flatten()
    index = torch.where(flat_mask, sequence_index.flatten(), torch.zeros_like(sequence_index.flatten()))
    sums = values.new_zeros(num_sequences).index_add(0, index, values.flatten())
    counts = torch.zeros(num_sequences, dtype=torch.int64, device=values.device).index_add(0, index, flat_mask.long())
    return sums, counts


def shift_for_next_token(
    input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align a padded batch for next-token scoring.

    ``input_ids`` / ``response_mask`` ``[B, S]`` (mask marks the response tokens being scored)
    → ``inputs = input_ids[:, :-1]``, ``targets = input_ids[:, 1:]``,
    ``target_mask = response_mask[:, 1:]``, each ``[B, S-1]``. Position ``j`` of the outputs
    predicts token ``j + 1``: the log-prob of token ``t`` comes from position ``t - 1``.
    Token 0 cannot be scored; a response mask that marks it is rejected.
    """
    if input_ids.shape != response_mask.shape or input_ids.dim() != 2:
        raise ValueError("input_ids and response_mask must both be [B, S]")
    if input_ids.size(1) < 2:
        raise ValueError("sequences need at least 2 tokens to score a next token")
    mask = response_mask.bool()
    if bool(mask[:, 0].any()):
        raise ValueError("response_mask marks token 0, which has no context to be predicted from")
    return input_ids[:, :-1], input_ids[:, 1:], mask[:, 1:]
