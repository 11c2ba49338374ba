"""One scoring job: one model, one dataset, some or all shards, any number of ranks.

For every row, the log-prob sum and token count of the chosen and the rejected response under
the model, in the model's own tokenization (:class:`~nemo_infifpo.data.templates.
ResponseTokenizer`, the project's only definition of the response tokens).

Order of work, chosen so that mistakes cost seconds rather than GPU-hours: load and fingerprint
the data and tokenizer, compare with the output directory's manifest (refuse on a mismatch),
skip finished shards, and only then load the model. Each shard is tokenised on every rank,
batched longest-first under the token budget, its batches dealt round-robin to the
data-parallel ranks, and the results gathered to rank 0, which writes the shard.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_infifpo.data.rows import PreferenceRow, load_preference_rows
from nemo_infifpo.data.scored_set import package_version
from nemo_infifpo.data.templates import ResponseTokenizer, TokenizedSequence, load_tokenizer
from nemo_infifpo.scoring.backends import BACKENDS, DTYPES, ScoringBackend, create_backend, parse_dtype
from nemo_infifpo.scoring.batching import batch_stats, collate, plan_batches
from nemo_infifpo.scoring.manifest import (
    ScoringIdentity,
    check_or_create_manifest,
    dataset_fingerprint,
    model_fingerprint,
)
from nemo_infifpo.scoring.shards import (
    ShardScores,
    refresh_manifest,
    shard_is_complete,
    shard_name,
    split_rows,
    write_shard,
)

__all__ = ["ScoreConfig", "ScoringSummary", "run_scoring"]

log = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """The options of ``recipes/score.py`` (see ``configs/score.yaml`` for their meaning)."""

    model_path: str
    data_path: str
    output_dir: str
    backend: str = "megatron"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_split: str | None = None
    max_length: int | None = None
    tokenizer_path: str | None = None
    chat_template: str | None = None
    dtype: str = "bfloat16"
    max_tokens: int = 16384
    max_sequences: int | None = None
    micro_batch_size: int | None = None
    pad_to_multiple_of: int = 8
    shard_index: int | None = None
    shard_count: int = 1
    hf_logits: str = "auto"
    progress: bool | None = None  # None: show the bar when stderr is a terminal

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ScoreConfig:
        """From the nested Hydra config (``model.path``, ``data.path``, ``shard.count``, ...)."""

        def section(name: str) -> Mapping[str, Any]:
            return cfg.get(name) or {}

        def optional_int(value: Any) -> int | None:
            return None if value is None else int(value)

        model, data, tokenizer = section("model"), section("data"), section("tokenizer")
        batch, shard, hf = section("batch"), section("shard"), section("hf")
        missing = [
            key
            for key, value in (
                ("model.path", model.get("path")),
                ("data.path", data.get("path")),
                ("output_dir", cfg.get("output_dir")),
            )
            if value in (None, "", "???")
        ]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)}")
        return cls(
            model_path=str(model["path"]),
            backend=str(model.get("backend", "megatron")),
            tensor_model_parallel_size=int(model.get("tensor_model_parallel_size", 1)),
            pipeline_model_parallel_size=int(model.get("pipeline_model_parallel_size", 1)),
            data_path=str(data["path"]),
            data_split=data.get("split"),
            max_length=optional_int(data.get("max_length")),
            output_dir=str(cfg["output_dir"]),
            tokenizer_path=tokenizer.get("path"),
            chat_template=tokenizer.get("chat_template"),
            dtype=str(cfg.get("dtype", "bfloat16")),
            max_tokens=int(batch.get("max_tokens", 16384)),
            max_sequences=optional_int(batch.get("max_sequences")),
            micro_batch_size=optional_int(batch.get("micro_batch_size")),
            pad_to_multiple_of=int(batch.get("pad_to_multiple_of", 8)),
            shard_index=optional_int(shard.get("index")),
            shard_count=int(shard.get("count", 1)),
            hf_logits=str(hf.get("logits", "auto")),
            progress=cfg.get("progress"),
        )

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"model.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shard_count < 1:
            raise ValueError(f"shard.count must be >= 1, got {self.shard_count}")
        if self.shard_index is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard.index must be in [0, {self.shard_count}), got {self.shard_index}")
        if self.max_tokens < 1:
            raise ValueError(f"batch.max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class ScoringSummary:
    output_dir: Path
    shards_computed: list[int] = field(default_factory=list)
    shards_skipped: list[int] = field(default_factory=list)
    rows_scored: int = 0
    rows_excluded: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    seconds: float = 0.0  # the whole job, loading included
    scoring_seconds: float = 0.0  # tokenising, forward passes and writing, shard by shard

    @property
    def rows_per_second(self) -> float:
        return self.rows_scored / self.scoring_seconds if self.scoring_seconds else 0.0


def _resolve_tokenizer_dir(config: ScoreConfig) -> Path:
    if config.tokenizer_path:
        return Path(config.tokenizer_path)
    from nemo_infifpo.models.checkpoint import hf_assets_dir

    return hf_assets_dir(config.model_path)


def scoring_identity(
    config: ScoreConfig, rows: list[PreferenceRow], tokenizer: ResponseTokenizer
) -> ScoringIdentity:
    return ScoringIdentity(
        model_fingerprint=model_fingerprint(config.model_path),
        tokenizer_fingerprint=tokenizer.fingerprint(),
        dataset_fingerprint=dataset_fingerprint(rows),
        max_length=config.max_length,
        dtype=config.dtype,
        backend=config.backend,
        shard_count=config.shard_count,
    )


def run_scoring(config: ScoreConfig) -> ScoringSummary:
    """Score the requested shards of ``config.data_path`` (all of them without ``shard_index``),
    skipping those already complete in ``config.output_dir``. Collective over all ranks."""
    from nemo_infifpo.engine.distributed import read_launch_env

    config.validate()
    started = time.perf_counter()
    output_dir = Path(config.output_dir)
    summary = ScoringSummary(output_dir=output_dir)
    is_rank0 = read_launch_env().rank == 0

    rows = load_preference_rows(config.data_path, split=config.data_split)
    if not rows:
        raise ValueError(f"{config.data_path}: no rows to score")
    tokenizer_dir = _resolve_tokenizer_dir(config)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir} (set tokenizer.path)")
    tokenizer = ResponseTokenizer(load_tokenizer(tokenizer_dir), config.chat_template, config.max_length)
    identity = scoring_identity(config, rows, tokenizer)
    info = {
        "model_path": str(Path(config.model_path).resolve()),
        "tokenizer_path": str(tokenizer_dir.resolve()),
        "chat_template": tokenizer.template_name,
        "data_path": str(Path(config.data_path).resolve()),
        "data_split": config.data_split,
        "num_rows": len(rows),
        "package_version": package_version(),
    }
    check_or_create_manifest(output_dir, identity, info, create=is_rank0)

    wanted = [config.shard_index] if config.shard_index is not None else list(range(config.shard_count))
    pending = []
    for index in wanted:
        problem = shard_is_complete(output_dir, index, config.shard_count, identity)
        if problem is None:
            log.info("%s: complete, skipping", shard_name(index, config.shard_count))
            summary.shards_skipped.append(index)
        else:
            log.info("%s: to compute (%s)", shard_name(index, config.shard_count), problem)
            pending.append(index)
    if not pending:
        if is_rank0:
            refresh_manifest(output_dir)
        summary.seconds = time.perf_counter() - started
        return summary

    backend = create_backend(
        config.backend,
        config.model_path,
        dtype=parse_dtype(config.dtype),
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        micro_batch_size=config.micro_batch_size,
        hf_logits=config.hf_logits,
    )
    try:
        # Every rank looked at the directory on its own; another job (an array task) may have
        # finished a shard in between. Rank 0's view decides, or the ranks would diverge.
        pending = backend.world.from_writer(pending)
        shards = split_rows(rows, config.shard_count)
        for index in pending:
            _score_shard(config, backend, tokenizer, identity, index, shards[index], summary)
    finally:
        backend.close()
    summary.seconds = time.perf_counter() - started
    log.info(
        "scored %d rows (%d excluded) in %.1f s (job %.1f s): %.2f rows/s, %.0f tokens/s, %.1f%% padding",
        summary.rows_scored,
        summary.rows_excluded,
        summary.scoring_seconds,
        summary.seconds,
        summary.rows_per_second,
        summary.real_tokens / summary.scoring_seconds if summary.scoring_seconds else 0.0,
        100.0 * (1 - summary.real_tokens / summary.padded_tokens) if summary.padded_tokens else 0.0,
    )
    return summary


def _progress_bar(config: ScoreConfig, backend: ScoringBackend, total: int, label: str) -> Any:
    from tqdm import tqdm

    show = config.progress if config.progress is not None else sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=label,
        unit="seq",
        disable=not (show and backend.world.is_writer),
        dynamic_ncols=True,
    )


def _score_shard(
    config: ScoreConfig,
    backend: ScoringBackend,
    tokenizer: ResponseTokenizer,
    identity: ScoringIdentity,
    index: int,
    rows: list[PreferenceRow],
    summary: ScoringSummary,
) -> None:
    world = backend.world
    label = shard_name(index, config.shard_count)
    shard_started = time.perf_counter()
    pairs, excluded = tokenizer.encode_rows(rows)
    # Sequence 2i is pair i's chosen response, 2i + 1 its rejected one.
    sequences: list[TokenizedSequence] = [seq for pair in pairs for seq in (pair.chosen, pair.rejected)]
    lengths = [len(seq) for seq in sequences]
    batches = plan_batches(
        lengths,
        config.max_tokens,
        pad_to_multiple_of=config.pad_to_multiple_of,
        max_sequences=config.max_sequences,
    )
    mine = batches[world.dp_rank :: world.dp_size]
    stats = batch_stats(batches, lengths)
    log.info(
        "%s: %d rows (%d excluded by max_length), %d sequences in %d batches, %.1f%% padding",
        label,
        len(rows),
        len(excluded),
        len(sequences),
        stats.num_batches,
        100 * stats.padding_fraction,
    )

    results: dict[int, tuple[float, int]] = {}
    started = time.perf_counter()
    real_tokens = 0
    with _progress_bar(config, backend, sum(len(b.indices) for b in mine), label) as bar:
        for batch in mine:
            batch_sequences = [sequences[i] for i in batch.indices]
            tokens, mask = collate(batch_sequences, batch.padded_length)
            sums, counts = backend.score(tokens, mask)
            for i, seq, total, count in zip(
                batch.indices, batch_sequences, sums.tolist(), counts.tolist(), strict=True
            ):
                if count != seq.num_response_tokens:
                    raise RuntimeError(
                        f"{label}: back end counted {count} response tokens for a sequence with "
                        f"{seq.num_response_tokens}; the batch layout is broken"
                    )
                results[i] = (float(total), int(count))
            real_tokens += sum(len(seq) for seq in batch_sequences)
            bar.update(len(batch.indices))
            elapsed = max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(rows_s=f"{len(results) / 2 / elapsed:.2f}", tok_s=f"{real_tokens / elapsed:.0f}")

    gathered = world.gather_to_writer(results)
    if gathered is not None:
        merged: dict[int, tuple[float, int]] = {}
        for part in gathered:
            merged.update(part)
        if len(merged) != len(sequences):
            raise RuntimeError(f"{label}: gathered {len(merged)} of {len(sequences)} sequence scores")
        sums_array = np.array([merged[i][0] for i in range(len(sequences))], dtype=np.float64)
        count_array = np.array([merged[i][1] for i in range(len(sequences))], dtype=np.int64)
        scores = ShardScores(
            ids=[pair.id for pair in pairs],
            chosen_logps=sums_array[0::2],
            rejected_logps=sums_array[1::2],
            chosen_tokens=count_array[0::2],
            rejected_tokens=count_array[1::2],
        )
        run_info = {
            "world_size": world.world_size,
            "data_parallel_size": world.dp_size,
            "tensor_model_parallel_size": config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
            "batches": stats.num_batches,
            "max_tokens": config.max_tokens,
            "padding_fraction": round(stats.padding_fraction, 6),
        }
        write_shard(
            config.output_dir, index, config.shard_count, identity, scores, excluded, len(rows), run_info
        )
        refresh_manifest(config.output_dir)
        log.info("%s: written (%d rows scored)", label, len(pairs))
    world.barrier()
    summary.shards_computed.append(index)
    summary.scoring_seconds += time.perf_counter() - shard_started
    summary.rows_scored += len(pairs)
    summary.rows_excluded += len(excluded)
    summary.real_tokens += stats.real_tokens
    summary.padded_tokens += stats.padded_tokens
