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
    "ModelSpec",
    "PreferenceConfig",
    "SFTConfig",
    "WorldConfig",
    "load_demo_config",
]


@dataclass
class WorldConfig:
    """The tasks: digit strings, one skill per prompt verb (see nemo_infifpo.demo.world)."""

    skills: List[str] = field(default_factory=lambda: ["reverse", "sort"])
    min_digits: int = 4
    max_digits: int = 6
    # Preference pairs (correct answer vs a plausible wrong one) per skill.
    pairs_train_per_skill: int = 512
    pairs_heldout_per_skill: int = 256
    # The wrong answer: "pivot" = p0's own greedy answer where it is wrong, else a synthetic
    # near miss (nemo_infifpo.demo.pairs); "synthetic" = always the near miss.
    rejected: str = "pivot"


@dataclass
class SFTConfig:
    """Supervised fine-tuning of one model through recipes/train_infifpo.py (loss.type=sft)."""

    steps: int = 400
    global_batch_size: int = 32
    micro_batch_size: int = 16  # per data-parallel rank
    lr: float = 3.0e-3
    min_lr: float = 3.0e-4
    warmup_fraction: float = 0.05
    # Fraction of the SFT rows per skill (normalised); a skill left out is never seen.
    mix: Dict[str, float] = field(default_factory=dict)


@dataclass
class ModelSpec:
    """One model of the world: its family, its tokenizer/chat template and what it learns."""

    name: str = "???"
    family: str = "???"  # nemo_infifpo.testing.models: phi3 | llama | mistral | qwen2
    tokenizer: str = "???"  # nemo_infifpo.testing.tokenizers builder: chatml | llama3 | phi | plain
    vocab_size: Optional[int] = None  # None: the tokenizer builder's default size
    seed: int = 0  # random initial weights
    # HF config fields for the tiny model (hidden_size, num_hidden_layers, ...).
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    sft: SFTConfig = field(default_factory=SFTConfig)
    # recipes/score.py back end: megatron (TP/PP/DP) or hf (transformers).
    score_backend: str = "megatron"
    # Template variables for every render of this model's chat template (SFT, scoring, and for
    # the pivot preference training), e.g. {enable_thinking: false}; empty: none.
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PreferenceConfig:
    """InfiFPO and the DPO baseline: same pivot, data, layout, steps and optimiser; only
    loss.type differs (plus ``dpo_overrides``)."""

    tensor_model_parallel_size: int = 2
    pipeline_model_parallel_size: int = 1
    global_batch_size: int = 16
    micro_batch_size: int = 8
    steps: int = 64
    lr: float = 2.0e-4
    min_lr: float = 2.0e-5
    warmup_fraction: float = 0.1
    beta: float = 0.25  # see configs/demo.yaml for why not the paper's 2.5
    length_norm: bool = True
    fusion: str = "max_margin"
    clip: bool = True
    include_pivot: bool = True
    # Extra recipes/train_infifpo.py overrides: for both runs, and for the DPO run only.
    overrides: List[str] = field(default_factory=list)
    dpo_overrides: List[str] = field(default_factory=list)


@dataclass
class EvaluationConfig:
    max_new_tokens: int = 10
    batch_size: int = 64
    # Generations per skill and model shown in the report.
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
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def load_demo_config(raw: Any) -> DemoConfig:
    """Validate ``raw`` (a DictConfig or mapping) against :class:`DemoConfig`."""
    from omegaconf import OmegaConf

    if not isinstance(raw, dict):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = {k: v for k, v in raw.items() if k != "hydra"}
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

    require(len(c.world.skills) >= 1, "world.skills is empty")
    for skill in c.world.skills:
        require(skill in SKILLS, f"unknown skill {skill!r}; choose from {', '.join(SKILLS)}")
    require(len(set(c.world.skills)) == len(c.world.skills), "world.skills has duplicates")
    require(2 <= c.world.min_digits <= c.world.max_digits, "need 2 <= world.min_digits <= world.max_digits")
    require(c.world.rejected in ("pivot", "synthetic"), f"world.rejected must be pivot or synthetic, got {c.world.rejected!r}")
    require(c.world.pairs_train_per_skill >= 1 and c.world.pairs_heldout_per_skill >= 1, "pair counts must be >= 1")
    require(len(c.sources) >= 1, "at least one source model is needed")
    names = [c.pivot.name] + [s.name for s in c.sources]
    require(len(set(names)) == len(names), f"model names must be unique, got {names}")
    require(not {"p0", "dpo", "infifpo"} & set(names), "model names p0, dpo, infifpo are reserved")
    for spec in [c.pivot, *c.sources]:
        require(spec.tokenizer in TOKENIZER_BUILDERS, f"{spec.name}: tokenizer must be one of {', '.join(TOKENIZER_BUILDERS)}")
        require(spec.score_backend in ("megatron", "hf"), f"{spec.name}: score_backend must be megatron or hf")
        mix = spec.sft.mix
        require(bool(mix) and all(k in c.world.skills for k in mix), f"{spec.name}: sft.mix must name skills of world.skills")
        require(all(v >= 0 and math.isfinite(v) for v in mix.values()) and sum(mix.values()) > 0, f"{spec.name}: sft.mix weights must be >= 0, not all 0")
        require(spec.sft.steps >= 1, f"{spec.name}: sft.steps must be >= 1")
        per_step = spec.sft.micro_batch_size * c.nproc
        require(spec.sft.global_batch_size % per_step == 0, f"{spec.name}: sft.global_batch_size must be a multiple of micro_batch_size x nproc = {per_step}")
    p = c.preference
    layout = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    require(c.nproc % layout == 0, f"nproc ({c.nproc}) must be a multiple of TP x PP ({layout})")
    require(p.global_batch_size % (p.micro_batch_size * (c.nproc // layout)) == 0, "preference.global_batch_size must be a multiple of micro_batch_size x data-parallel size")
    require(c.parallel_jobs >= 1 and c.nproc >= 1, "parallel_jobs and nproc must be >= 1")
