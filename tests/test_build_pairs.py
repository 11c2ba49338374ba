"""build_pairs: the selection rules, the split, and the streaming job on synthetic outputs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.data.rows import read_preference_rows
from nemo_infifpo.generation.build import BuildPairsConfig, build_pairs
from nemo_infifpo.generation.pairs import Candidate, PairRules, select_pair, split_part, split_value
from nemo_infifpo.testing.candidates import write_synthetic_run

REPO = Path(__file__).resolve().parents[1]


def c(model: str, index: int, score: float | None, text: str | None = None, finish: str = "stop") -> Candidate:
    return Candidate(model, index, f"{model}-{index}" if text is None else text, finish, score)


# ----------------------------------------------------------------------------- rules


def test_chosen_is_the_argmax_and_rejected_the_argmin() -> None:
    candidates = [c("a", 0, 0.3), c("a", 1, -1.5), c("b", 0, 2.25), c("b", 1, 0.0), c("c", 0, 1.0)]
    selection = select_pair(candidates, PairRules())
    assert (selection.chosen, selection.rejected) == (candidates[2], candidates[1])
    assert selection.prompt_reason is None and len(selection.usable) == 5


def test_ties_go_to_the_first_best_and_the_last_worst() -> None:
    candidates = [c("a", 0, 1.0), c("b", 0, 3.0), c("b", 1, -2.0), c("c", 0, 3.0), c("c", 1, -2.0)]
    selection = select_pair(candidates, PairRules())
    assert selection.chosen == candidates[1] and selection.rejected == candidates[4]


def test_all_equal_scores_give_no_pair() -> None:
    selection = select_pair([c("a", 0, 0.5), c("b", 0, 0.5)], PairRules())
    assert selection.chosen is None and selection.prompt_reason == "score_gap_too_small"


def test_min_gap() -> None:
    candidates = [c("a", 0, 1.0), c("b", 0, 0.6)]
    assert select_pair(candidates, PairRules(min_gap=0.4)).prompt_reason == "score_gap_too_small"
    assert select_pair(candidates, PairRules(min_gap=0.39)).chosen == candidates[0]


def test_truncated_answers_are_excluded_unless_allowed() -> None:
    candidates = [c("a", 0, 5.0, finish="length"), c("a", 1, 1.0), c("b", 0, 0.0)]
    default = select_pair(candidates, PairRules())
    assert default.chosen == candidates[1] and (candidates[0], "truncated") in default.excluded
    allowed = select_pair(candidates, PairRules(allow_truncated=True))
    assert allowed.chosen == candidates[0] and allowed.rejected == candidates[2]


def test_empty_duplicate_and_unjudged_answers() -> None:
    candidates = [c("a", 0, 9.0, text="  \n"), c("a", 1, 1.0, text="same"), c("b", 0, 7.0, text=" same "),
                  c("b", 1, None), c("c", 0, -1.0)]
    selection = select_pair(candidates, PairRules())
    reasons = {(x.model, x.sample_index): reason for x, reason in selection.excluded}
    assert reasons == {("a", 0): "empty", ("b", 0): "duplicate", ("b", 1): "unjudged"}
    # The duplicate's higher score does not count: the first occurrence stays with its own.
    assert selection.chosen == candidates[1] and selection.rejected == candidates[4]


def test_prompts_with_fewer_than_two_usable_answers() -> None:
    assert select_pair([c("a", 0, 1.0), c("b", 0, None)], PairRules()).prompt_reason == "fewer_than_two_usable"
    assert select_pair([], PairRules()).prompt_reason == "no_candidates"


def test_rules_validate() -> None:
    with pytest.raises(ConfigError, match="pairs.min_gap"):
        PairRules(min_gap=-1)
    with pytest.raises(ConfigError, match="split.sft_fraction"):
        PairRules(sft_fraction=1.5)


# ----------------------------------------------------------------------------- split


def test_split_is_stable_and_near_the_fraction() -> None:
    ids = [f"id-{i}" for i in range(4000)]
    rules = PairRules(sft_fraction=0.5)
    parts = {i: split_part(i, rules) for i in ids}
    # Independent of order and of the other prompts.
    assert {i: split_part(i, rules) for i in reversed(ids[:100])} == {i: parts[i] for i in ids[:100]}
    share = sum(p == "sft" for p in parts.values()) / len(ids)
    assert abs(share - 0.5) < 4 * math.sqrt(0.25 / len(ids))
    # A larger fraction only moves prompts into SFT; the extremes take everything or nothing.
    wider = PairRules(sft_fraction=0.7)
    assert all(split_part(i, wider) == "sft" for i in ids if parts[i] == "sft")
    assert {split_part(i, PairRules(sft_fraction=0.0)) for i in ids} == {"preference"}
    assert {split_part(i, PairRules(sft_fraction=1.0)) for i in ids} == {"sft"}
    assert split_value("x", "infifpo") != split_value("x", "other-salt")


# ----------------------------------------------------------------------------- the job


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return write_synthetic_run(tmp_path_factory.mktemp("pairs"), num_prompts=300, samples={"pivot": 4, "src": 2},
                               answer_chars=(5, 40), generation_shards=3, judge_shards=2, truncated=0.1, empty=0.05,
                               duplicate=0.05, unjudged=0.05, seed=3)


def config_for(run: dict, out: Path, **rules: object) -> BuildPairsConfig:
    return BuildPairsConfig(data_path=str(run["prompts"]), generation_dirs=[str(d) for d in run["generation_dirs"]],
                            judge_dir=str(run["judge_dir"]), output_dir=str(out), rules=PairRules(**rules))  # type: ignore[arg-type]


def expected_pairs(run: dict, rules: PairRules) -> dict[str, tuple]:
    """The pairs recomputed from the files with plain pyarrow reads and the rules."""
    import pyarrow.parquet as pq

    scores = {}
    for path in sorted(Path(run["judge_dir"]).glob("shard-*.parquet")):
        for r in pq.read_table(path).to_pylist():
            scores[(r["prompt_id"], r["model"], r["sample_index"])] = r["score"]
    by_prompt: dict[str, list[Candidate]] = {}
    for directory in run["generation_dirs"]:
        for path in sorted(Path(directory).glob("shard-*.parquet")):
            for r in pq.read_table(path).to_pylist():
                by_prompt.setdefault(r["prompt_id"], []).append(
                    Candidate(r["model"], r["sample_index"], r["text"], r["finish_reason"],
                              scores.get((r["prompt_id"], r["model"], r["sample_index"]))))
    out = {}
    for prompt_id, candidates in by_prompt.items():
        s = select_pair(candidates, rules)
        if s.chosen is not None:
            out[prompt_id] = (s.chosen.model, s.chosen.sample_index, s.chosen.score,
                              s.rejected.model, s.rejected.sample_index, s.rejected.score, split_part(prompt_id, rules))
    return out


def test_build_pairs_writes_what_the_rules_select(synthetic: dict, tmp_path: Path) -> None:
    report = build_pairs(config_for(synthetic, tmp_path / "out"))
    rows = {}
    for part, name in (("sft", "sft.jsonl"), ("preference", "pairs.jsonl")):
        for line in (tmp_path / "out" / name).read_text().splitlines():
            r = json.loads(line)
            assert r["source"] == "synthetic"  # the prompt's extra columns are kept
            rows[r["id"]] = (r["chosen_model"], r["chosen_index"], r["chosen_score"], r["rejected_model"],
                             r["rejected_index"], r["rejected_score"], part)
            assert r["chosen_score"] > r["rejected_score"]
    assert rows == expected_pairs(synthetic, PairRules())
    assert report["prompts"]["sft"] + report["prompts"]["preference"] == len(rows)
    assert report["prompts"]["sft"] + report["prompts"]["preference"] + sum(report["prompts"]["excluded"].values()) == 300
    excluded = report["candidates"]["excluded"]
    assert report["candidates"]["total"] == 300 * 6 == report["candidates"]["usable"] + sum(excluded.values())
    assert all(excluded[k] > 0 for k in ("truncated", "empty", "duplicate", "unjudged")), excluded
    assert sum(m["chosen"] for m in report["models"].values()) == len(rows)
    assert report["models"]["pivot"]["score"]["count"] > 0
    # Every later stage reads these files as preference rows.
    for name in ("sft.jsonl", "pairs.jsonl"):
        read = read_preference_rows(tmp_path / "out" / name)
        assert not read.excluded and {r.id for r in read.rows} <= set(rows)


def test_build_pairs_options_change_the_output_and_reruns_skip(synthetic: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = build_pairs(config_for(synthetic, out))
    mtime = (out / "pairs.jsonl").stat().st_mtime_ns
    assert build_pairs(config_for(synthetic, out)) == first
    assert (out / "pairs.jsonl").stat().st_mtime_ns == mtime  # same inputs: nothing rewritten
    wider = build_pairs(config_for(synthetic, out, allow_truncated=True, min_gap=0.5, sft_fraction=0.25))
    assert wider["candidates"]["excluded"]["truncated"] == 0
    rows = {json.loads(line)["id"] for line in (out / "sft.jsonl").read_text().splitlines()}
    rows |= {json.loads(line)["id"] for line in (out / "pairs.jsonl").read_text().splitlines()}
    rules = PairRules(allow_truncated=True, min_gap=0.5, sft_fraction=0.25)
    assert rows == set(expected_pairs(synthetic, rules))


def test_build_pairs_refuses_mismatched_inputs(synthetic: dict, tmp_path: Path) -> None:
    reordered = config_for(synthetic, tmp_path / "o1")
    reordered.generation_dirs = list(reversed(reordered.generation_dirs))
    with pytest.raises(InputError, match="other generation outputs"):
        build_pairs(reordered)
    other_prompts = tmp_path / "prompts.jsonl"
    other_prompts.write_text(Path(synthetic["prompts"]).read_text().replace("synthetic", "edited"))
    changed = config_for(synthetic, tmp_path / "o2")
    changed.data_path = str(other_prompts)
    with pytest.raises(InputError, match="other prompts"):
        build_pairs(changed)
    missing = config_for(synthetic, tmp_path / "o3")
    missing.judge_dir = str(tmp_path / "nowhere")
    with pytest.raises(InputError, match="judge_dir.*run the judge stage first"):
        build_pairs(missing)


def test_build_pairs_recipe_reports_bad_options(synthetic: dict, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "build_pairs.py"), f"data.path={synthetic['prompts']}",
         f"generation_dirs=[{synthetic['generation_dirs'][0]}]", f"judge_dir={synthetic['judge_dir']}",
         f"output_dir={tmp_path / 'out'}", "split.sft_fraction=2"],
        capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: build_pairs: split.sft_fraction must be in [0, 1], got 2.0"
