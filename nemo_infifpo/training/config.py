"""The training configuration: typed dataclasses, parsed and validated before anything is built.

A Hydra/OmegaConf config (or a plain dict) becomes a :class:`TrainConfig` through
:func:`parse_config`. Parsing is strict: an unknown key, a value of the wrong type or a value
outside its allowed set raises :class:`ConfigError` naming the full key (``loss.type``) and what
would be accepted, before any process group, model or data set is touched. Checks that need
the launch (data-parallel size) or the data (number of rows) live where that is known
(:mod:`nemo_infifpo.training.loop`), with messages in the same style.

The YAML files under ``configs/`` are the documented examples; every key there is a field
below.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin

# One ConfigError for every stage (an InputError: reported as one line, without a traceback).
from nemo_infifpo.data.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "LOSS_TYPES",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RESUME_GUARDED_KEYS",
    "TrainConfig",
    "TokenizerConfig",
    "TrainerConfig",
    "config_to_dict",
    "parse_config",
]

LossType = Literal["infifpo", "dpo", "ipo", "sft"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
Fusion = Literal["max_margin", "mean", "confidence"]
Precision = Literal["bf16", "fp32"]
Recompute = Literal["none", "selective", "full"]
Boundary = Literal["conversation", "generation"]
InvalidRowAction = Literal["exclude", "fail"]




# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelConfig:
    """The pivot: where it comes from and how it is laid out over the GPUs."""

    # Hugging Face directory (safetensors + config + tokenizer) or a checkpoint imported by
    # recipes/import_hf.py.
    path: str
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Pairs per micro-batch (each pair is two sequences, chosen and rejected, always together).
    micro_batch_size: int = 1
    # Pairs per optimizer step, over all data-parallel ranks and micro-batches.
    global_batch_size: int = 8
    precision: Precision = "fp32"
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    # None: Transformer Engine when importable on a CUDA machine.
    use_transformer_engine: Optional[bool] = None
    # CUDA only: shard the optimizer state over data-parallel ranks (megatron's ZeRO-1).
    use_distributed_optimizer: bool = True
    # CUDA only: reduce gradients bucket by bucket during the backward pass, and (with the
    # distributed optimizer) all-gather updated parameters during the next forward pass.
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    # Elements per communication bucket; None: megatron's default (max(40M, 1M x DP)).
    ddp_bucket_size: Optional[int] = None


@dataclass(frozen=True)
class TokenizerConfig:
    """The pivot's tokenizer and chat template: must be those the pivot was scored with
    (recipes/score.py takes the same two keys)."""

    # None: the model's own tokenizer (model.path, or its hf_assets when it is a checkpoint).
    path: Optional[str] = None
    # None: the tokenizer's template; or a built-in name, Jinja text, or a .jinja file.
    chat_template: Optional[str] = None
    # Extra template variables for every render (e.g. {enable_thinking: false}).
    chat_template_kwargs: Optional[dict] = None
    # conversation: response tokens = full render minus prompt render; generation: the
    # generation prompt + response text + end-of-turn marker (reasoning templates).
    boundary: Boundary = "conversation"
    # The date a clock-reading template sees (YYYY-MM-DD); None: the package default.
    template_date: Optional[str] = None


@dataclass(frozen=True)
class DataConfig:
    # The scored training set (recipes/merge_scores.py); for loss.type=sft any preference file.
    path: str
    shuffle: bool = True
    # Rows whose chosen or rejected sequence is longer are left out (never truncated).
    max_length: int = 4096
    # Pack pairs into fixed-length bins instead of padding each micro-batch.
    pack_sequences: bool = False
    # Bin length in tokens when packing; None = 2 * max_length (one pair of maximal length).
    pack_length: Optional[int] = None
    # Compare the pivot tokenizer/template fingerprint with the one stored by scoring.
    check_fingerprint: bool = True
    # Sequences are padded to a multiple of this (tensor cores; sequence parallel needs TP | S).
    pad_to_multiple_of: int = 8
    # A row the pivot's template cannot encode: leave it out (recorded) or stop the run.
    on_invalid_row: InvalidRowAction = "exclude"
    # Fail when more than this fraction of the rows is invalid.
    max_excluded_fraction: float = 0.01


@dataclass(frozen=True)
class LossConfig:
    # infifpo: Eq. 13 (sigmoid); ipo: InfiFPO-IPO (Eq. 22); dpo: DPO against p0 (sources
    # ignored); sft: token-mean cross-entropy on the chosen response.
    type: LossType = "infifpo"
    beta: float = 2.5
    fusion: Fusion = "max_margin"
    clip: bool = True
    length_norm: bool = True
    include_pivot: bool = True


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-7
    min_lr: float = 0.0
    # Fraction of the total steps spent in linear warm-up (then cosine decay to min_lr).
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    # Global gradient-norm clip; 0 disables clipping (the norm is still measured and logged).
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainerConfig:
    # -1: run max_epochs epochs over the data (global batches that do not fill up are dropped).
    max_steps: int = -1
    max_epochs: int = 1
    # Before the first update, recompute the pivot's scores of the first global batch and
    # compare them with the precomputed p0 scores (catches template / layout / dtype bugs).
    step0_parity_check: bool = True
    # Tolerance per token: on the token-mean scores with length_norm; without it, a summed
    # score over T tokens is allowed atol * T (rounding grows with T). fp32 agrees to ~1e-5;
    # bf16 needs ~1e-2.
    step0_parity_atol: float = 1e-3


# What a resume must keep as it was (nemo_infifpo.training.resume): the weights and optimizer
# state continue from the checkpoint, so a change here would silently mix two runs.
RESUME_GUARDED_KEYS: tuple[str, ...] = (
    "model.path", "model.precision", "tokenizer.path", "tokenizer.chat_template",
    "data.path", "data.max_length", "data.shuffle",
    "loss.type", "loss.beta", "loss.fusion", "loss.clip", "loss.length_norm", "loss.include_pivot",
    "optim.lr", "optim.min_lr", "optim.warmup_fraction", "optim.weight_decay", "optim.adam_beta1",
    "optim.adam_beta2", "optim.adam_eps", "optim.grad_clip",
    "trainer.max_steps", "trainer.max_epochs", "seed",
)


@dataclass(frozen=True)
class CheckpointConfig:
    # Save every `interval` steps (0: only at the end and on SIGTERM/SIGUSR1).
    interval: int = 0
    keep_last: int = 2
    # Continue from output_dir/checkpoints/latest when it exists.
    resume: bool = True
    save_final: bool = True
    # Verify every file of the checkpoint against its checksums before resuming from it.
    verify_checksums: bool = True
    # Keys of RESUME_GUARDED_KEYS that may differ from the checkpoint's run when resuming
    # (e.g. [optim.lr, trainer.max_steps]); any other difference refuses the resume.
    allow_changes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    # output_dir/metrics.jsonl always gets one record per step; these are the extras.
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "nemo-infifpo"
    wandb_name: Optional[str] = None
    progress_bar: bool = True


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    output_dir: str
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234

    @property
    def needs_p0_scores(self) -> bool:
        """Every loss but SFT compares the pivot with the initial pivot p0's precomputed scores."""
        return self.loss.type != "sft"

    @property
    def pack_length(self) -> int:
        return self.data.pack_length or 2 * self.data.max_length


# --------------------------------------------------------------------------- parsing


_MISSING = "???"  # OmegaConf's marker for a mandatory value


def parse_config(raw: Any) -> TrainConfig:
    """Validate ``raw`` (a ``DictConfig`` or a plain mapping) into a :class:`TrainConfig`."""
    data = _to_plain(raw)
    if not isinstance(data, Mapping):
        raise ConfigError(f"the configuration must be a mapping of sections, got {type(data).__name__}")
    config = _parse_dataclass(TrainConfig, data, prefix="")
    _check_values(config)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (for logging, checkpoints and the NeMo model's ``cfg``)."""
    return dataclasses.asdict(config)


def _to_plain(raw: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return raw
    if isinstance(raw, (DictConfig, ListConfig)):
        missing = sorted(_missing_keys(raw))
        if missing:
            raise ConfigError(
                f"mandatory config key(s) not set: {', '.join(missing)} (pass e.g. {missing[0]}=...)"
            )
        return OmegaConf.to_container(raw, resolve=True)
    return raw


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    keys: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            name = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                keys.append(name)
            else:
                keys.extend(_missing_keys(node[key], f"{name}."))
    return keys


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _describe(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _convert(annotation: Any, value: Any, key: str) -> Any:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = [a for a in options if a is not type(None)]
        if value is None:
            raise ConfigError(f"config key {key!r} must be {_describe(inner)}, got null")
        return _convert(inner, value, key)
    if value == _MISSING:
        raise ConfigError(f"mandatory config key {key!r} is not set (pass {key}=...)")
    if origin is Literal:
        allowed = get_args(annotation)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            raise ConfigError(
                f"config key {key!r} has value {value!r}; allowed values: "
                + ", ".join(repr(v) for v in allowed)
            )
        return value
    if annotation is dict:  # a free-form mapping (template variables)
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a mapping, got {_type_name(value)} {value!r}")
        return dict(value)
    if origin is tuple:  # tuple[X, ...]: a YAML list (or Hydra's [a,b]) of X
        (inner, _) = get_args(annotation)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {_type_name(value)} {value!r}")
        return tuple(_convert(inner, item, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {key!r} must be a section (mapping), got {_type_name(value)}")
        return _parse_dataclass(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r} must be an integer, got {_type_name(value)} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r} must be a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"config key {key!r} must be finite, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string, got {_type_name(value)} {value!r}")
        return value
    raise TypeError(f"unsupported config field type {annotation!r} for {key!r}")  # programming error


def _parse_dataclass(cls: type, values: Mapping[str, Any], *, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = str(unknown[0])
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
        section = f"section {prefix[:-1]!r}" if prefix else "the top level"
        raise ConfigError(
            f"unknown config key {prefix + key!r}{hint}; allowed keys in {section}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name in values:
            kwargs[name] = _convert(hints[name], values[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"mandatory config key {key!r} is not set (pass {key}=...)")
    return cls(**kwargs)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} {message}")


def _check_values(c: TrainConfig) -> None:
    m, d, lo, o, t, ck = c.model, c.data, c.loss, c.optim, c.trainer, c.checkpoint
    _require(bool(m.path), "model.path", "must name the pivot's directory")
    _require(bool(d.path), "data.path", "must name the training data")
    _require(bool(c.output_dir), "output_dir", "must name a directory")
    for key, value in (
        ("model.tensor_model_parallel_size", m.tensor_model_parallel_size),
        ("model.pipeline_model_parallel_size", m.pipeline_model_parallel_size),
        ("model.micro_batch_size", m.micro_batch_size),
        ("model.global_batch_size", m.global_batch_size),
        ("trainer.max_epochs", t.max_epochs),
        ("checkpoint.keep_last", ck.keep_last),
        ("data.pad_to_multiple_of", d.pad_to_multiple_of),
    ):
        _require(value >= 1, key, f"must be >= 1, got {value}")
    _require(
        m.global_batch_size % m.micro_batch_size == 0,
        "model.global_batch_size",
        f"({m.global_batch_size}) must be a multiple of model.micro_batch_size ({m.micro_batch_size})",
    )
    _require(d.max_length >= 2, "data.max_length", f"must be >= 2, got {d.max_length}")
    _require(
        0 <= d.max_excluded_fraction <= 1, "data.max_excluded_fraction", f"must be in [0, 1], got {d.max_excluded_fraction}"
    )
    if m.ddp_bucket_size is not None:
        _require(m.ddp_bucket_size >= 1, "model.ddp_bucket_size", f"must be >= 1 or null, got {m.ddp_bucket_size}")
    if d.pack_length is not None:
        _require(
            d.pack_length >= 2 * d.max_length,
            "data.pack_length",
            f"({d.pack_length}) must be >= 2 * data.max_length ({2 * d.max_length}) so that every "
            "pair (chosen + rejected) fits one bin",
        )
    _require(t.max_steps == -1 or t.max_steps >= 1, "trainer.max_steps", f"must be -1 or >= 1, got {t.max_steps}")
    _require(t.step0_parity_atol > 0, "trainer.step0_parity_atol", f"must be > 0, got {t.step0_parity_atol}")
    _require(ck.interval >= 0, "checkpoint.interval", f"must be >= 0, got {ck.interval}")
    for name in ck.allow_changes:
        _require(
            name in RESUME_GUARDED_KEYS,
            "checkpoint.allow_changes",
            f"names {name!r}, which is not checked on resume; checked keys: {', '.join(RESUME_GUARDED_KEYS)}",
        )
    _require(lo.beta > 0, "loss.beta", f"must be > 0, got {lo.beta}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
    _require(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", f"must be in [0, 1), got {o.warmup_fraction}")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 = no clipping), got {o.grad_clip}")
    _require(0 <= o.adam_beta1 < 1, "optim.adam_beta1", f"must be in [0, 1), got {o.adam_beta1}")
    _require(0 <= o.adam_beta2 < 1, "optim.adam_beta2", f"must be in [0, 1), got {o.adam_beta2}")
    _require(o.adam_eps > 0, "optim.adam_eps", f"must be > 0, got {o.adam_eps}")
    if m.sequence_parallel:
        _require(
            m.tensor_model_parallel_size > 1,
            "model.sequence_parallel",
            "needs model.tensor_model_parallel_size > 1",
        )
