"""Micro-batches: the one batch format of every forward pass (scoring, step-0 parity, training).

Training and parity build them from tokenized pairs (:func:`pad_micro_batches`,
:func:`pack_micro_batches`); scoring and the token-level checks from right-padded ``[B, S]``
tokens (:func:`padded_micro_batches`, :func:`packed_micro_batches`). Padded or packed, both
kinds fill their rows and bins with the same code, and the forward pass is
:func:`nemo_infifpo.engine.forward.forward_step`.

A micro-batch holds whole pairs: the chosen and the rejected sequence of a pair always go
through the same forward pass (the loss needs both scores of a row together). Sequences are
numbered ``0..m-1`` for the chosen responses of its ``m`` pairs and ``m..2m-1`` for the
rejected ones (SFT micro-batches hold only the ``m`` chosen sequences); every target token
carries the number of its sequence in ``sequence_index``, so the per-sequence log-prob sums
come out the same way whatever the layout:

* **padded** (default): one sequence per row, ``[2m, S]``, right-padded to the step's length,
  causal attention;
* **packed** (``data.pack_sequences``): pairs placed into fixed-length bins by first-fit
  decreasing, ``[1, L]`` per bin, each sequence with its own position ids and attention
  restricted to itself: an explicit block-diagonal causal mask for megatron's local layer
  spec, ``cu_seqlens`` (THD layout) for Transformer Engine.

Targets follow :mod:`nemo_infifpo.logprobs`: position ``t`` predicts token ``t + 1``; positions
whose target is not a response token are masked out, and their target id is a valid
placeholder (0), never an ignore index.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from nemo_infifpo.data.templates import TokenizedPair, TokenizedSequence

__all__ = [
    "PAD_ID",
    "MicroBatch",
    "causal_attention_mask",
    "padded_micro_batches",
    "first_fit_decreasing",
    "pack_micro_batches",
    "packed_micro_batches",
    "pad_micro_batches",
    "padded_length",
]

# Any valid id: padded positions are never scored and never attended to by real tokens; id 0
# exists in every vocabulary.
PAD_ID = 0


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [b, S] long
    position_ids: torch.Tensor  # [b, S] long
    labels: torch.Tensor  # [b, S] long: the token each position predicts
    loss_mask: torch.Tensor  # [b, S] bool: the target is a response token
    sequence_index: torch.Tensor  # [b, S] long: which sequence the target belongs to
    num_pairs: int
    num_sequences: int  # 2 * num_pairs, or num_pairs for chosen-only (SFT)
    num_tokens: int  # real (non-padding) tokens, for throughput
    row_indices: list[int]  # rows of the training data, pair order
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # precomputed, per pair
    attention_mask: torch.Tensor | None = None  # [1, 1, S, S] bool, True = masked
    packed_seq_params: Any = None  # megatron PackedSeqParams (THD), Transformer Engine only

    @property
    def seq_length(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: torch.device) -> "MicroBatch":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        params = self.packed_seq_params
        if params is not None:
            params = replace(
                params,
                cu_seqlens_q=move(params.cu_seqlens_q),
                cu_seqlens_kv=move(params.cu_seqlens_kv),
            )
        return replace(
            self,
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            labels=move(self.labels),
            loss_mask=move(self.loss_mask),
            sequence_index=move(self.sequence_index),
            attention_mask=move(self.attention_mask),
            packed_seq_params=params,
        )


def padded_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _sequences(pairs: Sequence[TokenizedPair], chosen_only: bool) -> list[TokenizedSequence]:
    # Chosen of every pair first, then rejected: sequence k < m is pair k's chosen response.
    seqs = [p.chosen for p in pairs]
    return seqs if chosen_only else seqs + [p.rejected for p in pairs]


def _token_tensors(seq: TokenizedSequence) -> tuple[torch.Tensor, torch.Tensor]:
    """A tokenized sequence as ``(ids [n], scored [n])``: scored = a response token."""
    ids = torch.tensor(seq.input_ids, dtype=torch.long)
    return ids, torch.arange(len(ids)) >= seq.response_start


def _fill_targets(
    ids: torch.Tensor,
    scored: torch.Tensor,
    number: int,
    start: int,
    labels: torch.Tensor,
    mask: torch.Tensor,
    index: torch.Tensor,
) -> None:
    """Write one sequence's targets into a row, from column ``start``."""
    n = len(ids)
    # Position t predicts token t + 1, scored when that token is a response token.
    labels[start : start + n - 1] = ids[1:]
    mask[start : start + n - 1] = scored[1:]
    index[start : start + n - 1] = number


def _slice_scores(scores: dict[str, torch.Tensor], rows: Sequence[int]) -> dict[str, torch.Tensor]:
    index = torch.as_tensor(list(rows), dtype=torch.long)
    return {name: value[index] for name, value in scores.items()}


def causal_attention_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """megatron's convention: bool ``[1, 1, S, S]``, True = masked (a future position)."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(diagonal=1)
    return mask.view(1, 1, seq_len, seq_len)


def pad_micro_batches(
    pairs: Sequence[TokenizedPair],
    rows: Sequence[int],
    scores: dict[str, torch.Tensor],
    *,
    micro_batch_size: int,
    seq_length: int,
    chosen_only: bool = False,
    explicit_mask: bool = True,
) -> list[MicroBatch]:
    """Consecutive groups of ``micro_batch_size`` pairs, each right-padded to ``seq_length``.

    ``rows[i]`` is the training-data row of ``pairs[i]``; ``scores`` is indexed by row.
    """
    batches = []
    for start in range(0, len(pairs), micro_batch_size):
        group = list(pairs[start : start + micro_batch_size])
        group_rows = list(rows[start : start + micro_batch_size])
        seqs = _sequences(group, chosen_only)
        b = len(seqs)
        longest = max(len(s) for s in seqs)
        if longest > seq_length:
            raise ValueError(f"a sequence of {longest} tokens does not fit seq_length={seq_length}")
        input_ids = torch.full((b, seq_length), PAD_ID, dtype=torch.long)
        labels = torch.full((b, seq_length), PAD_ID, dtype=torch.long)
        loss_mask = torch.zeros(b, seq_length, dtype=torch.bool)
        sequence_index = torch.zeros(b, seq_length, dtype=torch.long)
        for k, seq in enumerate(seqs):
            ids, scored = _token_tensors(seq)
            input_ids[k, : len(ids)] = ids
            _fill_targets(ids, scored, k, 0, labels[k], loss_mask[k], sequence_index[k])
        batches.append(
            MicroBatch(
                input_ids=input_ids,
                position_ids=torch.arange(seq_length).unsqueeze(0).expand(b, -1).contiguous(),
                labels=labels,
                loss_mask=loss_mask,
                sequence_index=sequence_index,
                num_pairs=len(group),
                num_sequences=b,
                num_tokens=sum(len(s) for s in seqs),
                row_indices=group_rows,
                scores=_slice_scores(scores, group_rows),
                attention_mask=causal_attention_mask(seq_length) if explicit_mask else None,
            )
        )
    return batches


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items by decreasing size (ties in index order), each into the
    first bin with room. Deterministic, and within 11/9 of the optimal number of bins."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        if sizes[i] > capacity:
            raise ValueError(f"item {i} of size {sizes[i]} exceeds the bin capacity {capacity}")
        for b, room in enumerate(free):
            if sizes[i] <= room:
                bins[b].append(i)
                free[b] -= sizes[i]
                break
        else:
            bins.append([i])
            free.append(capacity - sizes[i])
    return bins


def pack_micro_batches(
    pairs: Sequence[TokenizedPair],
    rows: Sequence[int],
    scores: dict[str, torch.Tensor],
    *,
    bin_length: int,
    chosen_only: bool = False,
    use_transformer_engine: bool = False,
) -> list[MicroBatch]:
    """One micro-batch per bin of ``bin_length`` tokens; a pair is never split over bins."""
    sizes = [len(p.chosen) + (0 if chosen_only else len(p.rejected)) for p in pairs]
    batches = []
    for members in first_fit_decreasing(sizes, bin_length):
        group = [pairs[i] for i in members]
        group_rows = [rows[i] for i in members]
        m = len(group)
        # Layout inside a bin: chosen_j, rejected_j, chosen_k, rejected_k, ...
        placed = []
        for j, pair in enumerate(group):
            placed.append((*_token_tensors(pair.chosen), j))
            if not chosen_only:
                placed.append((*_token_tensors(pair.rejected), m + j))
        batches.append(
            _packed_bin(
                placed,
                bin_length,
                num_pairs=m,
                row_indices=group_rows,
                scores=_slice_scores(scores, group_rows),
                use_transformer_engine=use_transformer_engine,
            )
        )
    return batches


def packed_micro_batches(
    tokens: torch.Tensor, response_mask: torch.Tensor, *, bin_length: int, use_transformer_engine: bool = False
) -> list[MicroBatch]:
    """Right-padded ``tokens`` ``[B, S]`` with ``response_mask`` (as for
    :func:`padded_micro_batches`) packed into bins of ``bin_length`` tokens, one micro-batch
    per bin, by first-fit decreasing. A row's sequence ends at its last response token (the
    padding after it is dropped). Sequence ``k`` of a bin is row ``row_indices[k]``."""
    if tokens.dim() != 2 or tokens.shape != response_mask.shape:
        raise ValueError("tokens and response_mask must both be [B, S]")
    tokens, mask = tokens.long().cpu(), response_mask.bool().cpu()
    if bool(mask[:, 0].any()):
        raise ValueError("response_mask marks token 0, which has no context to be predicted from")
    if not bool(mask.any(dim=1).all()):
        raise ValueError("every row needs at least one response token to be packed")
    positions = torch.arange(tokens.size(1))
    lengths = (torch.where(mask, positions, -1).max(dim=1).values + 1).tolist()
    batches = []
    for members in first_fit_decreasing(lengths, bin_length):
        placed = [(tokens[r, : lengths[r]], mask[r, : lengths[r]], k) for k, r in enumerate(members)]
        batches.append(
            _packed_bin(
                placed,
                bin_length,
                num_pairs=0,
                row_indices=list(members),
                scores={},
                use_transformer_engine=use_transformer_engine,
            )
        )
    return batches


def _packed_bin(
    placed: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
    bin_length: int,
    *,
    num_pairs: int,
    row_indices: list[int],
    scores: dict[str, torch.Tensor],
    use_transformer_engine: bool,
) -> MicroBatch:
    """One ``[1, bin_length]`` micro-batch of ``placed`` = ``(ids, scored, sequence number)``,
    one after the other, each with its own positions and attention restricted to itself."""
    input_ids = torch.full((bin_length,), PAD_ID, dtype=torch.long)
    position_ids = torch.zeros(bin_length, dtype=torch.long)
    labels = torch.full((bin_length,), PAD_ID, dtype=torch.long)
    loss_mask = torch.zeros(bin_length, dtype=torch.bool)
    sequence_index = torch.zeros(bin_length, dtype=torch.long)
    # Each sequence may only see itself: a causal mask restricted to its block. Padding at
    # the end of the bin gets its own block (it is never scored).
    blocked = torch.ones(bin_length, bin_length, dtype=torch.bool)
    boundaries = [0]
    cursor = 0
    for ids, scored, number in placed:
        n = len(ids)
        input_ids[cursor : cursor + n] = ids
        position_ids[cursor : cursor + n] = torch.arange(n)
        _fill_targets(ids, scored, number, cursor, labels, loss_mask, sequence_index)
        blocked[cursor : cursor + n, cursor : cursor + n] = torch.ones(n, n, dtype=torch.bool).triu(1)
        cursor += n
        boundaries.append(cursor)
    if cursor < bin_length:
        tail = bin_length - cursor
        blocked[cursor:, cursor:] = torch.ones(tail, tail, dtype=torch.bool).triu(1)
        position_ids[cursor:] = torch.arange(tail)
        boundaries.append(bin_length)
    batch = MicroBatch(
        input_ids=input_ids.unsqueeze(0),
        position_ids=position_ids.unsqueeze(0),
        labels=labels.unsqueeze(0),
        loss_mask=loss_mask.unsqueeze(0),
        sequence_index=sequence_index.unsqueeze(0),
        num_pairs=num_pairs,
        num_sequences=len(placed),
        num_tokens=cursor,
        row_indices=row_indices,
        scores=scores,
    )
    if use_transformer_engine:
        batch.packed_seq_params = _thd_params(boundaries)
    else:
        batch.attention_mask = blocked.view(1, 1, bin_length, bin_length)
    return batch


def _thd_params(boundaries: list[int]) -> Any:
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_seqlens = torch.tensor(boundaries, dtype=torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_len,
        max_seqlen_kv=max_len,
    )


def padded_micro_batches(
    tokens: torch.Tensor, response_mask: torch.Tensor, *, micro_batch_size: int, explicit_mask: bool = True
) -> list[MicroBatch]:
    """Right-padded ``tokens`` ``[B, S]`` with ``response_mask`` (True on the tokens whose
    log-probs count; never token 0) as micro-batches of ``micro_batch_size`` sequences.

    The pipeline schedule sends fixed-shape activations between stages, so the last
    micro-batch is filled up with copies of row 0 that score nothing (their ``loss_mask`` is
    empty). Sequence ``k`` of micro-batch ``i`` is row ``i * micro_batch_size + k``.
    """
    if tokens.dim() != 2 or tokens.shape != response_mask.shape:
        raise ValueError("tokens and response_mask must both be [B, S]")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    tokens, mask = tokens.long().cpu(), response_mask.bool().cpu()
    if bool(mask[:, 0].any()):
        raise ValueError("response_mask marks token 0, which has no context to be predicted from")
    rows, seq_length = tokens.shape
    pad = -rows % micro_batch_size
    if pad:
        tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
        mask = torch.cat([mask, torch.zeros_like(mask[:1]).expand(pad, -1)])
    # Position t predicts token t + 1 (the last position predicts nothing).
    labels = torch.cat([tokens[:, 1:], torch.full((tokens.size(0), 1), PAD_ID, dtype=torch.long)], dim=1)
    loss_mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    batches = []
    for start in range(0, tokens.size(0), micro_batch_size):
        part = slice(start, start + micro_batch_size)
        b = micro_batch_size
        batches.append(
            MicroBatch(
                input_ids=tokens[part],
                position_ids=torch.arange(seq_length).unsqueeze(0).expand(b, -1).contiguous(),
                labels=labels[part],
                loss_mask=loss_mask[part],
                sequence_index=torch.arange(b).unsqueeze(1).expand(b, seq_length).contiguous(),
                num_pairs=0,
                num_sequences=b,
                num_tokens=int(tokens[part].numel()),
                row_indices=list(range(start, start + b)),
                attention_mask=causal_attention_mask(seq_length) if explicit_mask else None,
            )
        )
    return batches
