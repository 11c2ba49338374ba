"""The demo's tiny fusion world, generated offline and deterministically from one seed.

Skills are digit-string tasks with one checkable answer each (``Reverse 48213`` -> ``31284``,
``Sort 4821`` -> ``1248``). Digits were chosen over letters on purpose: every tokenizer of
:mod:`nemo_infifpo.testing.tokenizers` splits numbers into single digits (Qwen/Llama-3-style
pre-tokenisation), so a 64-wide model can learn the task in a few hundred CPU steps, while
letter strings would be cut into corpus-dependent BPE pieces differently per tokenizer. The
models still differ where InfiFPO cares: vocabulary ids and sizes, prompt-word merges and
chat templates (so response token counts differ, e.g. ChatML's ``<|im_end|>\\n``).

Everything the recipe needs is written here:

- prompts (``id``, ``prompt``, ``skill``, ``input``, ``reference``) in three disjoint splits:
  *train* (answered, judged and turned into SFT rows and preference pairs), *validation*
  (choosing settings) and *held-out* (the final evaluation);
- one initial (random) Hugging Face model directory per model, with its tokenizer, and its
  *origin* rows: correct answers of its skill mix, from which the model of the world is made
  (a specialist source, or the pivot before fusion);
- lm-eval tasks (``demo_<skill>`` on the held-out prompts, ``demo_<skill>_validation``) for
  ``recipes/evaluate.py``.

:func:`check_answer` is the world's checker, the function judge of ``recipes/judge.py``.
Held-out inputs are drawn first and validation inputs next, and neither is ever used in any
training data, so their accuracy measures generalisation rather than recall.
"""

from __future__ import annotations

import hashlib
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
    "check_answer",
    "load_world",
    "prompt_record",
    "read_jsonl",
    "skill_of",
    "task_name",
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
    """Prompt ids are ``<skill>/<split>/<index>``."""
    return row_id.split("/", 1)[0]


def check_answer(row: dict[str, Any], answer: str) -> float:
    """The world's checker (``judge.function=nemo_infifpo.demo.world:check_answer``): the
    share of answer positions that hold the right digit, over the longer of answer and
    reference. 1.0 only for the exact answer; like the share of unit tests a program passes, it
    ranks a near miss above nonsense, so the worst sample of a prompt is a clear mistake.

    A prompt row may carry ``judge_noise`` (``world.judge_noise``): with that probability the
    verdict is flipped to ``1 - score``, a fallible judge such as a reward model that sometimes
    prefers the wrong answer. Which answers are flipped is fixed by a hash of the prompt id and
    the answer, so a rerun judges identically.
    """
    reference = str(row["reference"])
    got = answer.strip()
    if got == reference:
        score = 1.0
    else:
        right = sum(1 for a, b in zip(got, reference) if a == b)
        score = right / max(len(got), len(reference), 1)
    noise = float(row.get("judge_noise", 0.0))
    if noise > 0 and _unit_interval(f"{row['id']}\0{got}") < noise:
        return 1.0 - score
    return score


def _unit_interval(text: str) -> float:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2.0**64


# --------------------------------------------------------------------------- data


def _draw_input(rng: random.Random, min_digits: int, max_digits: int) -> str:
    length = rng.randint(min_digits, max_digits)
    return "".join(rng.choice(_DIGITS) for _ in range(length))


def _draw_inputs(count: int, rng: random.Random, config: DemoConfig, avoid: set[str], *, unique: bool, what: str) -> list[str]:
    """``count`` inputs not in ``avoid`` (and, if ``unique``, distinct)."""
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 1000 * count + 10000:
            raise ValueError(
                f"cannot draw {count} distinct {what} inputs of {config.world.min_digits}-"
                f"{config.world.max_digits} digits outside the other splits: widen world.max_digits"
            )
        digits = _draw_input(rng, config.world.min_digits, config.world.max_digits)
        if digits in avoid or (unique and digits in seen):
            continue
        seen.add(digits)
        out.append(digits)
    return out


def prompt_record(skill: Skill, split: str, index: int, digits: str) -> dict[str, str]:
    """One prompt row: what generate, judge and the lm-eval tasks read."""
    return {
        "id": f"{skill.name}/{split}/{index:05d}",
        "prompt": skill.prompt(digits),
        "skill": skill.name,
        "input": digits,
        "reference": skill.solve(digits),
    }


def _origin_counts(total: int, mix: dict[str, float], skills: list[str]) -> dict[str, int]:
    """Split ``total`` rows over the skills by ``mix`` (largest remainder, deterministic)."""
    weights = {s: float(mix.get(s, 0.0)) for s in skills}
    norm = sum(weights.values())
    exact = {s: total * w / norm for s, w in weights.items()}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(skills, key=lambda s: (counts[s] - exact[s], skills.index(s)))[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


PROMPT_SPLITS = ("train", "validation", "heldout")


@dataclass
class WorldFiles:
    """Where build_world put things, plus facts for the report."""

    root: Path
    model_dirs: dict[str, Path]  # model name -> initial (random) HF directory
    origin_data: dict[str, Path]  # model name -> the rows that make it what it is
    prompts: dict[str, Path]  # split -> prompt rows
    tasks: Path  # lm-eval include_path
    description: dict[str, Any]

    def task_names(self, split: str) -> list[str]:
        return [task_name(skill, split) for skill in self.description["skills"]]


def task_name(skill: str, split: str) -> str:
    """The lm-eval task of ``skill`` on the held-out (``demo_<skill>``) or validation prompts."""
    return f"demo_{skill}" if split == "heldout" else f"demo_{skill}_{split}"


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_task(directory: Path, skill: str, split: str, records: list[dict[str, str]], max_new_tokens: int) -> Path:
    """An lm-eval ``generate_until`` task over ``records``: the greedy answer to the templated
    prompt, exact match with the reference (surrounding whitespace ignored)."""
    name = task_name(skill, split)
    data = write_jsonl(directory / f"{name}.jsonl", records)
    path = directory / f"{name}.yaml"
    path.write_text(
        "\n".join([
            f"task: {name}",
            "dataset_path: json",
            "dataset_kwargs:",
            "  data_files:",
            f"    test: {json.dumps(str(data.resolve()))}",
            "test_split: test",
            "output_type: generate_until",
            'doc_to_text: "{{prompt}}"',
            'doc_to_target: "{{reference}}"',
            "generation_kwargs:",
            '  until: ["\\n"]',
            f"  max_gen_toks: {max_new_tokens}",
            "  do_sample: false",
            "metric_list:",
            "  - metric: exact_match",
            "    aggregation: mean",
            "    higher_is_better: true",
            '    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]',
            "metadata:",
            "  version: 1.0",
            "",
        ]),
        encoding="utf-8",
    )
    return path


def build_world(config: DemoConfig, root: str | Path) -> WorldFiles:
    """Write models, tokenizers, prompts, origin rows and tasks under ``root``
    (deterministic for ``config.seed``)."""
    root = Path(root)
    skills = [SKILLS[name] for name in config.world.skills]
    w = config.world
    # One generator per purpose, so changing e.g. an origin size leaves the prompts unchanged.
    counts = {"heldout": w.prompts_heldout_per_skill, "validation": w.prompts_validation_per_skill, "train": w.prompts_train_per_skill}
    prompts: dict[str, Path] = {}
    avoid: set[str] = set()
    records: dict[str, list[dict[str, str]]] = {}
    for split in ("heldout", "validation", "train"):  # held-out first: it never depends on the others
        rng = random.Random(f"{config.seed}/prompts/{split}")
        split_records = []
        for skill in skills:
            inputs = _draw_inputs(counts[split], rng, config, avoid, unique=True, what=f"{skill.name} {split}")
            split_records += [prompt_record(skill, split, i, digits) for i, digits in enumerate(inputs)]
        if split != "train":
            avoid |= {r["input"] for r in split_records}
        elif w.judge_noise > 0:  # only the judge reads it: the prompts it judges carry it
            split_records = [{**r, "judge_noise": w.judge_noise} for r in split_records]
        records[split] = split_records
        prompts[split] = write_jsonl(root / "data" / f"prompts_{split}.jsonl", split_records)

    tasks = root / "tasks"
    for split in ("heldout", "validation"):
        for skill in skills:
            rows = [r for r in records[split] if r["skill"] == skill.name]
            write_task(tasks, skill.name, split, rows, config.evaluation.max_new_tokens)

    origin_data: dict[str, Path] = {}
    origin_counts: dict[str, dict[str, int]] = {}
    for spec in [config.pivot, *config.sources]:
        rng = random.Random(f"{config.seed}/origin/{spec.name}")
        per_skill = _origin_counts(spec.origin.steps * spec.origin.global_batch_size, spec.origin.mix, config.world.skills)
        rows: list[Example] = []
        for skill in skills:
            # A stream of tasks: inputs may repeat (and meet training prompts), never validation
            # or held-out ones.
            inputs = _draw_inputs(per_skill[skill.name], rng, config, avoid, unique=False, what=f"{skill.name} origin")
            for i, digits in enumerate(inputs):
                wrong, kind = skill.corrupt(digits, rng)
                rows.append(Example(f"{skill.name}/origin-{spec.name}/{i:05d}", skill.name, digits, skill.prompt(digits), skill.solve(digits), wrong, kind))
        rng.shuffle(rows)  # the recipe shuffles anyway, but the file reads better this way
        origin_data[spec.name] = write_jsonl(root / "data" / f"origin_{spec.name}.jsonl", [e.record() for e in rows])
        origin_counts[spec.name] = per_skill

    probe = records["heldout"][0]
    model_dirs: dict[str, Path] = {}
    models: dict[str, Any] = {}
    for role, spec in [("pivot", config.pivot)] + [("source", s) for s in config.sources]:
        directory, facts = build_model_dir(spec, root / "models" / "init" / spec.name, probe)
        model_dirs[spec.name] = directory
        models[spec.name] = {"role": role, **facts, "origin_rows": origin_counts[spec.name], "samples": spec.samples}

    description = {
        "skills": {s.name: {"example": {"prompt": s.prompt("48213"), "answer": s.solve("48213")}} for s in skills},
        "digits": [w.min_digits, w.max_digits],
        "prompts": {split: len(records[split]) for split in PROMPT_SPLITS},
        "models": models,
    }
    (root / "world.json").write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
    return WorldFiles(root, model_dirs, origin_data, prompts, tasks, description)


# --------------------------------------------------------------------------- models


def build_model_dir(spec: ModelSpec, directory: Path, probe: dict[str, str]) -> tuple[Path, dict[str, Any]]:
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
    messages = probe_messages(probe)
    # Through encode_pair, the response cut scoring and training use; the rejected side (any
    # other answer) is only there because a row needs one.
    pair = response.encode_pair(rows_from_records([{"prompt": probe["prompt"], "chosen": probe["reference"], "rejected": probe["input"] + "0"}])[0])
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
            "prompt": probe["prompt"],
            "chosen": probe["reference"],
            "rendered": response.render_text(messages, add_generation_prompt=False),
            "prompt_tokens": pair.chosen.response_start,
            "response_tokens": pair.chosen.num_response_tokens,
        },
    }
    return directory, facts


def probe_messages(probe: dict[str, str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": probe["prompt"]}, {"role": "assistant", "content": probe["reference"]}]


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


def load_world(root: str | Path) -> WorldFiles:
    """The :class:`WorldFiles` of a world :func:`build_world` wrote under ``root``."""
    root = Path(root)
    path = root / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {root} is not a demo world (run the demo first)")
    description = json.loads(path.read_text())
    names = list(description["models"])
    return WorldFiles(
        root,
        {name: root / "models" / "init" / name for name in names},
        {name: root / "data" / f"origin_{name}.jsonl" for name in names},
        {split: root / "data" / f"prompts_{split}.jsonl" for split in PROMPT_SPLITS},
        root / "tasks",
        description,
    )
