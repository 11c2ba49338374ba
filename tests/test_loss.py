"""Tests for nemo_infifpo.loss against METHOD.md and against TRL's own DPO code."""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nemo_infifpo.loss as loss_mod
from nemo_infifpo.loss import (
    FUSIONS,
    clip_source_scores,
    dpo_loss,
    infifpo_loss,
    sequence_scores,
)

F64 = torch.float64
HYP = settings(deadline=None, max_examples=60)

# --------------------------------------------------------------------------------------
# 1. METHOD.md test vector (beta = 2.5, length-normalised, policy at step 0: s_p = s_p0)
# --------------------------------------------------------------------------------------

BETA_TV = 2.5
P0_W = -0.06974949687719345
P0_L = -0.13944919407367706
SRC_W = [-0.2378779649734497, -0.2621479332447052, -0.3679310381412506]
SRC_L = [-0.25559499859809875, -0.2677876949310303, -0.3368484675884247]
TOL = 1e-7  # METHOD.md prints 7-8 decimals: rounding error <= 5e-8, well inside 1e-7


def _vector():
    p0w = torch.tensor([P0_W], dtype=F64)
    p0l = torch.tensor([P0_L], dtype=F64)
    return p0w, p0l, torch.tensor([SRC_W], dtype=F64), torch.tensor([SRC_L], dtype=F64)


def _run_vector(**kw):
    p0w, p0l, sw, sl = _vector()
    # Step 0: the policy's scores are p0's scores.
    return infifpo_loss(p0w.clone(), p0l.clone(), p0w, p0l, sw, sl, beta=BETA_TV, **kw)


def _h(metrics):
    # h = beta*((s_p(y_w) - f(y_w)) - (s_p(y_l) - f(y_l))) = reward_chosen - reward_rejected
    return (metrics["reward_chosen"] - metrics["reward_rejected"]).item()


def test_vector_clipping_and_margins():
    p0w, p0l, sw, sl = _vector()
    c_w, c_l = clip_source_scores(sw, sl, p0w, p0l)
    assert c_w.tolist()[0] == pytest.approx([-0.0697495] * 3, abs=TOL)  # all raised to s_p0
    assert torch.equal(c_w, p0w[:, None].expand(1, 3))
    assert torch.equal(c_l, sl)  # unchanged: all already below s_p0(y_l)
    margins = (c_w - c_l).tolist()[0]
    assert margins == pytest.approx([0.18584550, 0.19803820, 0.26709897], abs=TOL)
    assert P0_W - P0_L == pytest.approx(0.06969970, abs=TOL)  # pivot candidate's margin
    _, m = _run_vector(fusion="max_margin")
    assert m["clipped_fraction"].item() == pytest.approx(0.5)  # 3 of the 6 source scores


def test_vector_max_margin():
    losses, m = _run_vector(fusion="max_margin")
    assert m["selected"].tolist() == [2]
    assert m["weights"].tolist() == [[0.0, 0.0, 1.0, 0.0]]
    assert m["fused_chosen"].item() == pytest.approx(P0_W, abs=TOL)
    assert m["fused_rejected"].item() == pytest.approx(SRC_L[2], abs=TOL)
    assert _h(m) == pytest.approx(-0.49349818, abs=TOL)
    assert m["margin"].item() == pytest.approx(-0.49349818, abs=TOL)
    assert losses.item() == pytest.approx(0.97003484, abs=TOL)
    assert m["accuracy"].tolist() == [0.0]


def test_vector_mean_with_pivot():
    losses, m = _run_vector(fusion="mean")
    assert m["selected"].tolist() == [-1]
    assert m["weights"].shape == (1, 4)
    assert m["fused_rejected"].item() == pytest.approx(-0.24992009, abs=TOL)
    assert _h(m) == pytest.approx(-0.27617724, abs=TOL)
    assert losses.item() == pytest.approx(0.84073988, abs=TOL)


def test_vector_mean_sources_only():
    losses, m = _run_vector(fusion="mean", include_pivot=False)
    assert m["weights"].shape == (1, 3)
    assert m["fused_rejected"].item() == pytest.approx(-0.28674372, abs=TOL)
    assert _h(m) == pytest.approx(-0.36823632, abs=TOL)
    assert losses.item() == pytest.approx(0.89412018, abs=TOL)


def test_vector_confidence_with_pivot():
    losses, m = _run_vector(fusion="confidence")
    assert m["weights"].shape == (1, 2, 4)
    assert m["fused_rejected"].item() == pytest.approx(-0.22488972, abs=TOL)
    assert _h(m) == pytest.approx(-0.21360133, abs=TOL)
    assert losses.item() == pytest.approx(0.80564023, abs=TOL)
    # Weights come from the UNCLIPPED scores (sources + pivot), not the clipped ones.
    raw_w = torch.tensor(SRC_W + [P0_W], dtype=F64)
    conf = 1.0 / (-raw_w + 1e-6)
    torch.testing.assert_close(m["weights"][0, 0], conf / conf.sum(), rtol=0, atol=1e-15)


def test_vector_max_margin_no_clip_with_pivot():
    losses, m = _run_vector(fusion="max_margin", clip=False)
    assert m["selected"].tolist() == [3]  # the pivot: 0.06969970 beats every raw source margin
    assert m["clipped_fraction"].tolist() == [0.0]
    assert m["fused_rejected"].item() == pytest.approx(P0_L, abs=TOL)
    assert _h(m) == pytest.approx(0.0, abs=TOL)
    assert losses.item() == pytest.approx(math.log(2), abs=TOL)
    assert losses.item() == pytest.approx(0.69314718, abs=TOL)


def test_vector_max_margin_no_clip_sources_only():
    losses, m = _run_vector(fusion="max_margin", clip=False, include_pivot=False)
    assert m["selected"].tolist() == [0]
    assert SRC_W[0] - SRC_L[0] == pytest.approx(0.01771703, abs=TOL)  # raw margin of source 0
    assert m["fused_rejected"].item() == pytest.approx(SRC_L[0], abs=TOL)
    assert _h(m) == pytest.approx(0.12995666, abs=TOL)
    assert losses.item() == pytest.approx(0.63027846, abs=TOL)


# --------------------------------------------------------------------------------------
# 2. DPO limit against TRL's own code
# --------------------------------------------------------------------------------------
#
# TRL 1.16.0 has no standalone DPO-loss function: the loss lives inside the method
# `DPOTrainer._compute_loss(self, model, inputs, return_outputs)`, which runs the model,
# sums per-token log-probs, reads precomputed reference log-probs from `inputs`, and then
# applies the loss. Building a real DPOTrainer needs a model, tokenizer and dataset, so we
# call that unbound method with:
#   * `self`  = a SimpleNamespace whose loss attributes are copied from a real `DPOConfig`
#     exactly as `DPOTrainer.__init__` copies them (beta, loss_type, loss_weights, ld_alpha,
#     f_divergence_type, label_smoothing, use_weighting, precompute_ref_log_probs=True), plus
#     an identity `accelerator` (single process: gather = identity) and metric buffers;
#   * `model` = a callable returning what TRL's fused LM head returns: `log_probs` [2B, L]
#     whose row sums are the given policy sequence log-probs (whole sum in the first slot,
#     zeros elsewhere -- TRL sums over dim 1), plus zero entropy/mean_logits/is_top1 that only
#     feed TRL's logging;
#   * `inputs` = `input_ids`/`attention_mask`/`completion_mask` for [chosen..., rejected...]
#     rows and the reference log-probs in `ref_chosen_logps`/`ref_rejected_logps`.
# The returned loss is TRL's batch mean; since each row's loss depends only on its own
# scores, per-row values come from calling it once per row, and per-row gradients from
# B * d(mean)/d(score).


def _trl_dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, loss_type, tokens=None):
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    with warnings.catch_warnings():
        # transformers' TrainingArguments warns about a deprecated field we never set.
        warnings.simplefilter("ignore", FutureWarning)
        args = DPOConfig(
            output_dir="unused-trl-output", beta=beta, loss_type=[loss_type], precompute_ref_log_probs=True,
            use_cpu=True, bf16=False, report_to=[],
        )
    fake_trainer = SimpleNamespace(
        args=args,
        beta=args.beta,
        precompute_ref_logps=args.precompute_ref_log_probs,
        loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type,
        label_smoothing=args.label_smoothing,
        use_weighting=args.use_weighting,
        aux_loss_enabled=False,
        model=SimpleNamespace(training=False),  # "eval" mode: skips token counting
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    batch = policy_chosen.shape[0]
    if tokens is None:  # completion token counts of [chosen..., rejected...]
        tokens = torch.ones(2 * batch, dtype=torch.long)
    length = int(tokens.max())
    completion_mask = torch.zeros(2 * batch, length + 1, dtype=torch.long)  # column 0 = prompt
    for row, n in enumerate(tokens.tolist()):
        completion_mask[row, 1 : 1 + n] = 1
    seq_logps = torch.cat([policy_chosen, policy_rejected])
    per_token = torch.cat([seq_logps[:, None], seq_logps.new_zeros(2 * batch, length - 1)], dim=1)

    def model(**_kwargs):
        zeros = torch.zeros(2 * batch, length, dtype=seq_logps.dtype)
        return SimpleNamespace(
            log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
        )

    inputs = {
        "input_ids": torch.zeros(2 * batch, length + 1, dtype=torch.long),
        "attention_mask": torch.ones(2 * batch, length + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return DPOTrainer._compute_loss(fake_trainer, model, inputs, return_outputs=False)


def _trl_per_row_and_grads(pc, pr, rc, rr, *, beta, loss_type="sigmoid", tokens_w=None, tokens_l=None):
    batch = pc.shape[0]
    per_row = []
    for i in range(batch):
        tok = None if tokens_w is None else torch.stack([tokens_w[i], tokens_l[i]])
        per_row.append(
            _trl_dpo(pc[i : i + 1], pr[i : i + 1], rc[i : i + 1], rr[i : i + 1], beta=beta, loss_type=loss_type,
                     tokens=tok).detach()
        )
    pc_g, pr_g = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    tok = None if tokens_w is None else torch.cat([tokens_w, tokens_l])
    mean = _trl_dpo(pc_g, pr_g, rc, rr, beta=beta, loss_type=loss_type, tokens=tok)
    g_c, g_r = torch.autograd.grad(mean, [pc_g, pr_g])
    return torch.stack(per_row).reshape(batch), mean.detach(), batch * g_c, batch * g_r


def _dpo_batch(seed, batch=6):
    gen = torch.Generator().manual_seed(seed)
    # Sums of token log-probs (length_norm off): negative, tens to hundreds.
    pc, pr, rc, rr = (-torch.rand(batch, generator=gen, dtype=F64) * 200 for _ in range(4))
    return pc, pr, rc, rr


@pytest.mark.parametrize("include_pivot", [True, False])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_dpo_limit_matches_trl_sigmoid(fusion, include_pivot):
    pc, pr, rc, rr = _dpo_batch(seed=1)
    # Small policy moves away from p0 keep losses in an interesting range.
    pc, pr = rc + (pc - rc) * 0.01, rr + (pr - rr) * 0.01
    beta = 0.1
    trl_rows, trl_mean, trl_gc, trl_gr = _trl_per_row_and_grads(pc, pr, rc, rr, beta=beta)

    pc_g, pr_g = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours, _ = infifpo_loss(pc_g, pr_g, rc, rr, rc[:, None], rr[:, None], beta=beta, fusion=fusion,
                           include_pivot=include_pivot)
    g_c, g_r = torch.autograd.grad(ours.sum(), [pc_g, pr_g])

    torch.testing.assert_close(ours.detach(), trl_rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.detach().mean(), trl_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_c, trl_gc, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_r, trl_gr, rtol=0, atol=1e-12)


def test_dpo_loss_matches_trl_sigmoid_and_rewards():
    pc, pr, rc, rr = _dpo_batch(seed=2)
    pc, pr = rc + (pc - rc) * 0.02, rr + (pr - rr) * 0.02
    beta = 0.25
    trl_rows, _, trl_gc, trl_gr = _trl_per_row_and_grads(pc, pr, rc, rr, beta=beta)
    pc_g, pr_g = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    ours, m = dpo_loss(pc_g, pr_g, rc, rr, beta=beta)
    g_c, g_r = torch.autograd.grad(ours.sum(), [pc_g, pr_g])
    torch.testing.assert_close(ours.detach(), trl_rows, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_c, trl_gc, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_r, trl_gr, rtol=0, atol=1e-12)
    # TRL's logged rewards are beta * (policy - reference): same definition as ours here.
    torch.testing.assert_close(m["reward_chosen"], beta * (pc - rc), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["reward_rejected"], beta * (pr - rr), rtol=0, atol=1e-12)


def test_ipo_limit_matches_trl_ipo_with_length_norm():
    # TRL's "ipo" divides each sequence log-ratio by the completion's token count. With
    # sources = {p0} and length_norm on (policy and p0 share the pivot's tokenizer, so the
    # same counts), InfiFPO-IPO's h/beta is exactly that length-averaged log-ratio gap.
    pc, pr, rc, rr = _dpo_batch(seed=3)
    pc, pr = rc + (pc - rc) * 0.05, rr + (pr - rr) * 0.05
    gen = torch.Generator().manual_seed(3)
    tokens_w = torch.randint(1, 40, (pc.shape[0],), generator=gen)
    tokens_l = torch.randint(1, 40, (pc.shape[0],), generator=gen)
    beta = 0.5
    trl_rows, _, trl_gc, trl_gr = _trl_per_row_and_grads(
        pc, pr, rc, rr, beta=beta, loss_type="ipo", tokens_w=tokens_w, tokens_l=tokens_l
    )

    s_rc = sequence_scores(rc, tokens_w, length_norm=True)
    s_rr = sequence_scores(rr, tokens_l, length_norm=True)
    for fusion in FUSIONS:
        pc_g, pr_g = pc.clone().requires_grad_(), pr.clone().requires_grad_()
        s_pc = sequence_scores(pc_g, tokens_w, length_norm=True)
        s_pr = sequence_scores(pr_g, tokens_l, length_norm=True)
        ours, _ = infifpo_loss(s_pc, s_pr, s_rc, s_rr, s_rc[:, None], s_rr[:, None], beta=beta, fusion=fusion,
                               loss_type="ipo")
        g_c, g_r = torch.autograd.grad(ours.sum(), [pc_g, pr_g])
        torch.testing.assert_close(ours.detach(), trl_rows, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_c, trl_gc, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_r, trl_gr, rtol=1e-10, atol=1e-12)


def test_dpo_loss_is_one_code_path(monkeypatch):
    calls = []
    real = loss_mod.infifpo_loss

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "infifpo_loss", spy)
    pc, pr, rc, rr = _dpo_batch(seed=4, batch=3)
    loss_mod.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert len(calls) == 1
    assert calls[0]["include_pivot"] is False and calls[0]["loss_type"] == "ipo"


# --------------------------------------------------------------------------------------
# 3. Properties (hypothesis)
# --------------------------------------------------------------------------------------

# Per-token mean log-probs: <= 0, not absurdly small.
score = st.floats(min_value=-20.0, max_value=0.0, allow_nan=False, allow_infinity=False)


@st.composite
def score_batches(draw, min_sources=0):
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(min_sources, 4))

    def vec(shape):
        flat = draw(st.lists(score, min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(flat, dtype=F64).reshape(shape)

    return {
        "policy_chosen": vec((batch,)),
        "policy_rejected": vec((batch,)),
        "ref_chosen": vec((batch,)),
        "ref_rejected": vec((batch,)),
        "source_chosen": vec((batch, n)),
        "source_rejected": vec((batch, n)),
    }


options = st.fixed_dictionaries(
    {
        "fusion": st.sampled_from(FUSIONS),
        "clip": st.booleans(),
        "include_pivot": st.booleans(),
        "loss_type": st.sampled_from(["sigmoid", "ipo"]),
        "beta": st.floats(min_value=0.01, max_value=5.0),
    }
)


def _k(batch, opts):
    return batch["source_chosen"].shape[1] + int(opts["include_pivot"])


@HYP
@given(batch=score_batches(), opts=options)
def test_gradient_flows_only_into_policy(batch, opts):
    if _k(batch, opts) == 0:
        opts = {**opts, "include_pivot": True}
    tensors = {k: v.clone().requires_grad_() for k, v in batch.items()}
    losses, metrics = infifpo_loss(**tensors, **opts)
    losses.sum().backward()
    for name in ("policy_chosen", "policy_rejected"):
        assert tensors[name].grad is not None and torch.isfinite(tensors[name].grad).all()
    for name in ("ref_chosen", "ref_rejected", "source_chosen", "source_rejected"):
        grad = tensors[name].grad
        assert grad is None or not grad.any(), name
    assert all(not v.requires_grad for v in metrics.values())


@HYP
@given(batch=score_batches(min_sources=1))
def test_clipping_never_inverts_a_preference(batch):
    s_w, s_l = batch["source_chosen"], batch["source_rejected"]
    c_w, c_l = clip_source_scores(s_w, s_l, batch["ref_chosen"], batch["ref_rejected"])
    prefers = s_w > s_l
    assert (c_w[prefers] > c_l[prefers]).all()
    # And clipping only ever moves a source towards p0's side (Eq. 11).
    assert (c_w >= s_w).all() and (c_l <= s_l).all()
    assert (c_w >= batch["ref_chosen"][:, None]).all() and (c_l <= batch["ref_rejected"][:, None]).all()
    # clip=False is the identity.
    u_w, u_l = clip_source_scores(s_w, s_l, batch["ref_chosen"], batch["ref_rejected"], clip=False)
    assert torch.equal(u_w, s_w) and torch.equal(u_l, s_l)


@HYP
@given(batch=score_batches(), opts=options)
def test_weights_nonnegative_and_sum_to_one(batch, opts):
    k = _k(batch, opts)
    if k == 0:
        return
    _, m = infifpo_loss(**batch, **opts)
    w = m["weights"]
    rows = batch["policy_chosen"].shape[0]
    expected_shape = (rows, 2, k) if opts["fusion"] == "confidence" else (rows, k)
    assert w.shape == expected_shape
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(w.shape[:-1], dtype=F64), rtol=0, atol=1e-12)
    # f is a gamma-weighted sum of the candidates, so it lies within their range.
    c_w, c_l = clip_source_scores(batch["source_chosen"], batch["source_rejected"], batch["ref_chosen"],
                                  batch["ref_rejected"], clip=opts["clip"])
    if opts["include_pivot"]:
        c_w = torch.cat([c_w, batch["ref_chosen"][:, None]], dim=1)
        c_l = torch.cat([c_l, batch["ref_rejected"][:, None]], dim=1)
    for fused, cand in ((m["fused_chosen"], c_w), (m["fused_rejected"], c_l)):
        assert (fused >= cand.min(dim=1).values - 1e-12).all() and (fused <= cand.max(dim=1).values + 1e-12).all()
    assert m["selected"].dtype == torch.long
    if opts["fusion"] != "max_margin":
        assert (m["selected"] == -1).all()


@HYP
@given(
    data=st.data(),
    batch=st.integers(1, 4),
    n=st.integers(1, 5),
    include_pivot=st.booleans(),
)
def test_max_margin_picks_first_of_tied_maxima(data, batch, n, include_pivot):
    # Dyadic scores on a coarse grid: margins are exact in float64 and ties are frequent.
    grid = st.integers(-8, 0).map(lambda v: v / 4)
    k = n + int(include_pivot)
    rows_w = [[data.draw(grid) for _ in range(n)] for _ in range(batch)]
    rows_l = [[data.draw(grid) for _ in range(n)] for _ in range(batch)]
    ref_w = [data.draw(grid) for _ in range(batch)]
    ref_l = [data.draw(grid) for _ in range(batch)]
    t = lambda x: torch.tensor(x, dtype=F64)  # noqa: E731
    _, m = infifpo_loss(t(ref_w), t(ref_l), t(ref_w), t(ref_l), t(rows_w), t(rows_l), beta=1.0,
                        fusion="max_margin", clip=False, include_pivot=include_pivot)
    for r in range(batch):
        margins = [w - l for w, l in zip(rows_w[r], rows_l[r])]
        if include_pivot:
            margins.append(ref_w[r] - ref_l[r])
        assert len(margins) == k
        assert m["selected"][r].item() == margins.index(max(margins))  # list.index = first
        assert m["weights"][r].tolist() == [float(i == margins.index(max(margins))) for i in range(k)]


def test_max_margin_tie_explicit():
    # Two sources with equal margin and a pivot with the same margin -> source 0 wins.
    ref_w, ref_l = torch.tensor([-1.0], dtype=F64), torch.tensor([-2.0], dtype=F64)
    sw = torch.tensor([[-1.5, -3.0]], dtype=F64)
    sl = torch.tensor([[-2.5, -4.0]], dtype=F64)
    _, m = infifpo_loss(ref_w, ref_l, ref_w, ref_l, sw, sl, beta=1.0, clip=False)
    assert m["selected"].tolist() == [0]


@HYP
@given(batch=score_batches(), opts=options)
def test_ipo_matches_its_formula(batch, opts):
    if _k(batch, opts) == 0:
        return
    opts = {**opts, "loss_type": "ipo"}
    beta = opts["beta"]
    losses, m = infifpo_loss(**batch, **opts)
    h = beta * ((batch["policy_chosen"] - m["fused_chosen"]) - (batch["policy_rejected"] - m["fused_rejected"]))
    torch.testing.assert_close(losses, (h / beta - 1 / (2 * beta)) ** 2, rtol=1e-9, atol=1e-9)
    sig, m_sig = infifpo_loss(**batch, **{**opts, "loss_type": "sigmoid"})
    torch.testing.assert_close(sig, -torch.nn.functional.logsigmoid(h), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m_sig["margin"], h, rtol=1e-9, atol=1e-9)


@HYP
@given(batch=score_batches(), opts=options)
def test_step0_with_p0_as_only_source_gives_ln2(batch, opts):
    rc, rr = batch["ref_chosen"], batch["ref_rejected"]
    losses, m = infifpo_loss(rc.clone(), rr.clone(), rc, rr, rc[:, None], rr[:, None],
                             **{**opts, "loss_type": "sigmoid"})
    torch.testing.assert_close(losses, torch.full_like(rc, math.log(2)), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["fused_chosen"], rc, rtol=0, atol=1e-12)
    torch.testing.assert_close(m["fused_rejected"], rr, rtol=0, atol=1e-12)


@HYP
@given(batch=score_batches(), opts=options)
def test_step0_with_clipping_never_beats_ln2(batch, opts):
    # METHOD.md limit 2: at s_p = s_p0 with clipping, h = -beta(delta_w + delta_l) <= 0.
    if _k(batch, opts) == 0:
        return
    opts = {**opts, "clip": True, "loss_type": "sigmoid"}
    b = {**batch, "policy_chosen": batch["ref_chosen"].clone(), "policy_rejected": batch["ref_rejected"].clone()}
    losses, m = infifpo_loss(**b, **opts)
    assert (m["fused_chosen"] >= batch["ref_chosen"] - 1e-12).all()
    assert (m["fused_rejected"] <= batch["ref_rejected"] + 1e-12).all()
    assert (m["margin"] <= 1e-12).all()
    assert (losses >= math.log(2) - 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sigmoid_loss_is_stable_for_large_margins(dtype):
    # h = beta * (policy margin) = -/+ 1000: -log(sigmoid(h)) must be ~1000 / ~0, never inf.
    ref = torch.zeros(2, dtype=dtype)
    pc = torch.tensor([-1000.0, 1000.0], dtype=dtype, requires_grad=True)
    losses, _ = dpo_loss(pc, ref.clone(), ref, ref, beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    torch.testing.assert_close(losses, torch.tensor([1000.0, 0.0], dtype=dtype))


def test_clipped_fraction_and_accuracy_metrics():
    ref_w, ref_l = torch.tensor([-1.0, -1.0], dtype=F64), torch.tensor([-2.0, -2.0], dtype=F64)
    # row 0: source 0 chosen raised, source 1 rejected lowered -> 2 of 4 changed
    # row 1: nothing changed
    sw = torch.tensor([[-1.5, -0.5], [-0.5, -0.7]], dtype=F64)
    sl = torch.tensor([[-3.0, -1.0], [-2.5, -3.0]], dtype=F64)
    pc, pr = torch.tensor([0.0, -5.0], dtype=F64), torch.tensor([-5.0, 0.0], dtype=F64)
    _, m = infifpo_loss(pc, pr, ref_w, ref_l, sw, sl, beta=1.0, fusion="mean")
    assert m["clipped_fraction"].tolist() == [0.5, 0.0]
    assert m["accuracy"].tolist() == [1.0, 0.0]
    _, m = infifpo_loss(pc, pr, ref_w, ref_l, sw, sl, beta=1.0, fusion="mean", clip=False)
    assert m["clipped_fraction"].tolist() == [0.0, 0.0]
    # N = 0 with the pivot: nothing to clip.
    empty = torch.zeros(2, 0, dtype=F64)
    losses, m = infifpo_loss(pc, pr, ref_w, ref_l, empty, empty, beta=1.0)
    assert m["clipped_fraction"].tolist() == [0.0, 0.0]
    assert m["selected"].tolist() == [0, 0]
    torch.testing.assert_close(m["fused_chosen"], ref_w)


def test_sequence_scores():
    sums = torch.tensor([-10.0, -3.0], dtype=F64)
    counts = torch.tensor([4, 3])
    out = sequence_scores(sums, counts, length_norm=True)
    assert out.dtype == F64 and out.tolist() == [-2.5, -1.0]
    assert torch.equal(sequence_scores(sums, counts, length_norm=False), sums)
    out32 = sequence_scores(sums.to(torch.bfloat16), counts, length_norm=True)
    assert out32.dtype == torch.float32
    # Counts are only needed (and only validated) when normalising.
    assert torch.equal(sequence_scores(sums, torch.tensor([0, 0]), length_norm=False), sums)


# --------------------------------------------------------------------------------------
# 4. Errors
# --------------------------------------------------------------------------------------


def _good(batch=3, n=2):
    gen = torch.Generator().manual_seed(0)
    v = lambda *shape: -torch.rand(*shape, generator=gen, dtype=F64)  # noqa: E731
    return dict(
        policy_chosen=v(batch), policy_rejected=v(batch), ref_chosen=v(batch), ref_rejected=v(batch),
        source_chosen=v(batch, n), source_rejected=v(batch, n),
    )


@pytest.mark.parametrize(
    "change, kwargs, match",
    [
        ({"policy_chosen": torch.zeros(3, 1)}, {}, r"policy_chosen must be 1-D with shape \[B\], got shape \(3, 1\)"),
        ({"ref_rejected": torch.tensor(0.0)}, {}, r"ref_rejected must be 1-D"),
        ({"source_chosen": torch.zeros(3)}, {}, r"source_chosen must be 2-D with shape \[B, N\]"),
        ({"source_rejected": torch.zeros(3, 2, 1)}, {}, r"source_rejected must be 2-D"),
        ({"policy_rejected": torch.zeros(4)}, {}, r"batch size mismatch: policy_rejected has 4 rows .* 3"),
        ({"ref_chosen": torch.zeros(2)}, {}, r"batch size mismatch: ref_chosen"),
        ({"source_chosen": torch.zeros(2, 2)}, {}, r"batch size mismatch: source_chosen"),
        ({"source_rejected": torch.zeros(3, 1)}, {}, r"number of sources N differs: source_chosen has 2, source_rejected has 1"),
        ({"source_chosen": torch.zeros(3, 0), "source_rejected": torch.zeros(3, 0)}, {"include_pivot": False},
         r"no fusion candidates"),
        ({}, {"fusion": "geometric"}, r"unknown fusion 'geometric'; allowed values: 'max_margin', 'mean', 'confidence'"),
        ({}, {"loss_type": "hinge"}, r"unknown loss_type 'hinge'; allowed values: 'sigmoid', 'ipo'"),
        ({}, {"beta": 0.0}, r"beta must be a positive"),
        ({}, {"beta": -1.0}, r"beta must be a positive"),
        ({}, {"beta": float("nan")}, r"beta must be a positive"),
        ({}, {"eps": 0.0}, r"eps must be a positive"),
    ],
)
def test_errors(change, kwargs, match):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        infifpo_loss(**args, **{"beta": 1.0, **kwargs})


@pytest.mark.parametrize(
    "name, rows, value",
    [
        ("policy_chosen", [0], float("nan")),
        ("ref_rejected", [2], float("inf")),
        ("source_rejected", [1, 2], float("nan")),
        ("source_chosen", [0], float("-inf")),
    ],
)
def test_non_finite_inputs_name_argument_and_rows(name, rows, value):
    args = _good()
    t = args[name].clone()
    for r in rows:
        if t.ndim == 2:
            t[r, -1] = value
        else:
            t[r] = value
    args[name] = t
    shown = ", ".join(map(str, rows))
    with pytest.raises(ValueError, match=rf"{name} has non-finite values \(nan/inf\) in row\(s\) {shown}$"):
        infifpo_loss(**args, beta=1.0)


def test_errors_via_dpo_loss_and_sequence_scores():
    g = _good()
    with pytest.raises(ValueError, match="beta must be a positive"):
        dpo_loss(g["policy_chosen"], g["policy_rejected"], g["ref_chosen"], g["ref_rejected"], beta=0)
    with pytest.raises(ValueError, match="ref_chosen and ref_rejected must be 1-D"):
        dpo_loss(g["policy_chosen"], g["policy_rejected"], g["source_chosen"], g["ref_rejected"], beta=1)
    with pytest.raises(ValueError, match=r"token_counts must be > 0"):
        sequence_scores(torch.tensor([-1.0, -2.0]), torch.tensor([3, 0]), length_norm=True)
    with pytest.raises(ValueError, match=r"token_counts shape \(3,\) does not match logp_sums shape \(2,\)"):
        sequence_scores(torch.tensor([-1.0, -2.0]), torch.tensor([3, 1, 1]), length_norm=True)


# --------------------------------------------------------------------------------------
# 5. dtypes and devices
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_half_inputs_compute_in_float32(half, fusion):
    args32 = {k: v.float() for k, v in _good(batch=5, n=3).items()}
    args_half = {k: v.to(half) for k, v in args32.items()}
    losses, m = infifpo_loss(**args_half, beta=2.5, fusion=fusion)
    assert losses.dtype == torch.float32
    for key in ("reward_chosen", "reward_rejected", "margin", "accuracy", "fused_chosen", "fused_rejected",
                "weights", "clipped_fraction"):
        assert m[key].dtype == torch.float32, key
    # Identical to computing in float32 on the upcast values ...
    upcast = {k: v.float() for k, v in args_half.items()}
    ref_losses, _ = infifpo_loss(**upcast, beta=2.5, fusion=fusion)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=0)
    # ... and close to the float32 computation on the original values (half rounding only).
    full, _ = infifpo_loss(**args32, beta=2.5, fusion=fusion)
    torch.testing.assert_close(losses, full, rtol=0.02, atol=0.02)
    # Gradient reaches a half-precision policy, in its own dtype.
    pc = args_half["policy_chosen"].clone().requires_grad_()
    out, _ = infifpo_loss(**{**args_half, "policy_chosen": pc}, beta=2.5, fusion=fusion)
    out.sum().backward()
    assert pc.grad is not None and pc.grad.dtype == half


def test_float64_stays_float64_and_float32_stays_float32():
    args = _good()
    losses, m = infifpo_loss(**args, beta=1.0, fusion="confidence")
    assert losses.dtype == F64
    assert all(v.dtype == F64 for k, v in m.items() if k != "selected")
    assert m["selected"].dtype == torch.long
    losses, m = infifpo_loss(**{k: v.float() for k, v in args.items()}, beta=1.0)
    assert losses.dtype == torch.float32 and m["weights"].dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fusion", FUSIONS)
def test_runs_on_cuda_and_matches_cpu(fusion):
    args = _good()
    cpu_losses, cpu_m = infifpo_loss(**args, beta=1.0, fusion=fusion)
    gpu_losses, gpu_m = infifpo_loss(**{k: v.cuda() for k, v in args.items()}, beta=1.0, fusion=fusion)
    assert gpu_losses.is_cuda and gpu_m["selected"].is_cuda
    torch.testing.assert_close(gpu_losses.cpu(), cpu_losses)
    assert torch.equal(gpu_m["selected"].cpu(), cpu_m["selected"])
