"""Megatron scoring on packed micro-batches gives the per-sequence scores of padded ones
(one process, a tiny Llama on the CPU); a packing without the block-diagonal mask does not.
Fixtures world_of_one and tiny_llama: tests/conftest.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from nemo_infifpo.engine.batches import causal_attention_mask, packed_micro_batches
from nemo_infifpo.engine.forward import compute_sequence_logprobs, forward_only
from nemo_infifpo.scoring.batching import collate
from nemo_infifpo.data.templates import TokenizedSequence

TOLERANCE = 1e-4


def _batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of mixed lengths (prompt + response), right-padded as the scoring job does."""
    g = torch.Generator().manual_seed(0)
    sequences = []
    for prompt, response in [(5, 9), (3, 2), (12, 20), (7, 1), (2, 6), (9, 9), (4, 15)]:
        ids = torch.randint(1, vocab_size, (prompt + response,), generator=g).tolist()
        sequences.append(TokenizedSequence(input_ids=ids, response_start=prompt))
    return collate(sequences, 40)


def test_packed_scoring_equals_padded_scoring(world_of_one: None, tiny_llama: Path) -> None:
    from nemo_infifpo.scoring.backends import MegatronBackend

    padded = MegatronBackend(tiny_llama, dtype=torch.float32, micro_batch_size=3)
    tokens, mask = _batch(padded.vocab_size)
    sums, counts = padded.score(tokens, mask)
    # Several bins, several sequences per bin, and the default bin length (micro x width).
    for pack_length in (40, 64, None):
        packed = MegatronBackend(tiny_llama, dtype=torch.float32, micro_batch_size=3, packing=True,
                                 pack_length=pack_length)
        packed_sums, packed_counts = packed.score(tokens, mask)
        assert torch.equal(packed_counts, counts) and torch.equal(counts, mask.sum(dim=1))
        assert (packed_sums - sums).abs().max().item() < TOLERANCE, pack_length


def test_a_packing_without_the_block_mask_fails_the_comparison(world_of_one: None, tiny_llama: Path) -> None:
    """The comparison above is sensitive: sequences that see the ones before them in the bin
    get other scores."""
    from nemo_infifpo.models.checkpoint import load_megatron_model

    loaded = load_megatron_model(tiny_llama, params_dtype=torch.float32, device="cpu")
    vocab = int(loaded.vocab_size)
    tokens, mask = _batch(vocab)
    sums, _ = compute_sequence_logprobs(loaded.model, tokens, mask, micro_batch_size=7, vocab_size=vocab)
    micro = packed_micro_batches(tokens, mask, bin_length=64)
    assert any(b.num_sequences > 1 for b in micro)
    broken = [replace(b, attention_mask=causal_attention_mask(b.seq_length)) for b in micro]
    wrong = torch.zeros_like(sums)
    for batch, values in zip(broken, forward_only(loaded.model, broken, vocab_size=vocab), strict=True):
        wrong[torch.tensor(batch.row_indices)] = values
    assert (wrong - sums).abs().max().item() > 100 * TOLERANCE
