"""InfiFPO, DPO and IPO losses on per-sequence scores (pure torch).

This module is the code form of ``METHOD.md`` (the project's statement of the math in
Gu et al., arXiv 2505.13878). Every function works on *sequence scores* that the caller has
already computed, one number per row and model, in the chosen normalisation:

==========================  ===============================================================
METHOD.md                    code
==========================  ===============================================================
Sequence scores, Eq. 10     :func:`sequence_scores` -- ``s_m(y) = S_m(y) / T_m(y)`` or ``S_m(y)``
Probability clipping, 11    :func:`clip_source_scores` / ``_clip`` --
                            ``c_i(y_w) = max(s_i(y_w), s_p0(y_w))``,
                            ``c_i(y_l) = min(s_i(y_l), s_p0(y_l))``
Candidate set, Eq. 5        ``_candidates`` -- the N sources, then the pivot p0 LAST with
                            ``c_p0 = s_p0`` (``include_pivot=True``)
Fusion, Eq. 6/7             ``f(y) = sum_i gamma_i c_i(y)`` (``_fused``)
  max_margin, Eq. 12        ``_fuse_max_margin`` -- one-hot on the largest
                            ``c_i(y_w) - c_i(y_l)``, ties to the lowest index
  mean, Eq. 23              ``_fuse_mean`` -- ``gamma_i = 1/K``
  confidence, Eq. 24-25     ``_fuse_confidence`` -- ``w_i(y) = conf_i(y) / sum_j conf_j(y)``,
                            ``conf_i(y) = 1 / (-s_i(y) + eps)`` from UNCLIPPED scores,
                            applied to the clipped ones
Loss, Eq. 13                ``h = beta * ((s_p(y_w) - f(y_w)) - (s_p(y_l) - f(y_l)))``
  sigmoid                   ``-log sigmoid(h)`` (``_per_row_loss``)
  ipo, Eq. 22               ``(h / beta - 1 / (2 beta))**2``
DPO limit                   :func:`dpo_loss` -- sources = {p0}, no pivot candidate
==========================  ===============================================================

Only the trained pivot's scores (``policy_*``) carry gradient: the reference (p0) and the
source scores are constants of the objective and are detached here, whatever the caller
passes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "FUSIONS",
    "LOSS_TYPES",
    "clip_source_scores",
    "dpo_loss",
    "infifpo_loss",
    "sequence_scores",
]

FUSIONS = ("max_margin", "mean", "confidence")
LOSS_TYPES = ("sigmoid", "ipo")

# How many offending row indices a non-finite error message lists before eliding.
_MAX_ROWS_IN_MESSAGE = 10


# --------------------------------------------------------------------------------------
# dtype / validation helpers
# --------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, otherwise float32.

    bf16/fp16 scores are upcast: margins between sequence log-probs are small differences of
    large-ish numbers, which half precision cannot resolve.
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _require_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def _require_finite(name: str, t: torch.Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        if t.ndim > 1:
            bad = bad.flatten(1).any(dim=1)
        rows = torch.nonzero(bad).flatten().tolist()
        shown = ", ".join(str(r) for r in rows[:_MAX_ROWS_IN_MESSAGE])
        more = f" (and {len(rows) - _MAX_ROWS_IN_MESSAGE} more)" if len(rows) > _MAX_ROWS_IN_MESSAGE else ""
        raise ValueError(f"{name} has non-finite values (nan/inf) in row(s) {shown}{more}")


def _validate(
    policy_chosen, policy_rejected, ref_chosen, ref_rejected, source_chosen, source_rejected,
    *, beta, fusion, include_pivot, loss_type, eps, check_finite=True,
) -> None:
    if fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {fusion!r}; allowed values: {', '.join(map(repr, FUSIONS))}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; allowed values: {', '.join(map(repr, LOSS_TYPES))}")
    try:
        beta_f = float(beta)
    except (TypeError, ValueError):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}") from None
    if not (math.isfinite(beta_f) and beta_f > 0):
        raise ValueError(f"beta must be a positive finite number (beta > 0), got {beta!r}")
    if not (math.isfinite(float(eps)) and float(eps) > 0):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")

    per_row = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    per_source = {"source_chosen": source_chosen, "source_rejected": source_rejected}
    for name, t in {**per_row, **per_source}.items():
        _require_tensor(name, t)
    for name, t in per_row.items():
        if t.ndim != 1:
            raise ValueError(f"{name} must be 1-D with shape [B], got shape {tuple(t.shape)}")
    for name, t in per_source.items():
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D with shape [B, N], got shape {tuple(t.shape)}")

    batch = policy_chosen.shape[0]
    for name, t in {**per_row, **per_source}.items():
        if t.shape[0] != batch:
            raise ValueError(
                f"batch size mismatch: {name} has {t.shape[0]} rows but policy_chosen has {batch}"
            )
    n_chosen, n_rejected = source_chosen.shape[1], source_rejected.shape[1]
    if n_chosen != n_rejected:
        raise ValueError(
            f"number of sources N differs: source_chosen has {n_chosen}, source_rejected has {n_rejected}"
        )
    if n_chosen == 0 and not include_pivot:
        raise ValueError("no fusion candidates: N = 0 sources and include_pivot=False")

    if check_finite:  # reads the values back to the host: a GPU sync per tensor
        for name, t in {**per_row, **per_source}.items():
            _require_finite(name, t)


# --------------------------------------------------------------------------------------
# METHOD.md building blocks
# --------------------------------------------------------------------------------------


def sequence_scores(logp_sums: torch.Tensor, token_counts, *, length_norm: bool, check_counts: bool = True) -> torch.Tensor:
    """Sequence score ``s_m(y)`` from a log-prob sum ``S_m(y)`` and token count ``T_m(y)`` (Eq. 10).

    ``length_norm=True`` gives the mean token log-prob ``S / T``; otherwise ``S`` itself.
    The result is floating point (float64 stays float64, anything else becomes float32).
    Each model must be normalised by *its own* token count: that is what removes the
    tokenizer bias between models.
    """
    _require_tensor("logp_sums", logp_sums)
    dtype = _compute_dtype(logp_sums)
    sums = logp_sums.to(dtype)
    if not length_norm:
        return sums
    counts = torch.as_tensor(token_counts, device=logp_sums.device)
    if counts.shape != logp_sums.shape:
        raise ValueError(
            f"token_counts shape {tuple(counts.shape)} does not match logp_sums shape {tuple(logp_sums.shape)}"
        )
    if check_counts and not bool((counts > 0).all()):
        raise ValueError("token_counts must be > 0 when length_norm=True (an empty response has no mean log-prob)")
    return sums / counts.to(dtype)


def _clip(source_chosen, source_rejected, ref_chosen, ref_rejected):
    # Eq. 11: a source may never look worse than p0 -- never less sure of y_w, never more
    # sure of y_l. Broadcasting p0's [B] scores over the N sources.
    return (
        torch.maximum(source_chosen, ref_chosen[:, None]),
        torch.minimum(source_rejected, ref_rejected[:, None]),
    )


def clip_source_scores(
    source_chosen: torch.Tensor,
    source_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    clip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped source scores ``(c_i(y_w), c_i(y_l))``, each [B, N] (Eq. 11).

    With ``clip=False`` the scores are returned unchanged (``c_i = s_i``). Clipping is
    monotone: if ``s_i(y_w) > s_i(y_l)`` then ``c_i(y_w) > c_i(y_l)``.
    """
    if not clip:
        return source_chosen, source_rejected
    return _clip(source_chosen, source_rejected, ref_chosen, ref_rejected)


def _candidates(c_chosen, c_rejected, ref_chosen, ref_rejected, *, include_pivot):
    # Eq. 5: the initial pivot is one of the fused models; its candidate score is s_p0
    # itself (clipping it against itself would be the identity). It goes LAST so that
    # sources keep their configured indices and win ties against it.
    if not include_pivot:
        return c_chosen, c_rejected
    return (
        torch.cat([c_chosen, ref_chosen[:, None]], dim=1),
        torch.cat([c_rejected, ref_rejected[:, None]], dim=1),
    )


def _fused(weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    # log of the weighted geometric mean prod_i M_i^gamma_i (Eq. 6-7).
    return (weights * scores).sum(dim=-1)


def _fuse_max_margin(cand_chosen, cand_rejected):
    """One-hot gamma on the candidate with the largest margin (Eq. 12); ties -> lowest index."""
    margins = cand_chosen - cand_rejected
    is_max = margins == margins.max(dim=1, keepdim=True).values
    index = torch.arange(margins.shape[1], device=margins.device).expand_as(margins)
    # Smallest index among the maxima, spelled out rather than relying on argmax tie rules.
    selected = torch.where(is_max, index, margins.shape[1]).min(dim=1).values
    weights = F.one_hot(selected, margins.shape[1]).to(margins.dtype)
    # The same candidate serves y_w and y_l of the row.
    return _fused(weights, cand_chosen), _fused(weights, cand_rejected), weights, selected


def _fuse_mean(cand_chosen, cand_rejected):
    """Uniform gamma_i = 1/K over the K candidates (Eq. 23)."""
    weights = torch.full_like(cand_chosen, 1.0 / cand_chosen.shape[1])
    return _fused(weights, cand_chosen), _fused(weights, cand_rejected), weights


def _confidence_weights(raw_scores: torch.Tensor, eps: float) -> torch.Tensor:
    # conf_i(y) = 1 / (-s_i(y) + eps) (Eq. 24-25): a model that is surer of y gets more say.
    # Log-probs are <= 0; clamping -s at 0 only matters for a rounding-level positive score,
    # which would otherwise give a negative (or infinite) weight.
    conf = 1.0 / ((-raw_scores).clamp_min(0.0) + eps)
    return conf / conf.sum(dim=1, keepdim=True)


def _fuse_confidence(cand_chosen, cand_rejected, raw_chosen, raw_rejected, eps):
    """Per-response weights from the UNCLIPPED scores, applied to the clipped ones."""
    w_chosen = _confidence_weights(raw_chosen, eps)
    w_rejected = _confidence_weights(raw_rejected, eps)
    weights = torch.stack([w_chosen, w_rejected], dim=1)  # [B, 2, K]: 0 = chosen, 1 = rejected
    return _fused(w_chosen, cand_chosen), _fused(w_rejected, cand_rejected), weights


def _per_row_loss(h: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    if loss_type == "sigmoid":
        # logsigmoid, not log(sigmoid(.)): stays finite for large negative h.
        return -F.logsigmoid(h)
    # IPO (Eq. 22): regress the implicit reward gap h/beta onto 1/(2 beta).
    return (h / beta - 1.0 / (2.0 * beta)) ** 2


# --------------------------------------------------------------------------------------
# Public losses
# --------------------------------------------------------------------------------------


def infifpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    source_chosen: torch.Tensor,
    source_rejected: torch.Tensor,
    *,
    beta: float,
    fusion: str = "max_margin",
    clip: bool = True,
    include_pivot: bool = True,
    loss_type: str = "sigmoid",
    eps: float = 1e-6,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-row InfiFPO loss (METHOD.md, Eq. 13) and diagnostics.

    Args:
        policy_chosen, policy_rejected: [B] scores ``s_p(y_w)``, ``s_p(y_l)`` of the trained
            pivot -- the only inputs that carry gradient.
        ref_chosen, ref_rejected: [B] scores of the initial pivot p0 (clipping bound and,
            with ``include_pivot``, the last fusion candidate).
        source_chosen, source_rejected: [B, N] source scores, sources in configured order.
            N may be 0 only with ``include_pivot=True``.
        beta: inverse temperature, > 0.
        fusion: ``"max_margin"``, ``"mean"`` or ``"confidence"``.
        clip: apply probability clipping (Eq. 11) to the source scores.
        include_pivot: add p0 as a fusion candidate (index K-1).
        loss_type: ``"sigmoid"`` (InfiFPO) or ``"ipo"`` (InfiFPO-IPO).
        eps: confidence-fusion smoothing constant.
        check_finite: reject nan/inf inputs, naming the rows. Reading the values back costs a
            host synchronisation per input on a GPU; the training step turns it off (scores
            are checked when the scored set is read, and a non-finite policy score makes the
            reduced loss non-finite, which stops the step before the update).

    Returns:
        ``(losses, metrics)``: ``losses`` is [B] (average it for the batch loss). ``metrics``
        are detached: ``reward_chosen``, ``reward_rejected``, ``margin``, ``accuracy``,
        ``fused_chosen``, ``fused_rejected``, ``clipped_fraction`` (each [B]); ``weights``
        ([B, K], or [B, 2, K] for confidence with 0 = chosen, 1 = rejected); ``selected``
        (long [B]: max_margin's candidate index, -1 for the other fusions).

    Computes in float32, or float64 when any input is float64.
    """
    _validate(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, source_chosen, source_rejected,
        beta=beta, fusion=fusion, include_pivot=include_pivot, loss_type=loss_type, eps=eps,
        check_finite=check_finite,
    )
    beta = float(beta)
    dtype = _compute_dtype(policy_chosen, policy_rejected, ref_chosen, ref_rejected, source_chosen, source_rejected)
    device = policy_chosen.device

    def constant(t):
        # p0 and the sources are fixed targets of the objective: never let gradient reach them.
        return t.detach().to(device=device, dtype=dtype)

    p_w = policy_chosen.to(device=device, dtype=dtype)
    p_l = policy_rejected.to(device=device, dtype=dtype)
    r_w, r_l = constant(ref_chosen), constant(ref_rejected)
    s_w, s_l = constant(source_chosen), constant(source_rejected)

    c_w, c_l = clip_source_scores(s_w, s_l, r_w, r_l, clip=clip)
    cand_w, cand_l = _candidates(c_w, c_l, r_w, r_l, include_pivot=include_pivot)

    selected = torch.full((p_w.shape[0],), -1, dtype=torch.long, device=device)
    if fusion == "max_margin":
        f_w, f_l, weights, selected = _fuse_max_margin(cand_w, cand_l)
    elif fusion == "mean":
        f_w, f_l, weights = _fuse_mean(cand_w, cand_l)
    else:
        raw_w, raw_l = _candidates(s_w, s_l, r_w, r_l, include_pivot=include_pivot)
        f_w, f_l, weights = _fuse_confidence(cand_w, cand_l, raw_w, raw_l, eps)

    h = beta * ((p_w - f_w) - (p_l - f_l))
    losses = _per_row_loss(h, beta, loss_type)

    with torch.no_grad():
        reward_chosen = beta * (p_w - f_w)
        reward_rejected = beta * (p_l - f_l)
        n_source_scores = 2 * s_w.shape[1]
        if n_source_scores:
            changed = (c_w != s_w).sum(dim=1) + (c_l != s_l).sum(dim=1)
            clipped_fraction = changed.to(dtype) / n_source_scores
        else:
            clipped_fraction = torch.zeros_like(p_w)
        metrics = {
            "reward_chosen": reward_chosen,
            "reward_rejected": reward_rejected,
            "margin": reward_chosen - reward_rejected,
            "accuracy": (reward_chosen > reward_rejected).to(dtype),
            "fused_chosen": f_w,
            "fused_rejected": f_l,
            "weights": weights,
            "clipped_fraction": clipped_fraction,
            "selected": selected,
        }
    return losses, {k: v.detach() for k, v in metrics.items()}


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (or IPO) against reference p0: the InfiFPO limit with sources = {p0}.

    Runs through :func:`infifpo_loss` (one code path): p0 is the single source and is not
    added again as the pivot candidate, so ``f = s_p0`` for every fusion.
    """
    _require_tensor("ref_chosen", ref_chosen)
    _require_tensor("ref_rejected", ref_rejected)
    if ref_chosen.ndim != 1 or ref_rejected.ndim != 1:
        raise ValueError(
            f"ref_chosen and ref_rejected must be 1-D with shape [B], got shapes "
            f"{tuple(ref_chosen.shape)} and {tuple(ref_rejected.shape)}"
        )
    return infifpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected,
        ref_chosen[:, None], ref_rejected[:, None],
        beta=beta, fusion="mean", clip=False, include_pivot=False, loss_type=loss_type, check_finite=check_finite,
    )
