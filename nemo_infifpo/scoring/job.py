"""One scoring job: one model, one dataset, some or all shards, any number of ranks.

For every row, the log-prob sum and token count of the chosen and the rejected response under
the model, in the model's own tokenization (:class:`~nemo_infifpo.data.templates.
ResponseTokenizer`, the project's only definition of the response tokens).

Order of work, chosen so that mistakes cost seconds rather than GPU-hours: check the options
and the output directory, read the data (invalid rows left out or fatal, per ``data.
on_invalid_row``), load and fingerprint the tokenizer, check the model's config (architecture,
vocabulary, parallel layout), compare with the output directory's manifest (refuse on a
mismatch), skip finished shards, tokenise the rest once to find the rows this model's template
cannot encode (left out and recorded, or fatal; too many of them stop the job), and only then
load the model. Each shard is tokenised on every rank,
batched longest-first under the token budget, its batches dealt round-robin to the
data-parallel ranks, and the results gathered to rank 0, which writes the shard.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.data.policy import RowPolicy
from nemo_infifpo.data.rows import PreferenceRow, read_preference_rows
from nemo_infifpo.data.scored_set import ModelScores, package_version
from nemo_infifpo.data.templates import (
    BOUNDARY_MODES,
    ResponseTokenizer,
    load_tokenizer,
)
from nemo_infifpo.locking import OutputLockedError
from nemo_infifpo.models.architecture import parse_dtype
from nemo_infifpo.option_values import as_boolean, as_integer, as_optional_integer
from nemo_infifpo.scoring.backends import (
    BACKENDS,
    DTYPES,
    HF_LOGIT_MODES,
    ScoringBackend,
    create_backend,
    open_world,
)
from nemo_infifpo.scoring.batching import batch_stats, collate, plan_batches
from nemo_infifpo.scoring.manifest import (
    ScoringIdentity,
    check_or_create_manifest,
    dataset_fingerprint,
    model_fingerprint,
)
from nemo_infifpo.scoring.preprocess import BatchEncoder, MeasuredRows, measure_rows
from nemo_infifpo.scoring.shards import (
    ShardedRunSummary,
    ShardScores,
    lock_shards,
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
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    boundary: str = "conversation"
    template_date: str | None = None  # None: DEFAULT_TEMPLATE_DATE
    on_invalid_row: str = "exclude"
    max_excluded_fraction: float = 0.01
    dtype: str = "bfloat16"
    max_tokens: int = 16384
    max_sequences: int | None = None
    micro_batch_size: int | None = None
    packing: bool = False
    pack_length: int | None = None
    pad_to_multiple_of: int = 8
    shard_index: int | None = None
    shard_count: int = 1
    hf_logits: str = "auto"
    progress: bool | None = None  # None: show the bar when stderr is a terminal

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> ScoreConfig:
        """From the nested Hydra config (``model.path``, ``data.path``, ``shard.count``, ...)."""

        def section(name: str) -> Mapping[str, Any]:
            value = cfg.get(name) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{name} must be a mapping of options, got {value!r}")
            return value

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
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")
        kwargs = tokenizer.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise ConfigError(
                "tokenizer.chat_template_kwargs must be a mapping, e.g. "
                f"tokenizer.chat_template_kwargs={{enable_thinking:false}}, got {kwargs!r}"
            )
        policy = RowPolicy.from_mapping(data)
        return cls(
            model_path=str(model["path"]),
            backend=str(model.get("backend", "megatron")),
            tensor_model_parallel_size=as_integer(
                "model.tensor_model_parallel_size", model.get("tensor_model_parallel_size", 1)
            ),
            pipeline_model_parallel_size=as_integer(
                "model.pipeline_model_parallel_size", model.get("pipeline_model_parallel_size", 1)
            ),
            data_path=str(data["path"]),
            data_split=data.get("split"),
            max_length=as_optional_integer("data.max_length", data.get("max_length")),
            on_invalid_row=policy.on_invalid_row,
            max_excluded_fraction=policy.max_excluded_fraction,
            output_dir=str(cfg["output_dir"]),
            tokenizer_path=tokenizer.get("path"),
            chat_template=tokenizer.get("chat_template"),
            chat_template_kwargs=dict(kwargs),
            boundary=str(tokenizer.get("boundary") or "conversation"),
            template_date=None if tokenizer.get("template_date") is None else str(tokenizer["template_date"]),
            dtype=str(cfg.get("dtype", "bfloat16")),
            max_tokens=as_integer("batch.max_tokens", batch.get("max_tokens", 16384)),
            max_sequences=as_optional_integer("batch.max_sequences", batch.get("max_sequences")),
            micro_batch_size=as_optional_integer("batch.micro_batch_size", batch.get("micro_batch_size")),
            packing=as_boolean("batch.packing", batch.get("packing", False)),
            pack_length=as_optional_integer("batch.pack_length", batch.get("pack_length")),
            pad_to_multiple_of=as_integer("batch.pad_to_multiple_of", batch.get("pad_to_multiple_of", 8)),
            shard_index=as_optional_integer("shard.index", shard.get("index")),
            shard_count=as_integer("shard.count", shard.get("count", 1)),
            hf_logits=str(hf.get("logits", "auto")),
            progress=cfg.get("progress"),
        )

    @property
    def policy(self) -> RowPolicy:
        return RowPolicy(self.on_invalid_row, self.max_excluded_fraction)

    @property
    def model_name(self) -> str:
        """How exclusions name this model (the merge renames it to pivot / the source name)."""
        return Path(self.model_path).name or str(self.model_path)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        parse_dtype(self.dtype, allowed=DTYPES)
        if self.boundary not in BOUNDARY_MODES:
            raise ConfigError(
                f"tokenizer.boundary must be one of {', '.join(BOUNDARY_MODES)}, got {self.boundary!r}"
            )
        if self.backend == "hf" and (self.tensor_model_parallel_size, self.pipeline_model_parallel_size) != (1, 1):
            raise ConfigError(
                "the hf back end is data-parallel only: set model.tensor_model_parallel_size=1 and "
                "model.pipeline_model_parallel_size=1 (or use model.backend=megatron)"
            )
        if self.hf_logits not in HF_LOGIT_MODES:
            raise ConfigError(f"hf.logits must be one of {', '.join(HF_LOGIT_MODES)}, got {self.hf_logits!r}")
        if self.shard_count < 1:
            raise ConfigError(f"shard.count must be >= 1, got {self.shard_count}")
        if self.shard_index is not None and not 0 <= self.shard_index < self.shard_count:
            raise ConfigError(f"shard.index must be in [0, {self.shard_count}), got {self.shard_index}")
        if self.max_tokens < 1:
            raise ConfigError(f"batch.max_tokens must be >= 1, got {self.max_tokens}")
        if self.packing and self.backend != "megatron":
            raise ConfigError("batch.packing=true needs model.backend=megatron (the hf back end pads)")
        if self.pack_length is not None and (
            self.pack_length < 2 or (self.max_length is not None and self.pack_length < self.max_length)
        ):
            raise ConfigError(
                f"batch.pack_length must be >= data.max_length ({self.max_length}) so that every "
                f"sequence fits a bin, got {self.pack_length}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"data.max_length must be >= 2 (or null), got {self.max_length}")
        self.policy  # validates data.on_invalid_row and data.max_excluded_fraction


@dataclass
class ScoringSummary(ShardedRunSummary):
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


def check_output_dir(path: str | Path) -> Path:
    """``output_dir`` must be a directory this process can write (created when missing);
    checked before any work so that a typo costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output_dir {str(path)!r} is an existing file, expected a directory (or a new path)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        # A unique name: array tasks on other nodes may probe the same directory at once.
        descriptor, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise InputError(
            f"output_dir {str(path)!r} is not writable ({error.strerror or error}); choose another output_dir"
        ) from None
    return path


def check_model(config: ScoreConfig, tokenizer: ResponseTokenizer) -> None:
    """What can be known about the model from its config alone: that there is one, that the
    back end supports it at this layout, and that the tokenizer's ids fit its vocabulary."""
    from nemo_infifpo.models.checkpoint import hf_assets_dir
    from nemo_infifpo.models.hf_io import load_hf_config

    hf_config = load_hf_config(hf_assets_dir(config.model_path))
    if config.backend == "megatron":
        from nemo_infifpo.models.parallel import ParallelLayout, validate_parallel_layout
        from nemo_infifpo.models.registry import describe_hf_config

        arch = describe_hf_config(hf_config)
        validate_parallel_layout(
            arch, ParallelLayout(config.tensor_model_parallel_size, config.pipeline_model_parallel_size)
        )
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and len(tokenizer.tokenizer) > int(vocab):
        raise InputError(
            f"the tokenizer ({_resolve_tokenizer_dir(config)}) has {len(tokenizer.tokenizer)} tokens but "
            f"the model {config.model_path} has a vocabulary of {vocab}: token ids would fall outside "
            "it; set tokenizer.path to this model's own tokenizer"
        )


def run_scoring(config: ScoreConfig) -> ScoringSummary:
    """Score the requested shards of ``config.data_path`` (all of them without ``shard_index``),
    skipping those already complete in ``config.output_dir``. Collective over all ranks."""
    from nemo_infifpo.engine.distributed import read_launch_env

    config.validate()
    started = time.perf_counter()
    output_dir = check_output_dir(config.output_dir)
    summary = ScoringSummary(output_dir=output_dir)
    is_rank0 = read_launch_env().rank == 0

    read = read_preference_rows(config.data_path, split=config.data_split, policy=config.policy)
    rows = read.rows
    if read.excluded:
        log.warning("%d of %d rows of %s are invalid and left out", len(read.excluded), read.total, config.data_path)
    tokenizer_dir = _resolve_tokenizer_dir(config)
    if not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir} (set tokenizer.path)")
    tokenizer = ResponseTokenizer(
        load_tokenizer(tokenizer_dir),
        config.chat_template,
        config.max_length,
        template_kwargs=config.chat_template_kwargs,
        boundary=config.boundary,
        template_date=config.template_date,
    )
    check_model(config, tokenizer)
    identity = scoring_identity(config, rows, tokenizer)
    template = tokenizer.describe()
    if template["clock_dependent"]:
        log.info(
            "the chat template reads the date (strftime_now); it is pinned to %s (tokenizer.template_date)",
            template["template_date"],
        )
    info = {
        "model_path": str(Path(config.model_path).resolve()),
        "tokenizer_path": str(tokenizer_dir.resolve()),
        "chat_template": tokenizer.template_name,
        "template": template,
        "data_path": str(Path(config.data_path).resolve()),
        "data_split": config.data_split,
        "num_rows": len(rows),
        "row_policy": config.policy.to_dict(),
        "read_total": read.total,
        "read_excluded": [entry.to_dict() for entry in read.excluded],
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

    # The ranks measure the rows together before the model is loaded (each a slice): rows this
    # model's template cannot encode stop the job in seconds under on_invalid_row=fail or
    # above max_excluded_fraction, and every rank gets the lengths that plan the batches.
    shards = split_rows(rows, config.shard_count)
    pending_rows = [row for index in pending for row in shards[index]]
    world = open_world(config.backend, config.tensor_model_parallel_size, config.pipeline_model_parallel_size)
    measured = measure_rows(tokenizer, pending_rows, world, config.policy, model=config.model_name)
    if measured.invalid:
        log.warning(
            "%d of %d rows cannot be encoded with this model's template and are left out",
            len(measured.invalid),
            len(pending_rows),
        )

    backend = create_backend(
        config.backend,
        config.model_path,
        dtype=parse_dtype(config.dtype, allowed=DTYPES),
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        micro_batch_size=config.micro_batch_size,
        packing=config.packing,
        pack_length=config.pack_length,
        hf_logits=config.hf_logits,
    )
    locks: list[Any] = []
    try:
        # One job per shard: the writer locks the pending shards, then looks again (another
        # job, e.g. a duplicate array task, may have finished one in between). Its view
        # decides for every rank, or the ranks would diverge.
        refused = ""
        if backend.world.is_writer:
            try:
                locks = lock_shards(output_dir, pending, config.shard_count)
                pending = [i for i in pending if shard_is_complete(output_dir, i, config.shard_count, identity) is not None]
            except OutputLockedError as error:
                refused = str(error)
        refused, pending = backend.world.from_writer((refused, pending))
        if refused:
            raise OutputLockedError(refused)
        for index in pending:
            _score_shard(config, backend, tokenizer, identity, index, shards[index], measured, summary)
    finally:
        for lock in locks:
            lock.release()
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
    measured: MeasuredRows,
    summary: ScoringSummary,
) -> None:
    world = backend.world
    label = shard_name(index, config.shard_count)
    shard_started = time.perf_counter()
    usable = measured.usable(rows)
    excluded = measured.excluded(rows)
    # Sequence 2k is usable row k's chosen response, 2k + 1 its rejected one; a rank encodes a
    # row only when one of its own batches needs it.
    encoder = BatchEncoder(tokenizer, usable, measured)
    lengths = encoder.lengths
    batches = plan_batches(
        lengths,
        config.max_tokens,
        pad_to_multiple_of=config.pad_to_multiple_of,
        max_sequences=config.max_sequences,
    )
    mine = batches[world.dp_rank :: world.dp_size]
    stats = batch_stats(batches, lengths)
    log.info(
        "%s: %d rows (%d excluded), %d sequences in %d batches, %.1f%% padding",
        label,
        len(rows),
        len(excluded),
        len(lengths),
        stats.num_batches,
        100 * stats.padding_fraction,
    )

    results: dict[int, tuple[float, int]] = {}
    started = time.perf_counter()
    real_tokens = 0
    with _progress_bar(config, backend, sum(len(b.indices) for b in mine), label) as bar:
        for batch in mine:
            batch_sequences = encoder.sequences(batch.indices)
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
        if len(merged) != len(lengths):
            raise RuntimeError(f"{label}: gathered {len(merged)} of {len(lengths)} sequence scores")
        sums_array = np.array([merged[i][0] for i in range(len(lengths))], dtype=np.float64)
        count_array = np.array([merged[i][1] for i in range(len(lengths))], dtype=np.int64)
        scores = ShardScores(
            ids=[row.id for row in usable],
            scores=ModelScores(sums_array[0::2], sums_array[1::2], count_array[0::2], count_array[1::2]),
        )
        run_info = {
            "world_size": world.world_size,
            "data_parallel_size": world.dp_size,
            "tensor_model_parallel_size": config.tensor_model_parallel_size,
            "pipeline_model_parallel_size": config.pipeline_model_parallel_size,
            "batches": stats.num_batches,
            "max_tokens": config.max_tokens,
            "packing": config.packing,
            "padding_fraction": round(stats.padding_fraction, 6),
        }
        write_shard(
            config.output_dir,
            index,
            config.shard_count,
            identity,
            scores,
            excluded,
            len(rows),
            run_info,
            text_changes=measured.text_change_ids(usable),
        )
        refresh_manifest(config.output_dir)
        log.info("%s: written (%d rows scored)", label, len(usable))
    world.barrier()
    summary.shards_computed.append(index)
    summary.scoring_seconds += time.perf_counter() - shard_started
    summary.rows_scored += len(usable)
    summary.rows_excluded += len(excluded)
    summary.real_tokens += stats.real_tokens
    summary.padded_tokens += stats.padded_tokens
