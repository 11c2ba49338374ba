"""The demo's tiny fusion world, generated offline and deterministically from one seed.

Skills are digit-string tasks with one checkable answer each (``Reverse 48213`` -> ``31284``,
``Sort 4821`` -> ``1248``). Digits were chosen over letters on purpose: every tokenizer of
:mod:`nemo_infifpo.testing.tokenizers` splits numbers into single digits (Qwen/Llama-3-style
pre-tokenisation), so a 64-wide model can learn the task in a few hundred CPU steps, while
letter strings would be cut into corpus-dependent BPE pieces differently per tokenizer. The
models still differ where InfiFPO cares: vocabulary ids and sizes, prompt-word merges and
chat templates (so response token counts differ, e.g. ChatML's ``<|im_end|>\\n``).

Everything the pipeline needs is written here:

- one initial (random) Hugging Face model directory per model, with its tokenizer;
- SFT rows per model (its own skill mix) for ``recipes/train_infifpo.py loss.type=sft``;
- preference pairs (correct answer vs a plausible wrong one) per skill, train and held-out.

Held-out inputs are drawn first and never reused in any training data, so held-out accuracy
measures generalisation rather than recall.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.demo.config import DemoConfig, ModelSpec

__all__ = [
    "SKILLS",
    "TOKENIZER_BUILDERS",
    "Example",
    "Skill",
    "WorldFiles",
    "build_model_dir",
    "build_world",
    "read_jsonl",
    "skill_of",
    "write_jsonl",
]

_DIGITS = "0123456789"


@dataclass(frozen=True)
class Example:
    """One prompt with its correct answer and one plausible wrong answer."""

    id: str
    skill: str
    input: str
    prompt: str
    chosen: str
    rejected: str
    corruption: str  # how the wrong answer was made

    def record(self) -> dict[str, str]:
        # `skill`, `input` and `corruption` are extra columns: the row loaders ignore them.
        return {
            "id": self.id,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "skill": self.skill,
            "input": self.input,
            "corruption": self.corruption,
        }


@dataclass(frozen=True)
class Skill:
    """A digit-string task: a prompt verb and the function that answers it."""

    name: str
    verb: str
    solve: Callable[[str], str]

    def prompt(self, digits: str) -> str:
        return f"{self.verb} {digits}"

    def corruption_kinds(self, digits: str) -> list[str]:
        """The kinds of plausible mistake that apply to ``digits``.

        All keep the answer's length: off_by_one_digit (right shape, one wrong digit),
        adjacent_swap (the classic near miss) and echo_input (the input returned unchanged,
        what an untrained model tends to do; only when it differs from the answer). A
        shorter or longer wrong answer would mostly teach the pivot where the end-of-turn
        token goes, which the length normalisation of InfiFPO then rewards in odd ways.
        """
        kinds = ["adjacent_swap", "off_by_one_digit"]
        if digits != self.solve(digits):
            kinds.append("echo_input")
        return kinds

    def corrupt(self, digits: str, rng: random.Random) -> tuple[str, str]:
        """``(wrong answer, kind)``, never equal to the right answer."""
        answer = self.solve(digits)
        kinds = self.corruption_kinds(digits)
        for _ in range(100):
            kind = rng.choice(kinds)
            wrong = _corrupt(kind, digits, answer, rng)
            if wrong != answer and wrong:
                return wrong, kind
        raise RuntimeError(f"could not corrupt {self.name} answer for {digits!r}")  # pragma: no cover


def _corrupt(kind: str, digits: str, answer: str, rng: random.Random) -> str:
    chars = list(answer)
    if kind == "off_by_one_digit":
        i = rng.randrange(len(chars))
        chars[i] = str((int(chars[i]) + rng.choice((1, -1))) % 10)
        return "".join(chars)
    if kind == "adjacent_swap":
        options = [i for i in range(len(chars) - 1) if chars[i] != chars[i + 1]]
        if not options:
            return answer
        i = rng.choice(options)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
        return "".join(chars)
    if kind == "echo_input":
        return digits
    raise ValueError(f"unknown corruption {kind!r}")


SKILLS: dict[str, Skill] = {
    "reverse": Skill("reverse", "Reverse", lambda s: s[::-1]),
    "sort": Skill("sort", "Sort", lambda s: "".join(sorted(s))),
}


def _tokenizer_builders() -> dict[str, Callable[..., Any]]:
    from nemo_infifpo.testing import tokenizers

    return {
        "chatml": tokenizers.chatml_tokenizer,
        "llama3": tokenizers.llama3_tokenizer,
        "phi": tokenizers.phi_tokenizer,
        "plain": tokenizers.plain_tokenizer,
    }


# Names only (config validation must not import transformers); builders resolved on use.
TOKENIZER_BUILDERS: tuple[str, ...] = ("chatml", "llama3", "phi", "plain")


def skill_of(row_id: str) -> str:
    """Row ids are ``<skill>/<split>/<index>``."""
    return row_id.split("/", 1)[0]


# --------------------------------------------------------------------------- data


def _draw_input(rng: random.Random, min_digits: int, max_digits: int) -> str:
    length = rng.randint(min_digits, max_digits)
    return "".join(rng.choice(_DIGITS) for _ in range(length))


def _examples(
    skill: Skill, split: str, count: int, rng: random.Random, config: DemoConfig, avoid: set[str], unique: bool
) -> list[Example]:
    """``count`` examples whose inputs are not in ``avoid`` (and, if ``unique``, distinct)."""
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 1000 * count + 10000:
            raise ValueError(
                f"cannot draw {count} distinct {skill.name} inputs of {config.world.min_digits}-"
                f"{config.world.max_digits} digits outside the held-out set: widen world.max_digits"
            )
        digits = _draw_input(rng, config.world.min_digits, config.world.max_digits)
        if digits in avoid or (unique and digits in seen):
            continue
        answer = skill.solve(digits)
        wrong, kind = skill.corrupt(digits, rng)
        seen.add(digits)
        out.append(Example(f"{skill.name}/{split}/{len(out):05d}", skill.name, digits, skill.prompt(digits), answer, wrong, kind))
    return out


def _sft_counts(total: int, mix: dict[str, float], skills: list[str]) -> dict[str, int]:
    """Split ``total`` rows over the skills by ``mix`` (largest remainder, deterministic)."""
    weights = {s: float(mix.get(s, 0.0)) for s in skills}
    norm = sum(weights.values())
    exact = {s: total * w / norm for s, w in weights.items()}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(skills, key=lambda s: (counts[s] - exact[s], skills.index(s)))[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


@dataclass
class WorldFiles:
    """Where build_world put things, plus facts for the report."""

    root: Path
    model_dirs: dict[str, Path]  # model name -> initial HF directory
    sft_data: dict[str, Path]  # model name -> SFT rows
    # Pairs with synthetic near misses; with world.rejected=pivot the `pairs` stage replaces
    # the rejected side by p0's own mistakes (nemo_infifpo.demo.pairs).
    pairs_train: Path
    pairs_heldout: Path
    description: dict[str, Any]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_world(config: DemoConfig, root: str | Path) -> WorldFiles:
    """Write models, tokenizers and data under ``root`` (deterministic for ``config.seed``)."""
    root = Path(root)
    skills = [SKILLS[name] for name in config.world.skills]
    # One generator per purpose, so changing e.g. an SFT size leaves the held-out set unchanged.
    heldout_rng = random.Random(f"{config.seed}/heldout")
    train_rng = random.Random(f"{config.seed}/pairs")

    heldout = [e for s in skills for e in _examples(s, "heldout", config.world.pairs_heldout_per_skill, heldout_rng, config, set(), True)]
    avoid = {e.input for e in heldout}
    train = [e for s in skills for e in _examples(s, "train", config.world.pairs_train_per_skill, train_rng, config, avoid, True)]
    pairs_train = write_jsonl(root / "data" / "pairs_train.jsonl", [e.record() for e in train])
    pairs_heldout = write_jsonl(root / "data" / "pairs_heldout.jsonl", [e.record() for e in heldout])

    sft_data: dict[str, Path] = {}
    sft_counts: dict[str, dict[str, int]] = {}
    for spec in [config.pivot, *config.sources]:
        rng = random.Random(f"{config.seed}/sft/{spec.name}")
        counts = _sft_counts(spec.sft.steps * spec.sft.global_batch_size, spec.sft.mix, config.world.skills)
        # Inputs may repeat within SFT data (a stream of tasks), never with held-out ones.
        rows = [e for s in skills for e in _examples(s, f"sft-{spec.name}", counts[s.name], rng, config, avoid, False)]
        # Interleave skills: the recipe shuffles anyway, but the file reads better this way.
        rng.shuffle(rows)
        sft_data[spec.name] = write_jsonl(root / "data" / f"sft_{spec.name}.jsonl", [e.record() for e in rows])
        sft_counts[spec.name] = counts

    model_dirs: dict[str, Path] = {}
    models: dict[str, Any] = {}
    for role, spec in [("pivot", config.pivot)] + [("source", s) for s in config.sources]:
        directory, facts = build_model_dir(spec, root / "models" / "init" / spec.name, train[:1] + heldout[:1])
        model_dirs[spec.name] = directory
        models[spec.name] = {"role": role, **facts, "sft_rows": sft_counts[spec.name]}

    description = {
        "skills": {s.name: {"example": {"prompt": s.prompt("48213"), "answer": s.solve("48213")}} for s in skills},
        "digits": [config.world.min_digits, config.world.max_digits],
        "pairs_train": len(train),
        "pairs_heldout": len(heldout),
        "corruptions": sorted({e.corruption for e in train}),
        "models": models,
    }
    (root / "world.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return WorldFiles(root, model_dirs, sft_data, pairs_train, pairs_heldout, description)


# --------------------------------------------------------------------------- models


def build_model_dir(spec: ModelSpec, directory: Path, probe: list[Example]) -> tuple[Path, dict[str, Any]]:
    """A random tiny HF model of ``spec.family`` with ``spec.tokenizer``; returns facts about it.

    The model's bos/eos/pad ids are set to its tokenizer's, so the exported checkpoints
    generate (and stop at the end-of-turn token) with transformers' defaults.
    """
    from nemo_infifpo.data.rows import rows_from_records
    from nemo_infifpo.data.templates import ResponseTokenizer
    from nemo_infifpo.testing.models import tiny_hf_model
    from nemo_infifpo.testing.tokenizers import save_tokenizer

    tokenizer = _tokenizer_builders()[spec.tokenizer](spec.vocab_size)
    _check_coverage(spec, tokenizer)
    model = tiny_hf_model(
        spec.family,
        vocab_size=len(tokenizer),
        seed=spec.seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dict(spec.model_overrides),
    )
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)

    # What the report shows: the same row in this model's own tokens.
    response = ResponseTokenizer(tokenizer)
    pair = response.encode_pair(rows_from_records([probe[0].record()])[0])
    facts = {
        "family": spec.family,
        "architecture": type(model).__name__,
        "tokenizer": spec.tokenizer,
        "vocab_size": len(tokenizer),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "hidden_size": int(model.config.hidden_size),
        "layers": int(model.config.num_hidden_layers),
        "eos_token": tokenizer.eos_token,
        "probe": {
            "prompt": probe[0].prompt,
            "chosen": probe[0].chosen,
            "rendered": response.render_text(pair_messages(probe[0]), add_generation_prompt=False),
            "prompt_tokens": pair.chosen.response_start,
            "response_tokens": pair.chosen.num_response_tokens,
        },
    }
    return directory, facts


def pair_messages(example: Example) -> list[dict[str, str]]:
    return [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.chosen}]


def _check_coverage(spec: ModelSpec, tokenizer: Any) -> None:
    """Every digit is one token of its own and round-trips: the tasks are representable.

    (The tiny tokenizers are trained on a small built-in corpus; should that ever change,
    this fails here rather than as a model that cannot learn its skill.)
    """
    for digit in _DIGITS:
        ids = tokenizer(digit, add_special_tokens=False)["input_ids"]
        if len(ids) != 1 or tokenizer.decode(ids) != digit:
            raise ValueError(f"{spec.name}: tokenizer {spec.tokenizer!r} does not encode digit {digit!r} as one token")
    sample = "9081726354"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    if len(ids) != len(sample) or tokenizer.decode(ids) != sample:
        raise ValueError(f"{spec.name}: tokenizer {spec.tokenizer!r} merges digits ({sample!r} -> {len(ids)} tokens)")
