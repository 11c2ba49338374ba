"""The training data: scored rows, re-tokenized with the pivot's own response tokenizer.

Training must score exactly the response tokens scoring scored (METHOD.md: each model's
sequence score is over *its own* tokenization), so the rows are re-tokenized through the same
:class:`~nemo_infifpo.data.templates.ResponseTokenizer` (the pivot's tokenizer and chat
template), and the tokenizer/template fingerprint recorded by scoring is checked against it
before anything else happens. The step-0 parity check (:mod:`.parity`) then checks the
numbers themselves.

Every rank holds the rows and their precomputed scores (small); token ids are produced on
demand for the rows a rank trains on. Only the lengths of all rows are needed up front (to
exclude rows longer than ``data.max_length``, as scoring does); each rank measures a slice of
them and the slices are exchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_infifpo.data.policy import ExclusionLog, RowExclusion, RowPolicy
from nemo_infifpo.data.rows import PreferenceRow, read_preference_rows
from nemo_infifpo.data.templates import ExcludedRow, ResponseTokenizer, TokenizedPair, load_tokenizer
from nemo_infifpo.training.config import ConfigError, TrainConfig

__all__ = [
    "FingerprintMismatchError",
    "TrainingData",
    "check_scoring_setup",
    "load_training_data",
    "pivot_tokenizer_dir",
]

log = logging.getLogger(__name__)

_CACHE_LIMIT = 8192  # tokenized pairs kept per rank (a few global batches' worth)


class FingerprintMismatchError(ValueError):
    """The scored set's pivot scores were computed with another tokenizer or chat template."""


@dataclass
class TrainingData:
    """Rows kept for training (index ``i`` everywhere below) and what the loss needs about them."""

    rows: list[PreferenceRow]
    tokenizer: ResponseTokenizer
    lengths: torch.Tensor  # int64 [N, 2]: total tokens of the chosen / rejected sequence
    # Precomputed sequence scores in the configured normalisation (float64): ref_chosen,
    # ref_rejected [N]; source_chosen, source_rejected [N, S]. Empty for SFT on plain rows.
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    # p0's own response token counts T_p0 [N] (chosen, rejected), for the parity report.
    p0_tokens: tuple[torch.Tensor, torch.Tensor] | None = None
    source_names: tuple[str, ...] = ()
    excluded: list[ExcludedRow] = field(default_factory=list)
    _cache: dict[int, TokenizedPair] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[str]:
        return [row.id for row in self.rows]

    def pair(self, index: int) -> TokenizedPair:
        pair = self._cache.get(index)
        if pair is None:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            pair = self.tokenizer.encode_pair(self.rows[index])
            self._cache[index] = pair
        return pair

    def pairs(self, indices: list[int]) -> list[TokenizedPair]:
        return [self.pair(i) for i in indices]


def pivot_tokenizer_dir(config: TrainConfig) -> Path:
    """``tokenizer.path``, else the model's own tokenizer files (HF dir or checkpoint assets)."""
    if config.tokenizer.path:
        return Path(config.tokenizer.path)
    from nemo_infifpo.models.checkpoint import hf_assets_dir

    return hf_assets_dir(config.model.path)


def _read(config: TrainConfig):
    """(rows, scored set or None)."""
    from nemo_infifpo.data.scored_set import ScoredSetError, read_scored_set

    path = Path(config.data.path)
    if not path.exists():
        raise FileNotFoundError(f"data.path not found: {path}")
    try:
        scored = read_scored_set(path)
    except ScoredSetError as error:
        if config.needs_p0_scores:
            raise ConfigError(
                f"data.path={str(path)!r} is not a scored training set ({error}); loss.type="
                f"{config.loss.type!r} needs one (recipes/score.py + recipes/merge_scores.py)"
            ) from None
        # SFT only needs prompt and chosen response: any preference file will do, read under
        # the row policy like every stage's input.
        read = read_preference_rows(path, policy=_policy(config), stage="train")
        return read.rows, None
    return scored.rows(), scored


def _policy(config: TrainConfig) -> RowPolicy:
    return RowPolicy(config.data.on_invalid_row, config.data.max_excluded_fraction)


def response_tokenizer(config: TrainConfig) -> ResponseTokenizer:
    """The pivot's ResponseTokenizer, rendering exactly as the pivot's scoring did (template,
    template variables, boundary mode, pinned date: all part of the fingerprint)."""
    tokenizer_dir = pivot_tokenizer_dir(config)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"pivot tokenizer directory not found: {tokenizer_dir} (set tokenizer.path)")
    t = config.tokenizer
    return ResponseTokenizer(
        load_tokenizer(tokenizer_dir), t.chat_template, config.data.max_length,
        template_kwargs=t.chat_template_kwargs, boundary=t.boundary, template_date=t.template_date,
    )


def _check_fingerprint(config: TrainConfig, scored, tokenizer: ResponseTokenizer) -> None:
    pivot = (scored.metadata or {}).get("pivot") or {}
    stored = pivot.get("tokenizer_fingerprint")
    if not config.data.check_fingerprint or stored is None:
        return
    ours = tokenizer.fingerprint()
    if ours != stored:
        raise FingerprintMismatchError(
            f"the pivot scores in {config.data.path} were computed with tokenizer/template "
            f"fingerprint {stored[:12]}… (chat template {pivot.get('chat_template')!r}, model "
            f"{pivot.get('model_path')!r}), but the configured pivot tokenizer "
            f"({pivot_tokenizer_dir(config)}, template {tokenizer.template_name!r}) has "
            f"{ours[:12]}…{_template_differences(pivot.get('template') or {}, tokenizer)}: set "
            "tokenizer.path / tokenizer.chat_template (and the template settings) to those used for "
            "scoring, or rescore (data.check_fingerprint=false skips this check)"
        )


def _template_differences(scored: dict, tokenizer: ResponseTokenizer) -> str:
    """The template settings scoring recorded that differ from training's, as keys to set."""
    ours = {"boundary": tokenizer.boundary, "kwargs": dict(tokenizer.template_kwargs), "template_date": tokenizer.template_date}
    keys = {"boundary": "tokenizer.boundary", "kwargs": "tokenizer.chat_template_kwargs", "template_date": "tokenizer.template_date"}
    differing = [f"{keys[k]}={scored[k]!r} (now {ours[k]!r})" for k in keys if k in scored and scored[k] != ours[k]]
    return f"; scoring used {', '.join(differing)}" if differing else ""


_PRECISION_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


def check_scoring_setup(config: TrainConfig, pivot: dict) -> None:
    """Compare how the pivot was scored (its scoring manifest, carried into the scored set)
    with how training will recompute it, before any model is built.

    Step-0 parity holds tightly only when both sides compute the same numbers: the same dtype
    always; in bf16 also the same back end and TP/PP layout (reduction order changes bf16 sums
    by far more than fp32 rounding). A difference is named with its fix instead of surfacing
    later as a parity failure; with ``trainer.step0_parity_check=false`` it is only logged.
    """
    if not config.needs_p0_scores or not pivot:
        return
    m = config.model
    wanted = _PRECISION_DTYPE[m.precision]
    problems = []
    scored_dtype = pivot.get("dtype")
    if scored_dtype is not None and scored_dtype != wanted:
        problems.append(
            f"the pivot was scored in {scored_dtype} but training runs model.precision={m.precision} "
            f"({wanted}): rescore the pivot with dtype={wanted} (recipes/score.py), or train with "
            f"model.precision={ {v: k for k, v in _PRECISION_DTYPE.items()}.get(scored_dtype, '?')}"
        )
    if wanted == "bfloat16":
        layout = (pivot.get("tensor_model_parallel_size"), pivot.get("pipeline_model_parallel_size"))
        ours = (m.tensor_model_parallel_size, m.pipeline_model_parallel_size)
        if None not in layout and layout != ours:
            problems.append(
                f"the pivot was scored at TP={layout[0]} PP={layout[1]} but training runs TP={ours[0]} PP={ours[1]}; "
                f"in bf16 the layout changes the scores: rescore the pivot with model.tensor_model_parallel_size="
                f"{ours[0]} model.pipeline_model_parallel_size={ours[1]}"
            )
        if pivot.get("backend") not in (None, "megatron"):
            problems.append(
                f"the pivot was scored with the {pivot.get('backend')!r} back end; training recomputes it with "
                "megatron, which in bf16 gives other numbers: rescore the pivot with model.backend=megatron"
            )
    if not problems:
        return
    text = f"{config.data.path}: " + "; ".join(problems)
    if config.trainer.step0_parity_check:
        raise ConfigError(text + " (or set trainer.step0_parity_check=false to train against these scores anyway)")
    log.warning("%s", text)


def _measure_lengths(
    tokenizer: ResponseTokenizer, rows: list[PreferenceRow], policy: RowPolicy
) -> tuple[torch.Tensor, list[RowExclusion]]:
    """[N, 2] sequence lengths (0 for rows the template cannot encode, which are recorded under
    the row policy); each rank tokenizes every world_size-th row, then all share."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    log = ExclusionLog(policy, stage="train", model="pivot")
    mine = []
    for i in range(rank, len(rows), world):
        pair = tokenizer.try_encode(rows[i], log)
        if pair is not None:
            mine.append((i, len(pair.chosen), len(pair.rejected)))
    invalid = log.entries
    if world > 1:
        gathered: list[tuple[list, list] | None] = [None] * world
        dist.all_gather_object(gathered, (mine, invalid))
        mine = [item for part in gathered for item in (part[0] if part else [])]
        invalid = [entry for part in gathered for entry in (part[1] if part else [])]
    lengths = torch.zeros(len(rows), 2, dtype=torch.long)
    for i, chosen, rejected in mine:
        lengths[i, 0], lengths[i, 1] = chosen, rejected
    return lengths, invalid


def load_training_data(config: TrainConfig) -> TrainingData:
    """Read, check and measure the training data. Collective over all ranks."""
    tokenizer = response_tokenizer(config)
    rows, scored = _read(config)
    if scored is not None:
        _check_fingerprint(config, scored, tokenizer)
        check_scoring_setup(config, (scored.metadata or {}).get("pivot") or {})

    policy = _policy(config)
    lengths, invalid = _measure_lengths(tokenizer, rows, policy)
    if invalid:
        # The same decision on every rank (all of them hold every rank's exclusions).
        ExclusionLog(policy, stage="train", model="pivot", entries=invalid).check(len(rows))
        log.warning(
            "%d of %d rows cannot be encoded with the pivot's template and are left out (first: %s)",
            len(invalid), len(rows), invalid[0].detail,
        )
    unusable = lengths.min(dim=1).values == 0
    if config.loss.type == "sft":
        too_long = lengths[:, 0] > config.data.max_length
    else:
        too_long = lengths.max(dim=1).values > config.data.max_length
    keep = torch.nonzero(~too_long & ~unusable).flatten()
    excluded = [
        ExcludedRow(
            id=rows[i].id,
            reason=f"longer than data.max_length={config.data.max_length} tokens",
            chosen_length=int(lengths[i, 0]),
            rejected_length=int(lengths[i, 1]),
            max_length=config.data.max_length,
        )
        for i in torch.nonzero(too_long).flatten().tolist()
    ]
    if excluded:
        log.warning("%d of %d rows exceed data.max_length=%d and are left out", len(excluded), len(rows), config.data.max_length)

    data = TrainingData(
        rows=[rows[i] for i in keep.tolist()],
        tokenizer=tokenizer,
        lengths=lengths[keep],
        excluded=excluded,
    )
    if scored is not None and config.needs_p0_scores:
        scores = scored.scores(config.loss.length_norm, keep.numpy(), dtype=torch.float64)
        counts = scored.token_counts(keep.numpy())
        data.scores = scores
        data.p0_tokens = (counts["ref_chosen"], counts["ref_rejected"])
        data.source_names = tuple(scored.source_names)
    return data
