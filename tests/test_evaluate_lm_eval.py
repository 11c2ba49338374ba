"""recipes/evaluate.py end to end on CPU: two tiny exported checkpoints, two local lm-eval tasks
(generate_until with exact match, multiple choice by log-likelihood), every number checked
against an independent transformers computation; then a rerun that skips both models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import local_eval_tasks as local

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from nemo_infifpo.testing.models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("evaluate")
    paths = {"p0": save_tiny_hf_model("phi3", root / "p0", seed=0), "fused": save_tiny_hf_model("phi3", root / "fused", seed=1)}
    references = {name: local.Reference(path) for name, path in paths.items()}
    # Targets: p0's own greedy answers for the first six prompts, the fused model's for the last
    # two, so the two models score differently and neither trivially.
    echo_rows = [
        {"prompt": p, "answer": references["p0" if i < 6 else "fused"].greedy(p)} for i, p in enumerate(local.PROMPTS)
    ]
    choice_rows = local.choice_rows()
    tasks = local.write_tasks(root / "tasks", echo_rows, choice_rows)
    expected = {name: local.expected_metrics(ref, echo_rows, choice_rows) for name, ref in references.items()}
    return {"root": root, "paths": paths, "tasks": tasks, "references": references, "expected": expected}


def run_recipe(*overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(REPO / "recipes/evaluate.py"), *overrides],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )


def test_lm_eval_matches_an_independent_computation_and_reruns_skip(world: dict) -> None:
    out = world["root"] / "out"
    models = "[" + ", ".join(f"{{name: {n}, path: '{p}'}}" for n, p in world["paths"].items()) + "]"
    overrides = (
        f"models={models}",
        f"tasks=[{local.GENERATE_TASK},{local.CHOICE_TASK}]",
        f"include_path={world['tasks']}",
        f"output_dir={out}",
        "batch_size=4",
        "log_samples=true",
    )
    first = run_recipe(*overrides)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "evaluated: p0, fused" in first.stdout

    expected = world["expected"]
    assert expected["p0"]["exact_match"] == 0.75 and expected["fused"]["exact_match"] == 0.25
    for name in ("p0", "fused"):
        results = json.loads((out / name / "results.json").read_text())
        echo, choice = results["results"][local.GENERATE_TASK], results["results"][local.CHOICE_TASK]
        assert echo["exact_match,none"] == pytest.approx(expected[name]["exact_match"])
        assert choice["acc,none"] == pytest.approx(expected[name]["acc"])
        assert choice["acc_norm,none"] == pytest.approx(expected[name]["acc_norm"])
        assert results["nemo_infifpo"]["settings"]["apply_chat_template"] is True

        # Per sample: lm-eval's answer log-likelihoods and generations equal the reference's.
        reference = world["references"][name]
        for line in (out / name / f"samples_{local.CHOICE_TASK}.jsonl").read_text().splitlines():
            record = json.loads(line)
            theirs = [resp[0][0] for resp in record["resps"]]
            assert theirs == pytest.approx(reference.choice_scores(record["doc"]), abs=1e-4)
        for line in (out / name / f"samples_{local.GENERATE_TASK}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert record["filtered_resps"][0] == reference.greedy(record["doc"]["prompt"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"] == ["p0", "fused"]
    average = summary["average"]["values"]
    for name in ("p0", "fused"):  # average of each task's first metric: exact_match and acc
        assert average[name] == pytest.approx((expected[name]["exact_match"] + expected[name]["acc"]) / 2)
    assert summary["average"]["delta"]["fused"] == pytest.approx(average["fused"] - average["p0"])
    markdown = (out / "summary.md").read_text()
    assert "| tiny_echo | exact_match * | 75.00 ± " in markdown and "| -50.00 |" in markdown

    # Same settings: nothing is evaluated again, the table is rewritten from the stored results.
    stamp = (out / "p0" / "results.json").stat().st_mtime_ns
    second = run_recipe(*overrides[:-1], "batch_size=2")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "skipped (results exist): p0, fused" in second.stdout
    assert (out / "p0" / "results.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "summary.json").read_text())["average"] == summary["average"]

    # Another setting (a sample limit): evaluated again.
    third = run_recipe(*overrides[:-1], "limit=4", "models=[{name: p0, path: '" + str(world["paths"]["p0"]) + "'}]")
    assert third.returncode == 0, third.stderr[-4000:]
    assert "evaluated: p0;" in third.stdout
    assert json.loads((out / "p0" / "results.json").read_text())["config"]["limit"] == 4
