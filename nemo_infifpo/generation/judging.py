"""One judge job: a score for every candidate answer of every model, for the prompts of some
or all shards.

Inputs: the prompts (``data.path``) and the finished outputs of the generate stage
(``generation_dirs``, one per model; every one must be complete). Shards are slices of the
prompts sorted by id, as in generation, so the judge's shard count is independent of the
generators'. Order of work: options, output directory, prompts, the generation manifests,
the judge (for a reward model: its tokenizer and template), the manifest compared (a rerun
with other inputs — prompts, generation outputs, judge, dtype — is refused), finished shards
skipped; then each pending shard is read, judged and written under a lock.

Records (in prompt-id order; within a prompt, models in ``generation_dirs`` order, then sample
index): ``prompt_id``, ``model``, ``sample_index``, ``score``. An answer the judge could not
score (raised, returned NaN or no number; a conversation the template refuses or longer than
``judge.max_length``) has no record; the shard's sidecar lists it with the reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.data.policy import ExclusionLog, RowExclusion, RowPolicy
from nemo_infifpo.data.scored_set import package_version
from nemo_infifpo.generation import outputs
from nemo_infifpo.generation.judges import JUDGE_TYPES, FunctionJudge, Judgement, RewardModelJudge, plan_length_batches
from nemo_infifpo.generation.options import Options
from nemo_infifpo.generation.prompts import PromptRow, prompts_fingerprint, read_prompt_rows
from nemo_infifpo.scoring.job import check_output_dir
from nemo_infifpo.scoring.shards import ShardedRunSummary

__all__ = ["JUDGE_COLUMNS", "JudgeConfig", "JudgeSummary", "generation_sources", "run_judge"]

log = logging.getLogger(__name__)

JUDGE_COLUMNS = outputs.JUDGE_COLUMNS
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class JudgeConfig:
    """The options of ``recipes/judge.py`` (see ``configs/judge.yaml``)."""

    data_path: str
    generation_dirs: list[str]
    output_dir: str
    judge_type: str = "reward_model"
    model_path: str | None = None
    function: str | None = None
    tokenizer_path: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    template_date: str | None = None
    max_length: int | None = None
    max_failed_fraction: float = 0.05
    data_split: str | None = None
    on_invalid_row: str = "exclude"
    max_excluded_fraction: float = 0.01
    dtype: str = "bfloat16"
    max_tokens: int = 16384
    shard_index: int | None = None
    shard_count: int = 1

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> JudgeConfig:
        o = Options(cfg)
        o.required("data.path", "output_dir", "judge.type")
        policy = RowPolicy.from_mapping(o.mapping("data"))
        index, count = o.shard()
        return cls(
            data_path=str(o.get("data.path")),
            data_split=o.string("data.split"),
            generation_dirs=o.paths("generation_dirs"),
            output_dir=str(o.get("output_dir")),
            judge_type=str(o.get("judge.type")),
            model_path=o.string("judge.model_path"),
            function=o.string("judge.function"),
            tokenizer_path=o.string("judge.tokenizer_path"),
            chat_template=o.string("judge.chat_template"),
            chat_template_kwargs=o.mapping("judge.chat_template_kwargs"),
            template_date=o.string("judge.template_date"),
            max_length=o.integer("judge.max_length"),
            max_failed_fraction=o.number("judge.max_failed_fraction", 0.05),  # type: ignore[arg-type]
            on_invalid_row=policy.on_invalid_row,
            max_excluded_fraction=policy.max_excluded_fraction,
            dtype=str(o.get("dtype", "bfloat16")),
            max_tokens=o.integer("batch.max_tokens", 16384),  # type: ignore[arg-type]
            shard_index=index,
            shard_count=count,
        )

    @property
    def policy(self) -> RowPolicy:
        return RowPolicy(self.on_invalid_row, self.max_excluded_fraction)

    def validate(self) -> None:
        if self.judge_type not in JUDGE_TYPES:
            raise ConfigError(f"judge.type must be one of {', '.join(JUDGE_TYPES)}, got {self.judge_type!r}")
        if self.judge_type == "reward_model" and not self.model_path:
            raise ConfigError("judge.type=reward_model needs judge.model_path (a sequence-classification model directory)")
        if self.judge_type == "function" and not self.function:
            raise ConfigError("judge.type=function needs judge.function=package.module:name")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_tokens < 1:
            raise ConfigError(f"batch.max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"judge.max_length must be >= 2 (or null), got {self.max_length}")
        self.policy
        self.answer_policy

    @property
    def answer_policy(self) -> RowPolicy:
        """For answers the judge cannot score: ``judge.max_failed_fraction`` of a shard's answers
        may go (a few odd answers); more means a broken judge, which stops the shard."""
        try:
            return RowPolicy(self.on_invalid_row, self.max_failed_fraction)
        except ConfigError:
            raise ConfigError(f"judge.max_failed_fraction must be a number in [0, 1], got {self.max_failed_fraction!r}") from None


@dataclass
class JudgeSummary(ShardedRunSummary):
    scored: int = 0
    excluded: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class GenerationSource:
    """One finished generation output: its model name, directory and identity."""

    name: str
    directory: Path
    identity: outputs.StageIdentity


def generation_sources(directories: list[str]) -> list[GenerationSource]:
    """The finished generation outputs, in order; model names must differ."""
    sources = []
    for position, directory in enumerate(directories):
        _, identity = outputs.complete_manifest(directory, stage="generate", role=f"generation_dirs[{position}]")
        sources.append(GenerationSource(str(identity.fields["model_name"]), Path(directory), identity))
    names = [s.name for s in sources]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise InputError(f"generation_dirs: model name(s) {', '.join(duplicated)} appear twice; give each "
                         "generate run its own model.name")
    return sources


def read_candidates(sources: list[GenerationSource], first_id: str, last_id: str) -> dict[str, list[dict[str, Any]]]:
    """prompt id -> candidate records (models in order, then sample index) for prompt ids in
    ``[first_id, last_id]``; the sorted files let Parquet skip row groups outside the range."""
    import pyarrow.parquet as pq

    found: dict[str, list[dict[str, Any]]] = {}
    columns = ["prompt_id", "model", "sample_index", "text", "finish_reason"]
    for source in sources:
        for index in range(source.identity.shard_count):
            path = source.directory / f"{outputs.shard_name(index, source.identity.shard_count)}.parquet"
            table = pq.read_table(path, columns=columns,
                                  filters=[("prompt_id", ">=", first_id), ("prompt_id", "<=", last_id)])
            for record in table.to_pylist():
                found.setdefault(record["prompt_id"], []).append(record)
    return found


def judge_identity(config: JudgeConfig, rows: list[PromptRow], sources: list[GenerationSource],
                   judge_fingerprint: Mapping[str, Any]) -> outputs.StageIdentity:
    return outputs.StageIdentity(
        stage="judge",
        fields={
            "prompts_fingerprint": prompts_fingerprint(rows, with_extra=True),
            "generations": [[s.name, s.identity.digest()] for s in sources],
            "judge": dict(judge_fingerprint),
        },
        shard_count=config.shard_count,
    )


def run_judge(config: JudgeConfig) -> JudgeSummary:
    """Judge the requested shards, skipping those already complete. Collective over all ranks
    (torchrun/srun): ranks share a reward model's batches; rank 0 writes."""
    from nemo_infifpo.engine.distributed import read_launch_env
    from nemo_infifpo.locking import OutputLock

    config.validate()
    started = time.perf_counter()
    launch = read_launch_env()
    output_dir = check_output_dir(config.output_dir)
    summary = JudgeSummary(output_dir=output_dir)
    read = read_prompt_rows(config.data_path, split=config.data_split, policy=config.policy, stage="judge")
    sources = generation_sources(config.generation_dirs)
    if config.judge_type == "function":
        judge: FunctionJudge | RewardModelJudge = FunctionJudge(str(config.function))
    else:
        judge = RewardModelJudge(str(config.model_path), dtype=config.dtype, chat_template=config.chat_template,
                                 chat_template_kwargs=config.chat_template_kwargs, template_date=config.template_date,
                                 tokenizer_path=config.tokenizer_path, max_length=config.max_length)
    identity = judge_identity(config, read.rows, sources, judge.fingerprint())
    info = {"data_path": str(Path(config.data_path).resolve()), "num_prompts": len(read.rows),
            "generation_dirs": [str(s.directory.resolve()) for s in sources], "models": [s.name for s in sources],
            "read_excluded": [e.to_dict() for e in read.excluded], "package_version": package_version()}
    if isinstance(judge, RewardModelJudge):
        info["template"] = judge.renderer.describe()
    outputs.check_or_create_manifest(output_dir, identity, info, create=launch.rank == 0)

    wanted = [config.shard_index] if config.shard_index is not None else list(range(config.shard_count))
    slices = outputs.shard_slices(len(read.rows), config.shard_count)
    pending = [k for k in wanted if outputs.shard_is_complete(output_dir, k, identity) is not None]
    summary.shards_skipped = [k for k in wanted if k not in pending]
    world = _world(launch, isinstance(judge, RewardModelJudge) and bool(pending))
    pending = world.from_writer(pending)
    if isinstance(judge, RewardModelJudge) and pending:
        judge.load(world.device)
    for index in pending:
        label = outputs.shard_name(index, config.shard_count)
        lock = OutputLock(output_dir / f".{label}.lock", stage="judge", output=output_dir).acquire() if world.is_writer else None
        try:
            rows = read.rows[slices[index]]
            records, excluded = _judge_shard(config, judge, world, rows, sources)
            if world.is_writer:
                _write(config, identity, index, rows, records, excluded)
                outputs.refresh_manifest(output_dir)
                log.info("%s: %d prompts, %d answers scored, %d excluded", label, len(rows), len(records), len(excluded))
        finally:
            if lock is not None:
                lock.release()
        world.barrier()
        summary.shards_computed.append(index)
        summary.scored += len(records)
        summary.excluded += len(excluded)
    if not pending and world.is_writer:
        outputs.refresh_manifest(output_dir)
    summary.seconds = time.perf_counter() - started
    return summary


def _world(launch: Any, distributed: bool) -> Any:
    """Data-parallel ranks (a plain process group) for a reward model on several ranks."""
    import torch

    from nemo_infifpo.scoring.backends import ScoringWorld

    device = torch.device(f"cuda:{launch.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if launch.world_size > 1 and distributed and not torch.distributed.is_initialized():
        init = "env://" if launch.launcher == "torchrun" else f"tcp://{launch.master_addr}:{launch.master_port}"
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                                             rank=launch.rank, world_size=launch.world_size)
    if launch.world_size > 1 and not torch.distributed.is_initialized():
        # A function judge runs on one rank; the others have nothing to do.
        return ScoringWorld(rank=launch.rank, world_size=1, device=device) if launch.rank == 0 else _Idle(launch.rank)
    return ScoringWorld(rank=launch.rank, world_size=launch.world_size, dp_rank=launch.rank,
                        dp_size=launch.world_size, device=device)


class _Idle:
    """A rank with nothing to do (a function judge runs on rank 0 only)."""

    def __init__(self, rank: int) -> None:
        self.rank, self.world_size, self.dp_rank, self.dp_size, self.is_writer = rank, 1, 0, 1, False
        self.device = None

    def from_writer(self, value: Any) -> Any:
        return []

    def barrier(self) -> None:
        return None


def _judge_shard(config: JudgeConfig, judge: Any, world: Any, rows: list[PromptRow],
                 sources: list[GenerationSource]) -> tuple[list[tuple[str, str, int, float]], list[RowExclusion]]:
    order = {s.name: position for position, s in enumerate(sources)}
    candidates = read_candidates(sources, rows[0].id, rows[-1].id) if rows else {}
    flat: list[tuple[PromptRow, dict[str, Any]]] = []
    for row in rows:
        for record in sorted(candidates.get(row.id, []), key=lambda r: (order[r["model"]], r["sample_index"])):
            flat.append((row, record))
    if isinstance(judge, FunctionJudge):
        judgements = [j for row, record in flat for j in judge.judge(row.to_record(), [record["text"]])]
    else:
        judgements = _reward_model_judgements(config, judge, world, flat)
    log_ = ExclusionLog(config.answer_policy, stage="judge")
    records = []
    for (row, record), judgement in zip(flat, judgements, strict=True):
        if judgement.score is None:
            log_.add(RowExclusion(id=row.id, stage="judge", reason=str(judgement.reason), detail=str(judgement.detail),
                                  model=record["model"], location=f"sample {record['sample_index']}"))
        else:
            records.append((row.id, record["model"], int(record["sample_index"]), judgement.score))
    if log_.entries:
        log.warning("%d of %d answers could not be judged and are left out (first: %s, %s)", len(log_.entries),
                    len(flat), log_.entries[0].reason, log_.entries[0].detail)
    log_.check(len(flat), what="answers")
    return records, log_.entries


def _reward_model_judgements(config: JudgeConfig, judge: RewardModelJudge, world: Any,
                             flat: list[tuple[PromptRow, dict[str, Any]]]) -> list[Judgement]:
    import jinja2

    from nemo_infifpo.data.templates import TemplateError

    judgements: list[Judgement | None] = [None] * len(flat)
    encoded: dict[int, list[int]] = {}
    for i, (row, record) in enumerate(flat):
        try:
            ids = judge.encode(row.messages, record["text"])
        except (jinja2.TemplateError, TemplateError) as error:
            judgements[i] = Judgement(None, "template_refused", f"the reward model's template refused the conversation: {error}")
            continue
        if judge.max_length is not None and len(ids) > judge.max_length:
            judgements[i] = Judgement(None, "max_length", f"{len(ids)} tokens, longer than judge.max_length={judge.max_length}")
            continue
        encoded[i] = ids
    indices = sorted(encoded)
    batches = plan_length_batches([len(encoded[i]) for i in indices], config.max_tokens)
    mine: dict[int, float] = {}
    for batch in batches[world.dp_rank::world.dp_size]:
        members = [indices[b] for b in batch]
        for i, score in zip(members, judge.score_batch([encoded[i] for i in members]), strict=True):
            mine[i] = score
    gathered = world.gather_to_writer(mine) if world.world_size > 1 else [mine]
    if gathered is None:
        return [Judgement(0.0)] * len(flat)  # not the writer: its judgements are never used
    for part in gathered:
        for i, score in part.items():
            judgements[i] = Judgement(score) if score == score and abs(score) != float("inf") else Judgement(
                None, "judge_nan", f"the reward model returned {score}")
    missing = [i for i, j in enumerate(judgements) if j is None]
    if missing:
        raise RuntimeError(f"{len(missing)} answers were not scored by any rank; the batch plan is broken")
    return judgements  # type: ignore[return-value]


def _write(config: JudgeConfig, identity: outputs.StageIdentity, index: int, rows: list[PromptRow],
           records: list[tuple[str, str, int, float]], excluded: list[RowExclusion]) -> None:
    table = outputs.record_table("judge", {name: [r[k] for r in records] for k, name in enumerate(JUDGE_COLUMNS)})
    outputs.write_shard(config.output_dir, index, identity, table, num_prompts=len(rows),
                        excluded=[entry.to_dict() for entry in excluded])
