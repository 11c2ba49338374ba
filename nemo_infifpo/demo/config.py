"""The demo's configuration: typed dataclasses that ``configs/demo*.yaml`` must match.

The YAML is merged into :class:`DemoConfig` as an OmegaConf structured config, so an unknown
key or a value of the wrong type fails at start-up with the key's name, not minutes later in
a stage. (No ``from __future__ import annotations`` here: OmegaConf reads the annotations.)
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = [
    "DemoConfig",
    "EvaluationConfig",
    "GenerationConfig",
    "ModelSpec",
    "OriginConfig",
    "PairsConfig",
    "PreferenceConfig",
    "RESERVED_NAMES",
    "TrainConfig",
    "WorldConfig",
    "load_demo_config",
]

# The pivot after stage-1 SFT and after each preference objective (evaluated next to the pivot
# before fusion and the sources); no model of the world may take these names.
RESERVED_NAMES = ("p0", "dpo", "infifpo")


@dataclass
class WorldConfig:
    """The tasks: digit strings, one skill per prompt verb (see nemo_infifpo.demo.world)."""

    skills: List[str] = field(default_factory=lambda: ["reverse", "sort"])
    min_digits: int = 4
    max_digits: int = 6
    # Prompts the pivot and the sources answer (generate -> judge -> pairs, half SFT, half
    # preference), per skill.
    prompts_train_per_skill: int = 512
    # Prompts for choosing settings (recipes/demo_sweep.py), per skill; never in any training data.
    prompts_validation_per_skill: int = 128
    # Prompts of the final evaluation, per skill; never in any training or validation data.
    prompts_heldout_per_skill: int = 256
    # Probability that the checker's verdict on a training answer is flipped (a fallible judge,
    # see world.check_answer); 0: the checker is always right.
    judge_noise: float = 0.0


@dataclass
class TrainConfig:
    """One supervised run of recipes/train_infifpo.py (loss.type=sft), data parallel."""

    steps: int = 100
    global_batch_size: int = 32
    micro_batch_size: int = 16  # per data-parallel rank
    lr: float = 1.0e-3
    min_lr: float = 1.0e-4
    warmup_fraction: float = 0.05


@dataclass
class OriginConfig(TrainConfig):
    """How a model of the world came to be: supervised training on correct answers of its skill
    mix (the stand-in for the pre-training that made Phi-4, Qwen, ... what they are)."""

    # Fraction of the rows per skill (normalised); a skill left out is never seen.
    mix: Dict[str, float] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """One model of the world: its family, its tokenizer/chat template and what it knows."""

    name: str = "???"
    family: str = "???"  # nemo_infifpo.testing.models: phi3 | llama | mistral | qwen2
    tokenizer: str = "???"  # nemo_infifpo.testing.tokenizers builder: chatml | llama3 | phi | plain
    vocab_size: Optional[int] = None  # None: the tokenizer builder's default size
    seed: int = 0  # random initial weights
    # HF config fields for the tiny model (hidden_size, num_hidden_layers, ...).
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    origin: OriginConfig = field(default_factory=OriginConfig)
    # Answers sampled per training prompt (the paper: 8 for the pivot, 4 per source).
    samples: int = 4
    # recipes/score.py back end: megatron (TP/PP/DP) or hf (transformers).
    score_backend: str = "megatron"
    # Template variables for every render of this model's chat template, e.g.
    # {enable_thinking: false}; empty: none.
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationConfig:
    """recipes/generate.py settings shared by every model (the paper samples at 0.8)."""

    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 12
    max_prompts: int = 64  # prompts per generate call


@dataclass
class PairsConfig:
    """recipes/build_pairs.py: the share of prompts whose pair goes to SFT, and the minimum gap."""

    sft_fraction: float = 0.5
    min_gap: float = 0.0


@dataclass
class PreferenceConfig:
    """InfiFPO and the DPO baseline: same p0, data, layout, steps and optimiser; only
    loss.type differs (plus ``dpo_overrides``)."""

    tensor_model_parallel_size: int = 2
    pipeline_model_parallel_size: int = 1
    global_batch_size: int = 16
    micro_batch_size: int = 8
    steps: int = 32
    lr: float = 1.0e-4
    min_lr: float = 1.0e-5
    warmup_fraction: float = 0.1
    beta: float = 0.5
    length_norm: bool = True
    fusion: str = "max_margin"
    clip: bool = True
    include_pivot: bool = True
    # Extra recipes/train_infifpo.py overrides: for both runs, and for the DPO run only.
    overrides: List[str] = field(default_factory=list)
    dpo_overrides: List[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    """recipes/evaluate.py on the world's lm-eval tasks (greedy, exact match)."""

    split: str = "heldout"  # heldout (the final numbers) | validation (choosing settings)
    batch_size: int = 64
    max_new_tokens: int = 10
    # Generations per skill shown in the report.
    examples_per_skill: int = 3


@dataclass
class DemoConfig:
    output_dir: str = "demo-output"
    seed: int = 0
    # Replace an earlier demo's output directory (only one this demo wrote: it holds a marker).
    overwrite: bool = True
    # CPU slots: a torchrun stage takes `nproc` of them, any other stage one.
    parallel_jobs: int = 2
    nproc: int = 2
    # Per-stage wall-clock limit (a hung stage fails the demo instead of blocking it).
    stage_timeout_s: int = 900
    world: WorldConfig = field(default_factory=WorldConfig)
    pivot: ModelSpec = field(default_factory=ModelSpec)
    sources: List[ModelSpec] = field(default_factory=list)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    # Stage 1: the pivot's SFT on the SFT half of the pairs (prompt + chosen) -> p0.
    sft: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def load_demo_config(raw: Any) -> DemoConfig:
    """Validate ``raw`` (a DictConfig or mapping) against :class:`DemoConfig`."""
    from omegaconf import OmegaConf

    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = {k: v for k, v in raw.items() if k not in ("hydra", "defaults")}
    merged = OmegaConf.merge(OmegaConf.structured(DemoConfig), raw)
    config = OmegaConf.to_object(merged)
    assert isinstance(config, DemoConfig)
    _check(config)
    return config


def _check(c: DemoConfig) -> None:
    from nemo_infifpo.demo.world import SKILLS, TOKENIZER_BUILDERS

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(f"demo config: {message}")

    def check_train(name: str, t: TrainConfig) -> None:
        require(t.steps >= 1, f"{name}.steps must be >= 1")
        per_step = t.micro_batch_size * c.nproc
        require(t.global_batch_size % per_step == 0, f"{name}.global_batch_size must be a multiple of micro_batch_size x nproc = {per_step}")
        require(0 < t.min_lr <= t.lr, f"{name}: need 0 < min_lr <= lr")

    w = c.world
    require(len(w.skills) >= 1, "world.skills is empty")
    for skill in w.skills:
        require(skill in SKILLS, f"unknown skill {skill!r}; choose from {', '.join(SKILLS)}")
    require(len(set(w.skills)) == len(w.skills), "world.skills has duplicates")
    require(2 <= w.min_digits <= w.max_digits, "need 2 <= world.min_digits <= world.max_digits")
    require(
        min(w.prompts_train_per_skill, w.prompts_validation_per_skill, w.prompts_heldout_per_skill) >= 1,
        "world.prompts_*_per_skill must be >= 1",
    )
    require(0 <= w.judge_noise < 0.5, f"world.judge_noise must be in [0, 0.5), got {w.judge_noise}")
    require(len(c.sources) >= 1, "at least one source model is needed")
    names = [c.pivot.name] + [s.name for s in c.sources]
    require(len(set(names)) == len(names), f"model names must be unique, got {names}")
    require(not set(RESERVED_NAMES) & set(names), f"model names {', '.join(RESERVED_NAMES)} are reserved")
    for spec in [c.pivot, *c.sources]:
        require(spec.tokenizer in TOKENIZER_BUILDERS, f"{spec.name}: tokenizer must be one of {', '.join(TOKENIZER_BUILDERS)}")
        require(spec.score_backend in ("megatron", "hf"), f"{spec.name}: score_backend must be megatron or hf")
        require(spec.samples >= 1, f"{spec.name}: samples must be >= 1")
        mix = spec.origin.mix
        require(bool(mix) and all(k in w.skills for k in mix), f"{spec.name}: origin.mix must name skills of world.skills")
        require(all(v >= 0 and math.isfinite(v) for v in mix.values()) and sum(mix.values()) > 0, f"{spec.name}: origin.mix weights must be >= 0, not all 0")
        check_train(f"{spec.name}.origin", spec.origin)
    check_train("sft", c.sft)
    g = c.generation
    require(g.temperature >= 0 and 0 < g.top_p <= 1 and g.max_new_tokens >= w.max_digits + 1, "generation: need temperature >= 0, 0 < top_p <= 1, max_new_tokens > world.max_digits")
    require(0 < c.pairs.sft_fraction < 1, "pairs.sft_fraction must be in (0, 1): both halves are needed")
    p = c.preference
    layout = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    require(c.nproc % layout == 0, f"nproc ({c.nproc}) must be a multiple of TP x PP ({layout})")
    require(p.global_batch_size % (p.micro_batch_size * (c.nproc // layout)) == 0, "preference.global_batch_size must be a multiple of micro_batch_size x data-parallel size")
    require(c.evaluation.split in ("heldout", "validation"), f"evaluation.split must be heldout or validation, got {c.evaluation.split!r}")
    require(c.evaluation.max_new_tokens >= w.max_digits + 1, "evaluation.max_new_tokens must exceed world.max_digits (answer + end of turn)")
    require(c.parallel_jobs >= 1 and c.nproc >= 1, "parallel_jobs and nproc must be >= 1")
