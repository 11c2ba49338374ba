"""The offline demo (``make demo``): its world, checker and tasks, its stage runner, one reduced
end-to-end run, the seed table and the settings sweep.

The end-to-end test runs ``recipes/demo.py --config-name demo_ci`` exactly as a user would
(every stage a subprocess of the real entry points) and checks what it leaves behind: every
stage ran, report.md / summary.json / plots exist with finite numbers, and the exported
checkpoints load with transformers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides):
    from omegaconf import OmegaConf

    from nemo_infifpo.demo.config import load_demo_config

    raw = OmegaConf.load(REPO / "configs" / "demo.yaml")
    raw = OmegaConf.to_container(raw)
    raw.pop("defaults", None)  # Hydra's, not a demo key
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    return load_demo_config(raw)


# --------------------------------------------------------------------------- fast


def test_config_rejects_unknown_keys_and_values():
    from nemo_infifpo.demo.config import load_demo_config

    with pytest.raises(Exception, match="prompts_trian"):
        load_demo_config({"world": {"prompts_trian_per_skill": 3}})
    with pytest.raises(ValueError, match="unknown skill"):
        _config(**{"world.skills": ["reverse", "juggle"]})
    with pytest.raises(ValueError, match="origin.mix"):
        _config(**{"pivot.origin.mix": {"juggle": 1.0}})
    with pytest.raises(ValueError, match="reserved"):
        _config(**{"sources.0.name": "p0"})
    with pytest.raises(ValueError, match="evaluation.split"):
        _config(**{"evaluation.split": "test"})


def test_skills_wrong_answers_and_the_checker():
    import random

    from nemo_infifpo.demo.world import SKILLS, check_answer

    assert SKILLS["reverse"].solve("48213") == "31284"
    assert SKILLS["sort"].solve("4821") == "1248"
    rng = random.Random(0)
    for skill in SKILLS.values():
        for digits in ("1111", "1212", "90210", "5", "0099"):
            for _ in range(20):
                wrong, kind = skill.corrupt(digits, rng)
                # Never the right answer; always its length (see Skill.corruption_kinds).
                assert wrong != skill.solve(digits) and len(wrong) == len(digits), (skill.name, digits, wrong, kind)
    row = {"reference": "1248"}
    assert check_answer(row, "1248") == 1.0 and check_answer(row, " 1248\n") == 1.0
    # Graded below 1: a near miss above a wrong length above nonsense; leading zeros count.
    assert 1.0 > check_answer(row, "1247") > check_answer(row, "12") > check_answer(row, "x") == 0.0
    assert check_answer({"reference": "0012"}, "12") == 0.0 and check_answer({"reference": "0012"}, "0012") == 1.0
    with pytest.raises(KeyError):
        check_answer({"id": "no reference"}, "12")


def test_noisy_checker_flips_a_fixed_share_of_verdicts():
    from nemo_infifpo.demo.world import check_answer

    answers = [f"{i:04d}" for i in range(4000)]
    rows = [{"id": f"sort/train/{i:05d}", "reference": "0123", "judge_noise": 0.25} for i in range(4000)]
    clean = [check_answer({k: v for k, v in row.items() if k != "judge_noise"}, a) for row, a in zip(rows, answers)]
    noisy = [check_answer(row, a) for row, a in zip(rows, answers)]
    flipped = [n == 1.0 - c and n != c for n, c in zip(noisy, clean)]
    assert 0.22 < sum(flipped) / len(flipped) < 0.28
    assert all(n == c for n, c, f in zip(noisy, clean, flipped) if not f)
    # Deterministic: the same prompt and answer are judged the same way every time.
    assert noisy == [check_answer(row, a) for row, a in zip(rows, answers)]
    # The correct answer is judged wrong when flipped: the judge can reject it.
    assert check_answer({"id": "sort/train/00007", "reference": "0123", "judge_noise": 0.4999}, "0123") in (0.0, 1.0)


def _small_world_config(**extra):
    return _config(**{"world.prompts_train_per_skill": 20, "world.prompts_validation_per_skill": 6,
                      "world.prompts_heldout_per_skill": 10, "pivot.origin.steps": 2,
                      "sources.0.origin.steps": 2, "sources.1.origin.steps": 2, **extra})


def test_world_is_deterministic_and_validation_and_held_out_are_unseen(tmp_path):
    from nemo_infifpo.demo.world import build_world, load_world, read_jsonl

    config = _small_world_config()
    a = build_world(config, tmp_path / "a")
    b = build_world(config, tmp_path / "b")
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.jsonl"))
    assert files and files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.jsonl"))
    for name in files:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a.model_dirs["pivot"] / name).read_bytes() == (b.model_dirs["pivot"] / name).read_bytes()

    prompts = {split: read_jsonl(path) for split, path in a.prompts.items()}
    assert {split: len(rows) for split, rows in prompts.items()} == {"train": 40, "validation": 12, "heldout": 20}
    for split, rows in prompts.items():
        assert {r["skill"] for r in rows} == {"reverse", "sort"}
        assert all(r["id"].startswith(f"{r['skill']}/{split}/") for r in rows)
    inputs = {split: {r["input"] for r in rows} for split, rows in prompts.items()}
    origin = {r["input"] for path in a.origin_data.values() for r in read_jsonl(path)}
    # Validation and held-out inputs never reach any training data, nor each other.
    for unseen in ("validation", "heldout"):
        assert not inputs[unseen] & (inputs["train"] | origin), unseen
    assert not inputs["validation"] & inputs["heldout"]
    # The lm-eval tasks hold exactly the prompts of their split and skill.
    for split in ("heldout", "validation"):
        for skill in ("reverse", "sort"):
            name = "demo_" + skill + ("" if split == "heldout" else "_validation")
            assert read_jsonl(a.tasks / f"{name}.jsonl") == [r for r in prompts[split] if r["skill"] == skill]
            assert f"task: {name}" in (a.tasks / f"{name}.yaml").read_text()
    # Different tokenizers and chat templates per model, as in a real fusion set-up.
    models = a.description["models"]
    assert len({m["tokenizer"] for m in models.values()}) == 3
    assert len({m["probe"]["rendered"] for m in models.values()}) == 3
    assert all("judge_noise" not in r for rows in prompts.values() for r in rows)
    noisy = build_world(_small_world_config(**{"world.judge_noise": 0.2}), tmp_path / "noisy")
    assert all(r["judge_noise"] == 0.2 for r in read_jsonl(noisy.prompts["train"]))
    assert all("judge_noise" not in r for r in read_jsonl(noisy.prompts["heldout"]) + read_jsonl(noisy.prompts["validation"]))
    loaded = load_world(a.root)
    assert (loaded.prompts, loaded.origin_data, loaded.model_dirs) == (a.prompts, a.origin_data, a.model_dirs)


def test_world_tasks_load_in_lm_eval_and_agree_with_the_checker(tmp_path):
    """The generated task YAML is found by lm-eval's task registry, and its exact-match metric
    agrees with the world's checker on the same answers (whitespace around the answer ignored)."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate

    from nemo_infifpo.demo.world import build_world, check_answer, read_jsonl
    from nemo_infifpo.evaluation.tasks import task_manager

    world = build_world(_small_world_config(), tmp_path)
    manager = task_manager([str(world.tasks)])
    for split in ("heldout", "validation"):
        for name in world.task_names(split):
            assert name in manager.all_tasks, name
    spec = yaml.safe_load((world.tasks / "demo_sort.yaml").read_text())
    ignore = spec["metric_list"][0]["regexes_to_ignore"]
    for row in read_jsonl(world.tasks / "demo_sort.jsonl"):
        for answer in (row["reference"], f" {row['reference']}\n", row["reference"][::-1] + "1"):
            got = exact_match_hf_evaluate([answer], [row["reference"]], regexes_to_ignore=ignore)["exact_match"]
            assert got == float(check_answer(row, answer) == 1.0), (answer, row)


def test_report_checks_name_the_skills_a_source_masters():
    from nemo_infifpo.demo.report import checks

    config = _config()

    def em(value, se=0.02):
        return {"exact_match": value, "stderr": se}

    table = {
        "pivot": {"reverse": em(0.2), "sort": em(0.5)},
        "p0": {"reverse": em(0.5), "sort": em(0.55)},
        "dpo": {"reverse": em(0.5), "sort": em(0.55)},
        "infifpo": {"reverse": em(0.52), "sort": em(0.45)},
        "reverser": {"reverse": em(1.0, 0.0), "sort": em(0.5)},
        "sorter": {"reverse": em(0.1), "sort": em(0.52)},
    }
    result = checks(table, config)
    assert result["mastered_by"] == {"reverse": ["reverser"], "sort": []}
    assert result["skills"]["reverse"]["better_than_pivot"] is True and result["skills"]["sort"]["better_than_pivot"] is None
    assert result["infifpo_better_than_pivot_where_mastered"] is True
    # sort: 0.45 vs p0 0.55 with s.e. 0.028 -> z = -3.5: worse than p0.
    assert result["skills"]["sort"]["not_worse_than_p0"] is False and result["infifpo_not_worse_than_p0"] is False


def test_stage_runner_orders_and_stops_on_failure(tmp_path):
    from nemo_infifpo.demo.pipeline import Stage, StageFailed, run_stages

    out = tmp_path / "order.txt"

    def append(tag: str) -> list[str]:
        return [sys.executable, "-c", f"open({str(out)!r}, 'a').write({tag!r} + '\\n')"]

    stages = [
        Stage("b", lambda: append("b"), deps=("a",)),
        Stage("a", lambda: append("a"), slots=2),
        Stage("c", lambda: append("c"), deps=("b",)),
    ]
    results = run_stages(stages, slots=2, log_dir=tmp_path / "logs", timeout_s=60)
    assert [r.name for r in results] == ["a", "b", "c"]
    assert out.read_text().split() == ["a", "b", "c"]
    assert all(r.status == "ok" and (tmp_path / "logs" / f"{r.name}.log").is_file() for r in results)

    failing = [
        Stage("bad", lambda: [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]),
        Stage("never", lambda: append("never"), deps=("bad",)),
    ]
    with pytest.raises(StageFailed, match="boom"):
        run_stages(failing, slots=1, log_dir=tmp_path / "logs2", timeout_s=60)
    assert "never" not in out.read_text()


def test_output_dir_is_only_replaced_when_the_demo_wrote_it(tmp_path):
    from nemo_infifpo.demo.pipeline import MARKER, prepare_output_dir

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        prepare_output_dir(foreign, overwrite=True)
    assert (foreign / "precious.txt").is_file()

    ours = tmp_path / "ours"
    prepare_output_dir(ours, overwrite=True)
    (ours / "old.txt").write_text("from an earlier run")
    with pytest.raises(FileExistsError):
        prepare_output_dir(ours, overwrite=False)
    prepare_output_dir(ours, overwrite=True)
    assert (ours / MARKER).is_file() and not (ours / "old.txt").exists()


# --------------------------------------------------------------------------- end to end

MODELS = ("pivot", "reverser", "sorter")
EXPECTED_STAGES = (
    ["world"]
    + [f"origin/{m}" for m in MODELS]
    + [f"export/{m}" for m in MODELS]
    + [f"generate/{m}" for m in MODELS]
    + ["judge", "pairs", "sft", "export/p0"]
    + [f"score/{m}" for m in ("p0", "reverser", "sorter")]
    + ["merge", "eval/before", "train/infifpo", "train/dpo", "export/infifpo", "export/dpo", "eval/after"]
)
EVALUATED = ("pivot", "p0", "dpo", "infifpo", "reverser", "sorter")


@pytest.fixture(scope="module")
def demo_ci(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo-output-ci"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo.py"), "--config-name", "demo_ci", f"output_dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    return out


def _finite_numbers(value, path="summary"):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _finite_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _finite_numbers(item, f"{path}[{i}]")
    elif isinstance(value, float):
        yield path, value


@pytest.mark.slow
def test_demo_ci_runs_every_stage_through_the_entry_points(demo_ci):
    summary = json.loads((demo_ci / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert sorted(stages) == sorted(EXPECTED_STAGES)
    assert all(s["status"] == "ok" for s in stages.values())
    for name, stage in stages.items():
        if name != "world":
            assert (demo_ci / stage["log"]).is_file(), name
    # The real entry points, as a cluster runs them.
    script = {name: (s["command"] or "") for name, s in stages.items()}
    for name, entry in (("generate/pivot", "generate.py"), ("judge", "judge.py"), ("pairs", "build_pairs.py"),
                        ("score/p0", "score.py"), ("merge", "merge_scores.py"), ("export/p0", "export_hf.py"),
                        ("eval/after", "evaluate.py"), ("sft", "train_infifpo.py")):
        assert f"recipes/{entry}" in script[name], name
    assert "torch.distributed.run --nproc_per_node=2" in script["train/infifpo"]
    assert "loss.type=infifpo" in script["train/infifpo"] and "loss.type=dpo" in script["train/dpo"]
    assert "loss.type=sft" in script["sft"] and "loss.type=sft" in script["origin/reverser"]
    # The paper's sampling: pivot and sources with their own sample counts, at temperature 0.8.
    assert "sampling.n=3" in script["generate/pivot"] and "sampling.n=2" in script["generate/sorter"]
    assert "sampling.temperature=0.8" in script["generate/pivot"]
    assert "judge.type=function" in script["judge"] and "nemo_infifpo.demo.world:check_answer" in script["judge"]
    # SFT trains the pivot before fusion on the SFT half; InfiFPO/DPO start from its export, p0.
    assert f"model.path={demo_ci / 'models' / 'hf' / 'pivot'}" in script["sft"]
    assert f"data.path={demo_ci / 'pairs' / 'sft.jsonl'}" in script["sft"]
    assert f"model.path={demo_ci / 'models' / 'hf' / 'p0'}" in script["train/dpo"]
    assert f"data.path={demo_ci / 'pairs' / 'pairs.jsonl'}" in script["score/reverser"]
    # Every generated answer was judged, and the pairs come from them.
    pairs = json.loads((demo_ci / "pairs" / "report.json").read_text())
    assert pairs["models"]["pivot"]["answers"] == 3 * 64 and pairs["models"]["reverser"]["answers"] == 2 * 64
    assert pairs["prompts"]["sft"] > 0 and pairs["prompts"]["preference"] > 0
    assert summary["runtime_s"]["total"] > 0


def _markdown_table(report: str, heading: str) -> list[list[str]]:
    """The first table after ``heading``: its rows as stripped cells (separator row dropped)."""
    lines = report.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        if set(line) <= set("|-"):
            continue
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow
def test_demo_ci_report_numbers_match_the_evaluation(demo_ci):
    from nemo_infifpo.demo.report import label_map

    summary = json.loads((demo_ci / "summary.json").read_text())
    for path, value in _finite_numbers(summary):
        assert math.isfinite(value), path
    # summary.json's numbers are the evaluation stage's (lm-eval's), model by model.
    evaluation = json.loads((demo_ci / "eval" / "summary.json").read_text())
    assert evaluation["models"] == list(EVALUATED)
    table = summary["evaluation"]["exact_match"]
    for row in evaluation["rows"]:
        skill = row["task"].removeprefix("demo_")
        for model in EVALUATED:
            assert table[model][skill]["exact_match"] == row["values"][model]
            assert table[model][skill]["stderr"] == row["stderr"][model]
            # ... and lm-eval's own per-model results file.
            results = json.loads((demo_ci / "eval" / model / "results.json").read_text())["results"][row["task"]]
            assert results["exact_match,none"] == row["values"][model]
    # The report's table shows the same numbers.
    report = (demo_ci / "report.md").read_text()
    header, *rows = _markdown_table(report, "## Results (held-out prompts, lm-eval)")
    labels = label_map(summary)
    assert [r[0] for r in rows] == [labels[m] for m in EVALUATED]
    for row, model in zip(rows, EVALUATED):
        for column, skill in ((1, "reverse"), (2, "sort")):
            e = table[model][skill]
            assert row[column] == f"{100 * e['exact_match']:.1f}% ± {100 * e['stderr']:.1f}", (model, skill)
    # Pair provenance: counts per skill and model add up to the pairs written.
    for part, file in (("sft", "sft.jsonl"), ("preference", "pairs.jsonl")):
        by_skill = summary["pairs"]["by_skill"][part]
        lines = (demo_ci / "pairs" / file).read_text().splitlines()
        assert sum(e["pairs"] for e in by_skill.values()) == len(lines)
        for e in by_skill.values():
            assert sum(e["chosen"].values()) == e["pairs"] == sum(e["rejected"].values())
    # The sample generations are lm-eval's logged answers.
    for skill, examples in summary["samples"].items():
        assert len(examples) == 2
        logged = [json.loads(line) for line in (demo_ci / "eval" / "infifpo" / f"samples_demo_{skill}.jsonl").read_text().splitlines()]
        first = min(logged, key=lambda r: r["doc_id"])
        assert examples[0]["outputs"]["infifpo"]["answer"] == first["filtered_resps"][0]
    for run in ("dpo", "infifpo"):
        training = summary["training"][run]
        assert training["steps"] == 2
        assert training["step0_parity_max_abs_diff"] < 1e-4  # megatron TP=2 vs the scored p0 (fp32)
    assert summary["training"]["dpo"]["first"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    checks = summary["checks"]
    assert set(checks["skills"]) == {"reverse", "sort"} and isinstance(checks["infifpo_not_worse_than_p0"], bool)

    for heading in ("## The world and its models", "## Results", "## How the pairs were made", "## Fusion on the preference pairs",
                    "## Training", "## Sample generations", "## Stages and runtimes"):
        assert heading in report
    for plot in ("training_curves.png", "accuracy_by_skill.png", "sft_loss.png", "timeline.png"):
        data = (demo_ci / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, plot
        assert f"plots/{plot}" in report


@pytest.mark.slow
def test_demo_ci_exported_checkpoints_load_with_transformers(demo_ci):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in EVALUATED:
        directory = demo_ci / "models" / "hf" / name
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Sort 4821"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all(), name

    def weights(name):
        out = {}
        for shard in sorted((demo_ci / "models" / "hf" / name).glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    # SFT changed the pivot, preference training changed p0, and the two runs differ.
    pivot, p0, dpo, infifpo = weights("pivot"), weights("p0"), weights("dpo"), weights("infifpo")
    assert pivot.keys() == p0.keys() == dpo.keys() == infifpo.keys()
    assert any(not torch.equal(pivot[k], p0[k]) for k in p0)
    assert any(not torch.equal(p0[k], dpo[k]) for k in p0)
    assert any(not torch.equal(dpo[k], infifpo[k]) for k in p0)


@pytest.mark.slow
def test_demo_seeds_tabulates_finished_runs(demo_ci, tmp_path):
    """recipes/demo_seeds.py reuses finished runs and takes differences per seed."""
    summary = json.loads((demo_ci / "summary.json").read_text())
    for seed, shift in ((0, 0.0), (1, 0.1)):
        run = tmp_path / f"seed-{seed}"
        run.mkdir()
        copy = json.loads(json.dumps(summary))
        copy["seed"] = seed
        copy["evaluation"]["exact_match"]["infifpo"]["sort"]["exact_match"] += shift
        (run / "summary.json").write_text(json.dumps(copy))
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo_seeds.py"), "--seeds", "0", "1", "--output-dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "seeds.json").read_text())
    base = summary["evaluation"]["exact_match"]
    diff = result["differences"]["InfiFPO − DPO"]["sort"]
    expected = base["infifpo"]["sort"]["exact_match"] - base["dpo"]["sort"]["exact_match"]
    assert diff["values"] == pytest.approx([expected, expected + 0.1])
    assert diff["mean"] == pytest.approx(expected + 0.05) and diff["se"] == pytest.approx(0.05)
    assert result["models"]["pivot"]["reverse"]["se"] == 0.0
    assert "InfiFPO − DPO" in (tmp_path / "seeds.md").read_text()


@pytest.mark.slow
def test_demo_sweep_on_validation_prompts(tmp_path):
    """A one-point grid: the base run evaluates on the validation tasks, each extra run is
    trained, exported and evaluated on them, and the table names every run."""
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo_sweep.py"), "--config-name", "demo_ci", "--output-dir", str(out),
         "--sft-lr", "2e-3", "--sft-steps", "2", "--lr", "2e-4", "--beta", "0.3"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    base = json.loads((out / "base" / "summary.json").read_text())
    assert base["evaluation"]["split"] == "validation"
    assert set(base["evaluation"]["tasks"].values()) == {"demo_reverse_validation", "demo_sort_validation"}
    sweep = json.loads((out / "sweep.json").read_text())
    # The configured SFT setting (the base run's p0) competes with the grid.
    assert sorted(sweep["runs"]) == ["base-p0", "dpo-lr0.0002-b0.3", "infifpo-lr0.0002-b0.3", "sft-lr0.002-s2"]
    for name in sorted(sweep["runs"])[1:]:
        evaluation = json.loads((out / "eval" / name / "summary.json").read_text())
        assert evaluation["tasks"] == ["demo_reverse_validation", "demo_sort_validation"]
    command = (out / "logs" / "train_infifpo-lr0.0002-b0.3.log").read_text().splitlines()[0]
    assert "loss.beta=0.3" in command and "optim.lr=0.0002" in command and "loss.type=infifpo" in command
    table = (out / "sweep.md").read_text()
    assert "| 0.0002 | 0.3 |" in table and "| 0.002 | 2 |" in table


def test_template_arguments_reach_every_stage_that_renders_a_models_template(tmp_path):
    """pivot.chat_template_kwargs reaches the pivot's origin, generation, SFT, p0's scoring and
    both preference runs; a source's only its own origin, generation and scoring."""
    from nemo_infifpo.demo.pipeline import Layout, build_stages
    from nemo_infifpo.demo.world import WorldFiles

    config = _config(**{"pivot.chat_template_kwargs": {"enable_thinking": False, "date_string": "2025-01-31"}})
    names = [config.pivot.name, *(s.name for s in config.sources)]
    world = WorldFiles(root=tmp_path, model_dirs={n: tmp_path / n for n in names},
                       origin_data={n: tmp_path / f"{n}.jsonl" for n in names},
                       prompts={s: tmp_path / f"{s}.jsonl" for s in ("train", "validation", "heldout")},
                       tasks=tmp_path / "tasks", description={"skills": {"reverse": {}, "sort": {}}})
    layout = Layout(tmp_path / "out")
    override = 'tokenizer.chat_template_kwargs={enable_thinking:false,date_string:"2025-01-31"}'
    with_kwargs = []
    for stage in build_stages(config, layout, world):
        try:
            command = stage.command()
        except FileNotFoundError:  # a stage that needs an earlier stage's output
            continue
        if override in command:
            with_kwargs.append(stage.name)
    pivot = config.pivot.name
    assert set(with_kwargs) == {f"origin/{pivot}", f"generate/{pivot}", "sft", "score/p0", "train/infifpo", "train/dpo"}, with_kwargs
