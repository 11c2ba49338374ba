"""Step-0 parity: before the first update the pivot must reproduce its precomputed p0 scores.

At step 0 the trained pivot *is* p0, so its recomputed scores of the first global batch must
equal the scores the scoring job stored (METHOD.md, "Limits that must hold exactly", 2). A
difference beyond ``trainer.step0_parity_atol`` means the training run does not see what
scoring saw: another tokenizer or chat template (different tokens or response boundary),
a layout bug (TP/PP sharding), or a dtype mismatch. Training such a run would fit the loss
against the wrong reference, so the run stops, listing the worst rows.

The tolerance is per token: with ``length_norm`` the scores are token means and are compared
within ``atol``; without it they are sums over T tokens, whose rounding error grows with T
(float32 sums of ~2000 nats), so a sequence's sum is compared within ``atol * T``.

The scores are recomputed by the training step itself, forward only: the same micro-batches
(padding or packing, THD on Transformer Engine), the same model chunks, layer spec, dtype and
forward pass (:mod:`nemo_infifpo.engine.forward`), with per-sequence sums in place of the
loss, in eval mode. A bug in that path (e.g. packed sequences attending to each other)
therefore fails the check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_infifpo.engine.forward import forward_only
from nemo_infifpo.logprobs import sequence_logprob_sums
from nemo_infifpo.loss import sequence_scores
from nemo_infifpo.training.dataset import TrainingData

__all__ = ["ParityReport", "Step0ParityError", "check_step0_parity"]

_ROWS_SHOWN = 10


class Step0ParityError(RuntimeError):
    """The pivot's step-0 scores differ from the precomputed p0 scores."""


@dataclass(frozen=True)
class ParityRow:
    id: str
    side: str  # "chosen" | "rejected"
    precomputed: float
    recomputed: float
    precomputed_tokens: int
    recomputed_tokens: int

    @property
    def diff(self) -> float:
        if self.precomputed_tokens != self.recomputed_tokens:
            return math.inf  # different response tokens: not the same quantity at all
        return abs(self.recomputed - self.precomputed)


@dataclass(frozen=True)
class ParityReport:
    rows: list[ParityRow]
    atol: float
    # Scores are sums (length_norm off): the tolerance of a row is atol x its token count.
    per_token: bool = False

    def tolerance(self, row: ParityRow) -> float:
        return self.atol * max(row.precomputed_tokens, 1) if self.per_token else self.atol

    def tolerance_text(self) -> str:
        if self.per_token:
            return f"within {self.atol:g} per token of each summed score"
        return f"within {self.atol:g}"

    @property
    def max_abs_diff(self) -> float:
        return max((r.diff for r in self.rows), default=0.0)

    @property
    def failures(self) -> list[ParityRow]:
        return sorted((r for r in self.rows if r.diff > self.tolerance(r)), key=lambda r: -r.diff)

    def message(self) -> str:
        worst = self.failures[:_ROWS_SHOWN]
        lines = [
            f"step-0 parity failed: {len(self.failures)} of {len(self.rows)} sequence scores of the first "
            f"global batch differ from the precomputed p0 scores by more than "
            f"trainer.step0_parity_atol={self.atol:g}{' per token' if self.per_token else ''} "
            f"(max {self.max_abs_diff:.3g}). At step 0 the pivot is p0, so a difference beyond float "
            "rounding is a tokenizer/chat-template, layout or dtype mismatch between scoring and "
            "training. Worst rows:",
            f"  {'id':<24} {'side':<8} {'precomputed':>14} {'recomputed':>14} {'diff':>11} {'allowed':>9} tokens(pre/re)",
        ]
        for r in worst:
            lines.append(
                f"  {r.id[:24]:<24} {r.side:<8} {r.precomputed:>14.6f} {r.recomputed:>14.6f} "
                f"{r.diff:>11.3g} {self.tolerance(r):>9.3g} {r.precomputed_tokens}/{r.recomputed_tokens}"
            )
        return "\n".join(lines)


def check_step0_parity(
    model,
    micro_batches: list,
    model_chunks: list,
    data: TrainingData,
    *,
    length_norm: bool,
    atol: float,
) -> ParityReport:
    """Recompute p0's scores of this rank's ``micro_batches`` (its share of the first global
    batch, exactly as step 1 will feed them) through the shared forward pass, gather every
    rank's rows, raise :class:`Step0ParityError` on a mismatch. Collective over all ranks."""
    sums_per_batch = forward_only(model_chunks, micro_batches, vocab_size=model.vocab_size)
    mine = []
    for batch, sums in zip(micro_batches, sums_per_batch):
        m, rows = batch.num_pairs, batch.row_indices
        counts = sequence_logprob_sums(torch.zeros(batch.loss_mask.shape), batch.loss_mask, batch.sequence_index,
                                       batch.num_sequences)[1]
        recomputed = sequence_scores(sums.double(), counts, length_norm=length_norm)
        index = torch.as_tensor(rows, dtype=torch.long)
        precomputed = torch.cat([data.scores["ref_chosen"][index], data.scores["ref_rejected"][index]])
        assert data.p0_tokens is not None
        pre_tokens = torch.cat([data.p0_tokens[0][index], data.p0_tokens[1][index]])
        mine.extend(
            ParityRow(
                id=data.rows[rows[k % m]].id,
                side="chosen" if k < m else "rejected",
                precomputed=float(precomputed[k]),
                recomputed=float(recomputed[k]),
                precomputed_tokens=int(pre_tokens[k]),
                recomputed_tokens=int(counts[k]),
            )
            for k in range(2 * m)
        )
    everyone = mine
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[list[ParityRow] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        # The model-parallel ranks of one data-parallel rank report the same rows: keep one each.
        unique = {(r.id, r.side): r for part in gathered for r in (part or [])}
        everyone = list(unique.values())
    report = ParityReport(everyone, atol, per_token=not length_norm)
    if report.failures:
        raise Step0ParityError(report.message())
    return report
