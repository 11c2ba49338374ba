"""Scoring jobs on inputs that break naive pipelines, end to end on tiny models (hf back end):

- a file in which 1% of the rows break one model's template: every job finishes, the merge
  leaves those rows out for every model and reports them by model and reason;
- a template that puts today's date into its system prompt, scored on two different (faked)
  days: byte-identical shard files;
- an R1-style and a Qwen3-style reasoning template (``enable_thinking`` both ways) are
  scorable, and the scores equal an independent computation of the documented boundary.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from workers.scoring_common import build_models

from nemo_infifpo.data.scored_set import read_scored_set
from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
from nemo_infifpo.scoring.merge import load_score_dir, merge_scores
from nemo_infifpo.testing.chat_templates import DATED, QWEN3_STYLE, R1_STYLE, SYSTEM_IF_LAST_USER

TOLERANCE = 1e-4
WORDS = ["sea", "night", "stars", "Paris", "legs", "sky", "blue", "code", "poem", "waves"]


def _rows(count: int, with_system: set[int]) -> list[dict]:
    rows = []
    for i in range(count):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 7 + 3) % len(WORDS)]
        prompt: object = f"Say {a} {i}?"
        if i in with_system:
            prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {a} {i}?"}]
        rows.append({"id": f"r{i:03d}", "prompt": prompt, "chosen": f"{a.title()} {i}.", "rejected": f"No {b}."})
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("real_inputs")
    return SimpleNamespace(root=root, dirs=build_models(root / "models"))


def _score(world: SimpleNamespace, name: str, data: Path, output: Path, **options) -> Path:
    config = ScoreConfig(
        model_path=str(world.dirs[name]),
        data_path=str(data),
        output_dir=str(output),
        backend="hf",
        dtype="float32",
        max_length=None,
        progress=False,
        **options,
    )
    run_scoring(config)
    return output


def test_one_percent_of_rows_break_one_template_and_the_merge_drops_them_everywhere(world) -> None:
    data = world.root / "hundred.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(100, with_system={42})))
    out = world.root / "one_percent"
    pivot = _score(world, "pivot", data, out / "pivot")
    # This source's template drops the system message from full conversations: row r042
    # cannot be encoded for it, and only for it.
    qwen = _score(world, "qwen", data, out / "qwen", chat_template=SYSTEM_IF_LAST_USER)
    llama = _score(world, "llama", data, out / "llama")

    loaded = load_score_dir(qwen, "qwen")
    assert list(loaded.excluded) == ["r042"] and len(loaded.scores) == 99
    entry = loaded.excluded["r042"]
    assert (entry.stage, entry.reason) == ("score", "not_prefix_stable")
    assert "dropped the system message" in entry.detail
    assert load_score_dir(pivot, "pivot").excluded == {}

    report = merge_scores(data, pivot, [qwen, llama], out / "train.parquet", source_names=["qwen", "llama"])
    scored = read_scored_set(out / "train.parquet")
    assert len(scored) == 99 and "r042" not in scored.ids
    assert (report["rows_in"], report["rows_out"], report["rows_excluded"], report["rows_invalid"]) == (100, 99, 1, 1)
    assert report["excluded_by_model"] == {"pivot": {}, "qwen": {"not_prefix_stable": 1}, "llama": {}}
    assert report["excluded"][0]["id"] == "r042"
    assert report["excluded"][0]["excluded_by"] == {"qwen": "not_prefix_stable"}

    # Two broken rows in 100 are more than 1%: the job stops before loading the model.
    data2 = world.root / "two_percent.jsonl"
    data2.write_text("".join(json.dumps(r) + "\n" for r in _rows(100, with_system={3, 42})))
    with pytest.raises(Exception, match=r"2 of 100 rows are invalid \(stage score, model qwen; 2.00%\).*By reason: not_prefix_stable 2\. First: 'r003': the template dropped the system message"):
        _score(world, "qwen", data2, out / "qwen2", chat_template=SYSTEM_IF_LAST_USER)
    assert not list((out / "qwen2").glob("shard-*"))


class _FakeClock:
    """What ``datetime`` looks like to transformers' ``strftime_now`` on a given day."""

    def __init__(self, moment: dt.datetime) -> None:
        self.moment = moment

    def now(self, tz=None) -> dt.datetime:
        return self.moment


def test_dated_template_scored_on_two_days_gives_byte_identical_scores(world, monkeypatch) -> None:
    from transformers.utils import chat_template_utils

    data = world.root / "dated.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(12, with_system={5})))
    days = [dt.datetime(2026, 3, 1, 23, 59), dt.datetime(2026, 3, 2, 0, 1)]
    outputs = []
    for index, day in enumerate(days):
        monkeypatch.setattr(chat_template_utils, "datetime", _FakeClock(day))
        # Without the pin, the template really renders differently on the two days.
        from transformers import AutoTokenizer

        raw = AutoTokenizer.from_pretrained(str(world.dirs["qwen"]), local_files_only=True)
        text = raw.apply_chat_template([{"role": "user", "content": "x"}], chat_template=DATED, tokenize=False)
        assert day.strftime("%Y-%m-%d") in text
        outputs.append(_score(world, "qwen", data, world.root / f"dated_day{index}", chat_template=DATED))

    shard = "shard-00000-of-00001.parquet"
    assert (outputs[0] / shard).read_bytes() == (outputs[1] / shard).read_bytes()
    manifests = [json.loads((o / "manifest.json").read_text()) for o in outputs]
    assert manifests[0]["identity"] == manifests[1]["identity"]
    template = manifests[0]["info"]["template"]
    assert template["clock_dependent"] is True and template["template_date"] == "2025-01-01"

    # Another pinned date is another input: a rerun into the same directory is refused.
    from nemo_infifpo.scoring.manifest import ScoringMismatchError

    with pytest.raises(ScoringMismatchError, match="tokenizer_fingerprint"):
        _score(world, "qwen", data, outputs[0], chat_template=DATED, template_date="2025-06-30")


def _reference(model_dir: Path, prompt_ids: list[int], response_ids: list[int]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True).eval()
    ids = prompt_ids + response_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(prompt_ids), len(ids)))


REASONING_ROWS = [
    {"id": "plain", "prompt": "Why is the sky blue?", "chosen": "Sunlight scatters.", "rejected": "Paint."},
    {
        "id": "reasoned",
        "prompt": "12 * 7 = ?",
        "chosen": "<think>\nTen sevens and two sevens.\n</think>\n\n84",
        "rejected": "74",
    },
]


@pytest.mark.parametrize(
    ("label", "template", "kwargs", "boundary", "expected"),
    [
        # (id, side) -> the response text after the generation prompt, as the model generates it
        ("r1", R1_STYLE, {}, "generation", {"reasoned": "Ten sevens and two sevens.\n</think>\n\n84<|im_end|>"}),
        ("qwen3_thinking", QWEN3_STYLE, {}, "generation", {"reasoned": "<think>\nTen sevens and two sevens.\n</think>\n\n84<|im_end|>"}),
        ("qwen3_no_thinking", QWEN3_STYLE, {"enable_thinking": False}, "conversation", {"plain": "Sunlight scatters.<|im_end|>\n"}),
    ],
)
def test_reasoning_templates_are_scorable(world, label, template, kwargs, boundary, expected) -> None:
    from transformers import AutoTokenizer

    data = world.root / "reasoning.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in REASONING_ROWS))
    rows = REASONING_ROWS if label != "qwen3_no_thinking" else REASONING_ROWS[:1]
    if label == "qwen3_no_thinking":
        data = world.root / "reasoning_plain.jsonl"
        data.write_text(json.dumps(REASONING_ROWS[0]) + "\n")
    out = _score(
        world, "qwen", data, world.root / f"reasoning_{label}",
        chat_template=template, chat_template_kwargs=kwargs, boundary=boundary,
    )
    loaded = load_score_dir(out, label)
    assert set(loaded.positions) == {row["id"] for row in rows}

    tokenizer = AutoTokenizer.from_pretrained(str(world.dirs["qwen"]), local_files_only=True)
    for row in rows:
        prompt = [{"role": "user", "content": row["prompt"]}]
        prompt_text = tokenizer.apply_chat_template(
            prompt, chat_template=template, add_generation_prompt=True, tokenize=False, **kwargs
        )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        # The documented boundary, computed independently: what follows the generation prompt.
        response_text = expected.get(row["id"])
        if response_text is None:
            if boundary == "generation":
                response_text = row["chosen"] + "<|im_end|>"
            else:
                full = tokenizer.apply_chat_template(
                    prompt + [{"role": "assistant", "content": row["chosen"]}],
                    chat_template=template, tokenize=False, **kwargs,
                )
                response_text = full[len(prompt_text):]
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
        chosen_sum, _, chosen_tokens, _ = loaded.pair(row["id"])
        assert chosen_tokens == len(response_ids), (label, row["id"])
        assert abs(chosen_sum - _reference(world.dirs["qwen"], prompt_ids, response_ids)) <= TOLERANCE
