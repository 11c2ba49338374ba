"""One generation job: one model answers every prompt ``sampling.n`` times.

Order of work, so that mistakes cost seconds: options, output directory, prompts (row
policy), tokenizer and chat template, every prompt of the pending shards rendered and
tokenised (prompts longer than ``data.max_prompt_length`` tokens are left out and recorded),
the manifest compared (a rerun with other inputs is refused), finished shards skipped; only
then is the model loaded. Each shard is written as it finishes, under a lock, so a killed job
loses at most the shard in flight.

Records (one per prompt id x sample index, in prompt-id order): ``prompt_id``,
``sample_index``, ``model``, ``text``, ``num_tokens``, ``finish_reason`` (``stop`` |
``length``), ``prompt_tokens``. What decides them (the identity): the model's files, its
tokenizer, chat template, template arguments and pinned date, the prompts (ids + messages),
``sampling.*``, the back end, ``dtype``, ``data.max_prompt_length``, the model name and the
shard count. With the transformers back end the records are the same for the same identity,
whatever ran before; vLLM seeds each prompt, but its kernels are not bitwise reproducible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nemo_infifpo.data.errors import ConfigError
from nemo_infifpo.data.policy import ExclusionLog, RowPolicy
from nemo_infifpo.data.scored_set import package_version
from nemo_infifpo.data.templates import ResponseTokenizer, TemplateError, load_tokenizer
from nemo_infifpo.generation import outputs
from nemo_infifpo.generation.backends import BACKENDS, Request, create_generator
from nemo_infifpo.generation.options import Options
from nemo_infifpo.generation.prompts import PromptRow, prompts_fingerprint, read_prompt_rows
from nemo_infifpo.generation.sampling import SamplingSettings, finish_sample
from nemo_infifpo.scoring.job import check_output_dir
from nemo_infifpo.scoring.manifest import model_fingerprint
from nemo_infifpo.scoring.shards import ShardedRunSummary

__all__ = ["GENERATION_COLUMNS", "GenerateConfig", "GenerationSummary", "run_generation"]

log = logging.getLogger(__name__)

GENERATION_COLUMNS = outputs.GENERATION_COLUMNS
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class GenerateConfig:
    """The options of ``recipes/generate.py`` (see ``configs/generate.yaml``)."""

    model_path: str
    data_path: str
    output_dir: str
    model_name: str | None = None
    backend: str = "hf"
    tensor_model_parallel_size: int = 1
    data_split: str | None = None
    max_prompt_length: int | None = None
    on_invalid_row: str = "exclude"
    max_excluded_fraction: float = 0.01
    tokenizer_path: str | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    template_date: str | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    dtype: str = "bfloat16"
    shard_index: int | None = None
    shard_count: int = 1
    max_tokens: int = 8192
    max_prompts: int = 16
    vllm_engine_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> GenerateConfig:
        o = Options(cfg)
        o.required("model.path", "data.path", "output_dir")
        policy = RowPolicy.from_mapping(o.mapping("data"))
        index, count = o.shard()
        sampling = SamplingSettings(
            n=o.integer("sampling.n", 1),  # type: ignore[arg-type]
            temperature=o.number("sampling.temperature", 0.8),  # type: ignore[arg-type]
            top_p=o.number("sampling.top_p", 1.0),  # type: ignore[arg-type]
            max_new_tokens=o.integer("sampling.max_new_tokens", 1024),  # type: ignore[arg-type]
            seed=o.integer("sampling.seed", 0),  # type: ignore[arg-type]
        )
        return cls(
            model_path=str(o.get("model.path")),
            model_name=o.string("model.name"),
            backend=str(o.get("model.backend", "hf")),
            tensor_model_parallel_size=o.integer("model.tensor_model_parallel_size", 1),  # type: ignore[arg-type]
            data_path=str(o.get("data.path")),
            data_split=o.string("data.split"),
            max_prompt_length=o.integer("data.max_prompt_length"),
            on_invalid_row=policy.on_invalid_row,
            max_excluded_fraction=policy.max_excluded_fraction,
            output_dir=str(o.get("output_dir")),
            tokenizer_path=o.string("tokenizer.path"),
            chat_template=o.string("tokenizer.chat_template"),
            chat_template_kwargs=o.mapping("tokenizer.chat_template_kwargs"),
            template_date=o.string("tokenizer.template_date"),
            sampling=sampling,
            dtype=str(o.get("dtype", "bfloat16")),
            shard_index=index,
            shard_count=count,
            max_tokens=o.integer("batch.max_tokens", 8192),  # type: ignore[arg-type]
            max_prompts=o.integer("batch.max_prompts", 16),  # type: ignore[arg-type]
            vllm_engine_args=o.mapping("vllm.engine_args"),
        )

    @property
    def policy(self) -> RowPolicy:
        return RowPolicy(self.on_invalid_row, self.max_excluded_fraction)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.model_path).name or str(self.model_path)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"model.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.tensor_model_parallel_size < 1:
            raise ConfigError(f"model.tensor_model_parallel_size must be >= 1, got {self.tensor_model_parallel_size}")
        if self.backend == "hf" and self.tensor_model_parallel_size != 1:
            raise ConfigError("the hf back end runs one model copy per process: set model.tensor_model_parallel_size=1 "
                              "(or use model.backend=vllm)")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"data.max_prompt_length must be >= 1 (or null), got {self.max_prompt_length}")
        if self.max_tokens < 1 or self.max_prompts < 1:
            raise ConfigError("batch.max_tokens and batch.max_prompts must be >= 1")
        self.policy  # validates data.on_invalid_row and data.max_excluded_fraction


@dataclass
class GenerationSummary(ShardedRunSummary):
    samples: int = 0
    seconds: float = 0.0


def prompt_tokenizer(config: GenerateConfig) -> tuple[ResponseTokenizer, list[int], Path]:
    """The model's renderer (its own chat template through the project's template module) and
    its stop tokens: the template's end-of-turn marker, EOS, the generation config's EOS ids."""
    from nemo_infifpo.models.checkpoint import hf_assets_dir

    directory = Path(config.tokenizer_path) if config.tokenizer_path else hf_assets_dir(config.model_path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory} (set tokenizer.path)")
    hf_tokenizer = load_tokenizer(directory)
    common: dict[str, Any] = dict(template_kwargs=config.chat_template_kwargs, template_date=config.template_date)
    renderer = ResponseTokenizer(hf_tokenizer, config.chat_template, **common)
    try:
        # The marker the template writes after an assistant message (the generation boundary's).
        end_of_turn = ResponseTokenizer(hf_tokenizer, config.chat_template, boundary="generation", **common).end_of_turn
    except TemplateError:
        end_of_turn = None  # no special token closes a turn: EOS alone stops generation
    stops: list[int] = []
    if end_of_turn:
        marker = renderer.text_ids(end_of_turn)
        stops.append(marker[-1])  # the special token that closes the turn
    if hf_tokenizer.eos_token_id is not None:
        stops.append(int(hf_tokenizer.eos_token_id))
    stops.extend(_generation_config_eos(Path(config.model_path)))
    if not stops:
        raise TemplateError(f"{directory}: no stop token (no end-of-turn marker, no eos_token): generation would never stop")
    return renderer, sorted(set(stops)), directory


def _generation_config_eos(model_dir: Path) -> list[int]:
    import json

    path = model_dir / "generation_config.json"
    if not path.is_file():
        return []
    value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def generation_identity(config: GenerateConfig, rows: list[PromptRow], renderer: ResponseTokenizer,
                        stop_ids: list[int]) -> outputs.StageIdentity:
    return outputs.StageIdentity(
        stage="generate",
        fields={
            "model_name": config.name,
            "model_fingerprint": model_fingerprint(config.model_path),
            "tokenizer_fingerprint": renderer.fingerprint(),
            "prompts_fingerprint": prompts_fingerprint(rows, with_extra=False),
            "sampling": config.sampling.to_dict(),
            "stop_ids": stop_ids,
            "backend": config.backend,
            "dtype": config.dtype,
            "max_prompt_length": config.max_prompt_length,
        },
        shard_count=config.shard_count,
    )


def run_generation(config: GenerateConfig) -> GenerationSummary:
    """Generate the requested shards (all of them without ``shard_index``), skipping those
    already complete in ``config.output_dir``."""
    from nemo_infifpo.locking import OutputLock

    config.validate()
    started = time.perf_counter()
    output_dir = check_output_dir(config.output_dir)
    summary = GenerationSummary(output_dir=output_dir)
    read = read_prompt_rows(config.data_path, split=config.data_split, policy=config.policy, stage="generate")
    if read.excluded:
        log.warning("%d of %d prompts of %s are invalid and left out", len(read.excluded), read.total, config.data_path)
    renderer, stop_ids, tokenizer_dir = prompt_tokenizer(config)
    identity = generation_identity(config, read.rows, renderer, stop_ids)
    info = {
        "model_path": str(Path(config.model_path).resolve()),
        "tokenizer_path": str(tokenizer_dir.resolve()),
        "template": renderer.describe(),
        "data_path": str(Path(config.data_path).resolve()),
        "num_prompts": len(read.rows),
        "read_total": read.total,
        "read_excluded": [entry.to_dict() for entry in read.excluded],
        "tensor_model_parallel_size": config.tensor_model_parallel_size,
        "package_version": package_version(),
    }
    outputs.check_or_create_manifest(output_dir, identity, info, create=True)

    wanted = [config.shard_index] if config.shard_index is not None else list(range(config.shard_count))
    slices = outputs.shard_slices(len(read.rows), config.shard_count)
    pending = []
    for index in wanted:
        problem = outputs.shard_is_complete(output_dir, index, identity)
        label = outputs.shard_name(index, config.shard_count)
        if problem is None:
            log.info("%s: complete, skipping", label)
            summary.shards_skipped.append(index)
        else:
            log.info("%s: to compute (%s)", label, problem)
            pending.append(index)
    if not pending:
        outputs.refresh_manifest(output_dir)
        summary.seconds = time.perf_counter() - started
        return summary

    # Every pending prompt rendered before the model loads: template problems cost seconds.
    encoded = {index: _encode_shard(config, renderer, read.rows[slices[index]]) for index in pending}
    pad_id = renderer.tokenizer.pad_token_id
    pad_id = int(pad_id) if pad_id is not None else stop_ids[0]
    generator = create_generator(
        config.backend, config.model_path, dtype=config.dtype, tensor_model_parallel_size=config.tensor_model_parallel_size,
        seed=config.sampling.seed, pad_id=pad_id, max_tokens=config.max_tokens, max_prompts=config.max_prompts,
        engine_args=config.vllm_engine_args,
    )
    try:
        for index in pending:
            label = outputs.shard_name(index, config.shard_count)
            with OutputLock(output_dir / f".{label}.lock", stage="generate", output=output_dir):
                if outputs.shard_is_complete(output_dir, index, identity) is None:
                    summary.shards_skipped.append(index)  # another task finished it meanwhile
                    continue
                requests, excluded = encoded[index]
                _generate_shard(config, generator, renderer, identity, index, requests, excluded, stop_ids, summary)
            outputs.refresh_manifest(output_dir)
    finally:
        generator.close()
    summary.seconds = time.perf_counter() - started
    log.info("generated %d samples in %.1f s", summary.samples, summary.seconds)
    return summary


def _encode_shard(config: GenerateConfig, renderer: ResponseTokenizer, rows: list[PromptRow]) -> tuple[list[Request], list[dict[str, Any]]]:
    invalid = ExclusionLog(config.policy, stage="generate", model=config.name)
    requests: list[Request] = []
    too_long: list[dict[str, Any]] = []
    for row in rows:
        try:
            ids = renderer.render_ids(row.messages, add_generation_prompt=True)
        except Exception as error:  # a template refusing a conversation (jinja), or a TemplateError
            if not _is_template_error(error):
                raise
            invalid.reject(TemplateError(f"prompt {row.id!r}: template {renderer.template_name!r} refused it: {error}",
                                         reason="template_refused", row_id=row.id), row_id=row.id)
            continue
        if config.max_prompt_length is not None and len(ids) > config.max_prompt_length:
            too_long.append({"id": row.id, "stage": "generate", "model": config.name, "reason": "max_length",
                             "detail": f"prompt of {len(ids)} tokens, longer than data.max_prompt_length={config.max_prompt_length}"})
            continue
        requests.append(Request(prompt_id=row.id, prompt_ids=ids))
    invalid.check(len(rows), what="prompts")
    return requests, [*too_long, *(entry.to_dict() for entry in invalid.entries)]


def _is_template_error(error: Exception) -> bool:
    import jinja2

    return isinstance(error, (jinja2.TemplateError, TemplateError))


def _generate_shard(config: GenerateConfig, generator: Any, renderer: ResponseTokenizer, identity: outputs.StageIdentity,
                    index: int, requests: list[Request], excluded: list[dict[str, Any]], stop_ids: list[int],
                    summary: GenerationSummary) -> None:
    label = outputs.shard_name(index, config.shard_count)
    started = time.perf_counter()
    samples = generator.generate(requests, config.sampling, stop_ids) if requests else []
    columns: dict[str, list[Any]] = {name: [] for name in GENERATION_COLUMNS}
    tokenizer = renderer.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    for request, raw_samples in zip(requests, samples, strict=True):  # requests are in prompt-id order
        for sample_index, raw in enumerate(raw_samples):
            sample = finish_sample(raw, stop_ids, config.sampling.max_new_tokens, decode)
            columns["prompt_id"].append(request.prompt_id)
            columns["sample_index"].append(sample_index)
            columns["model"].append(config.name)
            columns["text"].append(sample.text)
            columns["num_tokens"].append(sample.num_tokens)
            columns["finish_reason"].append(sample.finish_reason)
            columns["prompt_tokens"].append(len(request.prompt_ids))
    table = outputs.record_table("generate", columns)
    seconds = time.perf_counter() - started
    outputs.write_shard(config.output_dir, index, identity, table, num_prompts=len(requests) + len(excluded),
                        excluded=excluded, run_info={"seconds": round(seconds, 3), "samples": table.num_rows})
    summary.shards_computed.append(index)
    summary.samples += table.num_rows
    log.info("%s: %d prompts, %d samples (%d prompts excluded) in %.1f s", label, len(requests), table.num_rows,
             len(excluded), seconds)
