"""The training objective per micro-batch, in the ``[sum, count]`` reduction contract.

The pipeline schedule calls the loss once per micro-batch. Each call returns the *sum* of the
per-row losses of its rows and the *count* of rows (tokens for SFT); megatron adds the counts
of every micro-batch and data-parallel rank and divides the summed gradients by that total
(``calculate_per_token_loss``), so an update always follows the mean over all pairs of the
global batch, whatever the micro-batch size, accumulation or data-parallel size.

The math itself is :mod:`nemo_infifpo.loss` (METHOD.md); this module only feeds it:

==========  ===============================================================================
loss.type   per-row loss
==========  ===============================================================================
infifpo     ``infifpo_loss`` (sigmoid, Eq. 13) against the precomputed p0 and source scores
ipo         ``infifpo_loss(loss_type="ipo")``: InfiFPO-IPO (Eq. 22)
dpo         ``dpo_loss``: DPO with reference p0 (sources ignored)
sft         cross-entropy of the chosen response, averaged over its tokens (count = tokens)
==========  ===============================================================================

Besides the loss, each call returns a vector of sums that the loop reduces the same way, for
the step's metrics: one float64 tensor (megatron's schedule sums it), laid out by a
:class:`StatLayout`, which names every position; the objective packs it by name and
:meth:`Objective.summarize` unpacks it by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from nemo_infifpo.loss import dpo_loss, infifpo_loss, sequence_scores
from nemo_infifpo.training.config import LossConfig

__all__ = ["PIVOT_CANDIDATE", "Objective", "StatLayout"]

PIVOT_CANDIDATE = "p0"  # name of the initial pivot as a fusion candidate in the metrics

_PAIR_STATS = (
    "loss",
    "pairs",
    "reward_chosen",
    "reward_rejected",
    "margin",
    "accuracy",
    "clipped_fraction",
    "policy_chosen",
    "policy_rejected",
)
_SFT_STATS = ("loss", "tokens", "sequences")


@dataclass(frozen=True)
class StatLayout:
    """The names of the positions of a micro-batch's stats vector, in order."""

    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def pack(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One float64 vector of the scalar ``values``, every name of the layout exactly once.
        Stays on the values' device (no host synchronisation)."""
        if set(values) != set(self.names):
            raise KeyError(f"stats {sorted(values)} do not match the layout {list(self.names)}")
        return torch.stack([values[name].double() for name in self.names])

    def unpack(self, totals: torch.Tensor) -> dict[str, float]:
        """A packed (and summed) vector as ``{name: value}``."""
        if totals.shape != (len(self.names),):
            raise ValueError(f"stats of shape {tuple(totals.shape)} for a layout of {len(self.names)} names")
        return dict(zip(self.names, totals.double().tolist(), strict=True))


class Objective:
    """Per-micro-batch loss of the configured ``loss.type`` (see the module docstring)."""

    def __init__(self, loss: LossConfig, source_names: tuple[str, ...] = ()) -> None:
        self.config = loss
        if loss.type == "dpo":
            self.candidates: tuple[str, ...] = (PIVOT_CANDIDATE,)
        elif loss.type in ("infifpo", "ipo"):
            if not source_names and not loss.include_pivot:
                raise ValueError("the scored set has no sources and loss.include_pivot=false: nothing to fuse")
            self.candidates = tuple(source_names) + ((PIVOT_CANDIDATE,) if loss.include_pivot else ())
        else:
            self.candidates = ()
        self.stats = StatLayout(
            _SFT_STATS if self.is_sft else _PAIR_STATS + tuple(f"weight/{c}" for c in self.candidates)
        )

    @property
    def is_sft(self) -> bool:
        return self.config.type == "sft"

    @property
    def stat_names(self) -> tuple[str, ...]:
        return self.stats.names

    def __call__(
        self,
        logp_sums: torch.Tensor,
        token_counts: torch.Tensor,
        num_pairs: int,
        scores: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss_sum, count, stats)`` for one micro-batch.

        ``logp_sums``/``token_counts`` are the pivot's per-sequence response log-prob sums and
        token counts: chosen responses of the ``num_pairs`` pairs first, then (except SFT) the
        rejected ones. ``scores`` holds the pairs' precomputed p0/source scores.
        """
        # No host synchronisation in here: it would stall the 1F1B pipeline on every
        # micro-batch. Non-finite log-probs (diverged weights) are not checked here either:
        # they make the reduced loss non-finite, and the loop stops before the update.
        device = logp_sums.device
        pairs = torch.full((), num_pairs, dtype=torch.float64, device=device)
        if self.is_sft:
            nll = -logp_sums.sum()
            tokens = token_counts.sum()
            stats = self.stats.pack({"loss": nll.detach(), "tokens": tokens, "sequences": pairs})
            return nll, tokens.to(torch.int32), stats

        c = self.config
        # Response token counts are >= 1 by construction (templates.py), so no check here.
        policy = sequence_scores(logp_sums, token_counts, length_norm=c.length_norm, check_counts=False)
        chosen, rejected = policy[:num_pairs], policy[num_pairs:]
        # The pairs' precomputed scores: the initial pivot p0's (``ref_*``, named after the
        # scored-set columns) and the sources'.
        precomputed = {k: v.to(device, non_blocking=True) for k, v in scores.items()}
        if c.type == "dpo":
            losses, metrics = dpo_loss(
                chosen, rejected, precomputed["ref_chosen"], precomputed["ref_rejected"], beta=c.beta, check_finite=False
            )
        else:
            losses, metrics = infifpo_loss(
                chosen,
                rejected,
                precomputed["ref_chosen"],
                precomputed["ref_rejected"],
                precomputed["source_chosen"],
                precomputed["source_rejected"],
                beta=c.beta,
                fusion=c.fusion,
                clip=c.clip,
                include_pivot=c.include_pivot,
                loss_type="ipo" if c.type == "ipo" else "sigmoid",
                check_finite=False,
            )
        weights = metrics["weights"].double()
        # Confidence fusion weighs chosen and rejected separately ([B, 2, K]): report their mean.
        weight_sums = weights.mean(dim=1).sum(dim=0) if weights.dim() == 3 else weights.sum(dim=0)
        stats = self.stats.pack(
            {
                "loss": losses.detach().double().sum(),
                "pairs": pairs,
                **{
                    name: metrics[name].double().sum()
                    for name in ("reward_chosen", "reward_rejected", "margin", "accuracy", "clipped_fraction")
                },
                "policy_chosen": chosen.detach().double().sum(),
                "policy_rejected": rejected.detach().double().sum(),
                **{f"weight/{name}": weight_sums[k] for k, name in enumerate(self.candidates)},
            }
        )
        count = torch.full((), num_pairs, dtype=torch.int32, device=device)
        return losses.sum(), count, stats

    def summarize(self, totals: torch.Tensor) -> dict[str, float]:
        """Step metrics from the stats summed over the global batch."""
        values = self.stats.unpack(totals)
        if not math.isfinite(values["loss"]):
            return {"loss": values["loss"]}
        if self.is_sft:
            tokens = max(values["tokens"], 1.0)
            return {"loss": values["loss"] / tokens, "sequences": values["sequences"], "response_tokens": values["tokens"]}
        pairs = max(values["pairs"], 1.0)
        out = {name: values[name] / pairs for name in _PAIR_STATS if name != "pairs"}
        out["pairs"] = values["pairs"]
        if self.config.type in ("infifpo", "ipo"):
            out["fusion/clipped_fraction"] = out.pop("clipped_fraction")
            for candidate in self.candidates:
                out[f"fusion/weight/{candidate}"] = values[f"weight/{candidate}"] / pairs
                if self.config.fusion == "max_margin":
                    # One-hot weights: their sum is the number of rows that selected the candidate.
                    out[f"fusion/selected/{candidate}"] = round(values[f"weight/{candidate}"])
        else:
            out.pop("clipped_fraction")
        return out
