"""The evaluation stage's options, task checks, settings fingerprint and comparison table
(no model is loaded here; tests/test_evaluate_lm_eval.py runs lm-eval end to end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nemo_infifpo.evaluation.config import ConfigError, parse_eval_config
from nemo_infifpo.evaluation.fingerprint import evaluation_settings, settings_fingerprint
from nemo_infifpo.evaluation.summary import build_summary, render_markdown

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "fused"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"weights")
    return directory


def options(model_dir: Path, **extra):
    return {"model": {"path": str(model_dir), "name": None}, "tasks": ["arc_challenge"], "output_dir": "out", **extra}


# --------------------------------------------------------------------------- options


def test_defaults_and_single_model_name(model_dir: Path) -> None:
    config = parse_eval_config(options(model_dir))
    assert [(m.name, m.path) for m in config.models] == [("fused", str(model_dir))]
    assert (config.backend, config.dtype, config.apply_chat_template, config.confirm_run_unsafe_code) == ("hf", "auto", True, False)


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"bakend": "hf"}, "unknown config key 'bakend' (did you mean 'backend'?)"),
        ({"backend": "tgi"}, "backend must be one of hf, vllm, got 'tgi'"),
        ({"dtype": "fp8"}, "dtype must be one of auto, float32, bfloat16, float16"),
        ({"limit": 0}, "limit must be >= 1"),
        ({"limit": 1.5}, "limit as a fraction must be in (0, 1)"),
        ({"batch_size": 0}, "batch_size must be a positive integer or 'auto'"),
        ({"num_fewshot": -1}, "num_fewshot must be an integer >= 0"),
        ({"apply_chat_template": "yes"}, "apply_chat_template must be true or false"),
        ({"tasks": []}, "tasks must be a non-empty list"),
        ({"tasks": ["gsm8k", "gsm8k"]}, "tasks: 'gsm8k' is listed twice"),
        ({"include_path": "/nonexistent/tasks"}, "include_path: /nonexistent/tasks does not exist"),
        ({"primary_metrics": {"arc_challenge": "acc"}}, "primary_metrics.arc_challenge must be lm-eval's 'metric,filter'"),
        ({"output_dir": "???"}, "mandatory config key 'output_dir' is not set"),
    ],
)
def test_invalid_options_name_the_key(model_dir: Path, extra: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_eval_config(options(model_dir, **extra))
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_model_list_errors(model_dir: Path, tmp_path: Path) -> None:
    def parse(**raw):
        return parse_eval_config({"tasks": ["x"], "output_dir": "o", **raw})

    with pytest.raises(ConfigError, match=r"models\[1\].path: .* is not a Hugging Face model directory"):
        parse(models=[{"name": "a", "path": str(model_dir)}, {"name": "b", "path": str(tmp_path / "missing")}])
    with pytest.raises(ConfigError, match="the name 'a' is used twice"):
        parse(models=[{"name": "a", "path": str(model_dir)}, {"name": "a", "path": str(model_dir)}])
    with pytest.raises(ConfigError, match=r"unknown config key 'models\[0\].revision'"):
        parse(models=[{"name": "a", "path": str(model_dir), "revision": "main"}])
    with pytest.raises(ConfigError, match="models\\[0\\].name must be letters"):
        parse(models=[{"name": "a b", "path": str(model_dir)}])
    with pytest.raises(ConfigError, match="either models=\\[...\\] or model.path"):
        parse(models=[{"name": "a", "path": str(model_dir)}], model={"path": str(model_dir)})
    with pytest.raises(ConfigError, match="no model to evaluate"):
        parse(model={"path": None, "name": None})


def test_recipe_reports_a_bad_key_in_one_line_before_loading(model_dir: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "recipes/evaluate.py", f"model.path={model_dir}", "output_dir=o", "backend=tgi"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "configuration error: backend must be one of hf, vllm, got 'tgi'"


# --------------------------------------------------------------------------- tasks


@pytest.fixture(scope="module")
def task_manager():
    from nemo_infifpo.evaluation.tasks import task_manager as build

    return build(())


def test_paper_benchmarks_are_lm_eval_tasks(task_manager) -> None:
    from nemo_infifpo.evaluation.tasks import check_tasks

    for name in ("infifpo_paper", "infifpo_paper_no_code"):
        listed = yaml.safe_load((REPO / "configs/benchmarks" / f"{name}.yaml").read_text())
        check_tasks(task_manager, listed["tasks"], confirm_run_unsafe_code=True)
    paper = yaml.safe_load((REPO / "configs/benchmarks/infifpo_paper.yaml").read_text())
    assert set(paper["primary_metrics"]) == set(paper["tasks"])


def test_unknown_task_and_code_execution_opt_in(task_manager) -> None:
    from nemo_infifpo.evaluation.tasks import check_tasks

    with pytest.raises(ConfigError, match=r"tasks\[1\]: 'gsm8kk' is not an lm-eval task.*close: gsm8k"):
        check_tasks(task_manager, ["arc_challenge", "gsm8kk"], confirm_run_unsafe_code=False)
    for task in ("humaneval_instruct", "mbpp_instruct"):
        with pytest.raises(ConfigError, match="executes model-written code; set confirm_run_unsafe_code=true"):
            check_tasks(task_manager, ["ifeval", task], confirm_run_unsafe_code=False)
        check_tasks(task_manager, [task], confirm_run_unsafe_code=True)
    no_code = yaml.safe_load((REPO / "configs/benchmarks/infifpo_paper_no_code.yaml").read_text())["tasks"]
    check_tasks(task_manager, no_code, confirm_run_unsafe_code=False)


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_what_changes_results(model_dir: Path) -> None:
    config = parse_eval_config(options(model_dir))
    model = config.models[0]
    base = settings_fingerprint(evaluation_settings(config, model))
    assert settings_fingerprint(evaluation_settings(parse_eval_config(options(model_dir, batch_size=1)), model)) == base
    assert settings_fingerprint(evaluation_settings(parse_eval_config(options(model_dir, limit=5)), model)) != base
    chat_off = parse_eval_config(options(model_dir, apply_chat_template=False))
    assert settings_fingerprint(evaluation_settings(chat_off, model)) != base
    (model_dir / "model.safetensors").write_bytes(b"other weights")
    assert settings_fingerprint(evaluation_settings(config, model)) != base


# --------------------------------------------------------------------------- table


def lm_eval_results(**tasks: dict) -> dict:
    return {"results": {name: {"alias": name, **metrics} for name, metrics in tasks.items()}}


def test_summary_rows_average_and_deltas() -> None:
    results = {
        "p0": lm_eval_results(
            arc={"acc,none": 0.5, "acc_stderr,none": 0.05, "acc_norm,none": 0.6, "acc_norm_stderr,none": 0.04},
            gsm={"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": "N/A"},
        ),
        "fused": lm_eval_results(
            arc={"acc,none": 0.55, "acc_stderr,none": 0.05, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.04},
            gsm={"exact_match,strict-match": 0.4, "exact_match_stderr,strict-match": 0.1},
        ),
    }
    summary = build_summary(results, ["arc", "gsm", "missing"], {"arc": "acc_norm,none"})
    rows = {(r["task"], r["metric"]): r for r in summary["rows"]}
    assert list(rows) == [("arc", "acc,none"), ("arc", "acc_norm,none"), ("gsm", "exact_match,strict-match")]
    assert rows[("arc", "acc_norm,none")]["primary"] and not rows[("arc", "acc,none")]["primary"]
    assert rows[("gsm", "exact_match,strict-match")]["stderr"] == {"p0": None, "fused": 0.1}
    assert rows[("arc", "acc,none")]["delta"]["fused"] == pytest.approx(0.05)
    assert summary["average"]["tasks"] == ["arc", "gsm"]
    assert summary["average"]["values"] == pytest.approx({"p0": 0.4, "fused": 0.55})
    assert summary["average"]["delta"]["fused"] == pytest.approx(0.15)
    assert summary["missing_tasks"] == ["missing"]

    markdown = render_markdown(summary)
    assert "| task | metric | p0 | fused | Δ fused |" in markdown
    assert "| arc | acc_norm * | 60.00 ± 4.00 | 70.00 ± 4.00 | +10.00 |" in markdown
    assert "| gsm | exact_match (strict-match) * | 20.00 | 40.00 ± 10.00 | +20.00 |" in markdown
    assert "| **average** (2 tasks) |  | 40.00 | 55.00 | +15.00 |" in markdown
    assert "No results for: missing" in markdown


def test_average_only_over_tasks_every_model_has() -> None:
    results = {
        "p0": lm_eval_results(arc={"acc,none": 0.5}, gsm={"exact_match,none": 0.2}),
        "src": lm_eval_results(arc={"acc,none": 0.7}),
    }
    summary = build_summary(results, ["arc", "gsm"])
    assert summary["average"]["tasks"] == ["arc"]
    assert summary["average"]["values"] == pytest.approx({"p0": 0.5, "src": 0.7})
    gsm = next(r for r in summary["rows"] if r["task"] == "gsm")
    assert gsm["values"] == {"p0": 0.2, "src": None} and gsm["delta"] == {"src": None}


def test_a_second_evaluation_into_the_same_output_dir_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from nemo_infifpo.evaluation.run import run_evaluation
    from nemo_infifpo.locking import OutputLock, OutputLockedError

    output = tmp_path / "eval"
    config = parse_eval_config({**options(model_dir), "output_dir": str(output)})
    with OutputLock(output / ".lock", stage="evaluation"):
        with pytest.raises(OutputLockedError, match="is in use by the evaluation run"):
            run_evaluation(config)
    assert sorted(p.name for p in output.iterdir()) == []  # nothing evaluated or written
