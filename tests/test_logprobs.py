"""Single-process checks of the shared log-prob implementation against plain torch."""

from __future__ import annotations

import pytest
import torch

from nemo_infifpo.logprobs import (
    sequence_logprob_sums,
    shift_for_next_token,
    token_logprobs_from_hidden,
    vocab_parallel_token_logprobs,
)


def naive_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ------------------------------------------------------------------ vocab_parallel_token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_single_process_matches_log_softmax(gen: torch.Generator, dtype: torch.dtype) -> None:
    logits = (torch.randn(4, 9, 53, generator=gen) * 5).to(dtype)
    targets = torch.randint(0, 53, (4, 9), generator=gen)
    out = vocab_parallel_token_logprobs(logits, targets, group=None)
    assert out.dtype == torch.float32 and out.shape == (4, 9)
    torch.testing.assert_close(out, naive_logprobs(logits, targets), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocab_parallel_gradient_matches_autograd(gen: torch.Generator, dtype: torch.dtype) -> None:
    base = (torch.randn(3, 6, 41, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, 41, (3, 6), generator=gen)
    grad_out = torch.randn(3, 6, generator=gen)
    ours = base.clone().requires_grad_(True)
    ref = base.clone().requires_grad_(True)
    (vocab_parallel_token_logprobs(ours, targets) * grad_out).sum().backward()
    (naive_logprobs(ref, targets) * grad_out).sum().backward()
    assert ours.grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad.float(), ref.grad.float(), atol=atol, rtol=0)


def test_vocab_parallel_second_backward_with_retain_graph(gen: torch.Generator) -> None:
    logits = torch.randn(5, 17, generator=gen, requires_grad=True)
    targets = torch.randint(0, 17, (5,), generator=gen)
    out = vocab_parallel_token_logprobs(logits, targets).sum()
    (first,) = torch.autograd.grad(out, logits, retain_graph=True)
    (second,) = torch.autograd.grad(out, logits)
    torch.testing.assert_close(first, second, atol=0, rtol=0)


def test_padded_vocab_equals_unpadded(gen: torch.Generator) -> None:
    real = torch.randn(2, 5, 101, generator=gen) * 4
    # Padding columns with large logits: they must not take any probability mass.
    padded = torch.cat([real, torch.full((2, 5, 27), 50.0)], dim=-1).requires_grad_(True)
    real = real.clone().requires_grad_(True)
    targets = torch.randint(0, 101, (2, 5), generator=gen)
    targets[0, 0] = 100
    out = vocab_parallel_token_logprobs(padded, targets, vocab_size=101)
    unpadded = vocab_parallel_token_logprobs(real.detach(), targets)
    ref = naive_logprobs(real, targets)
    torch.testing.assert_close(out, unpadded, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(padded.grad[..., :101], real.grad, atol=1e-6, rtol=0)
    assert padded.grad[..., 101:].abs().sum() == 0


def test_invalid_targets_raise() -> None:
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_token_logprobs(logits, torch.tensor([0, 1, 9]), vocab_size=9)
    with pytest.raises(ValueError, match="loss mask"):
        vocab_parallel_token_logprobs(logits, torch.tensor([0, -100, 1]))
    with pytest.raises(ValueError, match="shape"):
        vocab_parallel_token_logprobs(logits, torch.tensor([0, 1]))


# ------------------------------------------------------------------ token_logprobs_from_hidden


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 1024])  # 7 does not divide T=48
def test_chunked_from_hidden_matches_naive(gen: torch.Generator, chunk_size: int) -> None:
    hidden0 = torch.randn(48, 24, generator=gen)
    weight0 = torch.randn(131, 24, generator=gen) * 0.5
    labels = torch.randint(0, 131, (48,), generator=gen)
    grad_out = torch.randn(48, generator=gen)

    hidden, weight = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    out = token_logprobs_from_hidden(hidden, weight, labels, chunk_size=chunk_size)
    (out * grad_out).sum().backward()

    h_ref, w_ref = hidden0.clone().requires_grad_(True), weight0.clone().requires_grad_(True)
    ref = naive_logprobs(h_ref @ w_ref.t(), labels)
    (ref * grad_out).sum().backward()

    assert out.dtype == torch.float32 and out.shape == (48,)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad, h_ref.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(weight.grad, w_ref.grad, atol=1e-5, rtol=0)


def test_chunked_from_hidden_padded_vocab_and_no_grad(gen: torch.Generator) -> None:
    hidden = torch.randn(10, 8, generator=gen)
    weight = torch.randn(40, 8, generator=gen)
    labels = torch.randint(0, 33, (10,), generator=gen)
    with torch.no_grad():
        out = token_logprobs_from_hidden(hidden, weight, labels, chunk_size=3, vocab_size=33)
    torch.testing.assert_close(out, naive_logprobs(hidden @ weight[:33].t(), labels), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        token_logprobs_from_hidden(hidden, weight, labels.clamp(min=33), vocab_size=33)


def test_chunked_from_hidden_only_hidden_requires_grad(gen: torch.Generator) -> None:
    hidden = torch.randn(9, 8, generator=gen, requires_grad=True)
    weight = torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 20, (9,), generator=gen)
    token_logprobs_from_hidden(hidden, weight, labels, chunk_size=4).sum().backward()
    h_ref = hidden.detach().clone().requires_grad_(True)
    naive_logprobs(h_ref @ weight.t(), labels).sum().backward()
    torch.testing.assert_close(hidden.grad, h_ref.grad, atol=1e-5, rtol=0)
    assert weight.grad is None


def test_chunked_from_hidden_bf16(gen: torch.Generator) -> None:
    hidden = torch.randn(12, 16, generator=gen).bfloat16()
    weight = torch.randn(30, 16, generator=gen).bfloat16()
    labels = torch.randint(0, 30, (12,), generator=gen)
    out = token_logprobs_from_hidden(hidden, weight, labels, chunk_size=5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logprobs(hidden @ weight.t(), labels), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ reductions and shift


def test_sequence_sums_and_counts() -> None:
    token_logps = torch.tensor([[-1.0, -2.0, float("-inf"), -4.0], [-0.5, -0.5, -0.5, float("nan")]])
    mask = torch.tensor([[False, True, False, True], [True, True, True, False]])
    sums, counts = sequence_logprob_sums(token_logps, mask)
    assert sums.dtype == torch.float32 and counts.dtype == torch.int64
    assert sums.tolist() == [-6.0, -1.5]
    assert counts.tolist() == [2, 3]
    sums, counts = sequence_logprob_sums(token_logps, torch.zeros_like(mask))
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]


def test_shift_for_next_token_convention() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 0], [20, 21, 22, 23, 24]])
    response = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    inputs, targets, mask = shift_for_next_token(ids, response)
    assert inputs.tolist() == [[10, 11, 12, 13], [20, 21, 22, 23]]
    assert targets.tolist() == [[11, 12, 13, 0], [21, 22, 23, 24]]
    # Position j predicts token j+1: the response tokens 12, 13 are read at positions 1, 2.
    assert mask.tolist() == [[False, True, True, False], [True, True, True, True]]
    with pytest.raises(ValueError, match="token 0"):
        shift_for_next_token(ids, torch.ones_like(response))


def test_shift_then_score_equals_per_token_softmax(gen: torch.Generator) -> None:
    """End to end on a toy 'model' (a logit table indexed by the previous token)."""
    table = torch.randn(15, 15, generator=gen)
    ids = torch.randint(0, 15, (3, 8), generator=gen)
    response = torch.zeros(3, 8, dtype=torch.bool)
    response[:, 4:] = True
    inputs, targets, mask = shift_for_next_token(ids, response)
    sums, counts = sequence_logprob_sums(vocab_parallel_token_logprobs(table[inputs], targets), mask)
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(4, 8):
            expected[b] += torch.log_softmax(table[ids[b, t - 1]], -1)[ids[b, t]]
    torch.testing.assert_close(sums, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [4, 4, 4]
