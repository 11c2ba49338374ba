"""The offline demo (``make demo``): its world, its stage runner, and one reduced end-to-end run.

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

    with pytest.raises(Exception, match="pairs_trian"):
        load_demo_config({"world": {"pairs_trian_per_skill": 3}})
    with pytest.raises(ValueError, match="unknown skill"):
        _config(**{"world.skills": ["reverse", "juggle"]})
    with pytest.raises(ValueError, match="sft.mix"):
        _config(**{"pivot.sft.mix": {"juggle": 1.0}})


def test_skills_and_wrong_answers():
    import random

    from nemo_infifpo.demo.world import SKILLS

    assert SKILLS["reverse"].solve("48213") == "31284"
    assert SKILLS["sort"].solve("4821") == "1248"
    rng = random.Random(0)
    for skill in SKILLS.values():
        for digits in ("1111", "1212", "90210", "5", "0099"):
            for _ in range(20):
                wrong, kind = skill.corrupt(digits, rng)
                # Never the right answer; always its length (see Skill.corruption_kinds).
                assert wrong != skill.solve(digits) and len(wrong) == len(digits), (skill.name, digits, wrong, kind)


def test_world_is_deterministic_and_held_out_is_unseen(tmp_path):
    from nemo_infifpo.demo.world import build_world, read_jsonl

    config = _config(**{"world.pairs_train_per_skill": 20, "world.pairs_heldout_per_skill": 10, "pivot.sft.steps": 2,
                        "sources.0.sft.steps": 2, "sources.1.sft.steps": 2})
    a = build_world(config, tmp_path / "a")
    b = build_world(config, tmp_path / "b")
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*.jsonl"))
    assert files and files == sorted(p.relative_to(b.root) for p in b.root.rglob("*.jsonl"))
    for name in files:
        assert (a.root / name).read_bytes() == (b.root / name).read_bytes(), name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a.model_dirs["pivot"] / name).read_bytes() == (b.model_dirs["pivot"] / name).read_bytes()

    heldout = read_jsonl(a.pairs_heldout)
    assert len(heldout) == 20 and {r["id"].split("/")[0] for r in heldout} == {"reverse", "sort"}
    held_inputs = {r["input"] for r in heldout}
    training = read_jsonl(a.pairs_train) + [r for path in a.sft_data.values() for r in read_jsonl(path)]
    assert not held_inputs & {r["input"] for r in training}
    assert all(r["chosen"] != r["rejected"] for r in training + heldout)
    # Different tokenizers and chat templates per model, as in a real fusion set-up.
    models = a.description["models"]
    assert len({m["tokenizer"] for m in models.values()}) == 3
    assert len({m["probe"]["rendered"] for m in models.values()}) == 3


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

EXPECTED_STAGES = (
    ["world"]
    + [f"sft/{m}" for m in ("pivot", "reverser", "sorter")]
    + [f"export/{m}" for m in ("pivot", "reverser", "sorter")]
    + ["pairs"]
    + [f"score/{m}" for m in ("pivot", "reverser", "sorter")]
    + ["merge"]
    + [f"eval/{m}" for m in ("p0", "reverser", "sorter")]
    + ["train/infifpo", "train/dpo", "export/infifpo", "export/dpo", "eval/infifpo", "eval/dpo"]
)


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
def test_demo_ci_runs_every_stage(demo_ci):
    summary = json.loads((demo_ci / "summary.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert sorted(stages) == sorted(EXPECTED_STAGES)
    assert all(s["status"] == "ok" for s in stages.values())
    for name, stage in stages.items():
        if name != "world":
            assert (demo_ci / stage["log"]).is_file(), name
    # The real entry points, as a cluster runs them.
    assert "torch.distributed.run --nproc_per_node=2" in stages["train/infifpo"]["command"]
    assert "recipes/train_infifpo.py" in stages["train/infifpo"]["command"]
    assert "loss.type=infifpo" in stages["train/infifpo"]["command"] and "loss.type=dpo" in stages["train/dpo"]["command"]
    assert "loss.type=sft" in stages["sft/reverser"]["command"]
    for script in ("score.py", "merge_scores.py", "export_hf.py"):
        assert any(f"recipes/{script}" in (s["command"] or "") for s in stages.values()), script
    assert summary["runtime_s"]["total"] > 0


@pytest.mark.slow
def test_demo_ci_report_and_numbers(demo_ci):
    summary = json.loads((demo_ci / "summary.json").read_text())
    for path, value in _finite_numbers(summary):
        assert math.isfinite(value), path
    for model in ("p0", "reverser", "sorter", "dpo", "infifpo"):
        for skill in ("reverse", "sort"):
            result = summary["evaluation"][model]["skills"][skill]
            assert 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["preference_accuracy"] <= 1.0
            assert result["n"] == 16
    for run in ("dpo", "infifpo"):
        training = summary["training"][run]
        assert training["steps"] == 4
        assert training["step0_parity_max_abs_diff"] < 1e-4  # megatron TP=2 vs the scored p0 (fp32)
    assert summary["training"]["dpo"]["first"]["loss"] == pytest.approx(math.log(2), abs=1e-5)

    report = (demo_ci / "report.md").read_text()
    for heading in ("## Results on the held-out pairs", "## Fusion on the training pairs", "## Training", "## Stages and runtimes"):
        assert heading in report
    assert "InfiFPO wins" not in report
    for plot in ("training_curves.png", "accuracy_by_skill.png", "sft_loss.png"):
        data = (demo_ci / "plots" / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, plot
        assert f"plots/{plot}" in report


@pytest.mark.slow
def test_demo_ci_exported_checkpoints_load_with_transformers(demo_ci):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("p0", "reverser", "sorter", "dpo", "infifpo"):
        directory = demo_ci / "models" / "hf" / name
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Sort 4821"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            logits = model(ids).logits
        assert torch.isfinite(logits).all(), name
    # Preference training changed the pivot, and the two runs differ.
    from safetensors.torch import load_file

    def weights(name):
        out = {}
        for shard in sorted((demo_ci / "models" / "hf" / name).glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    p0, dpo, infifpo = weights("p0"), weights("dpo"), weights("infifpo")
    assert p0.keys() == dpo.keys() == infifpo.keys()
    assert any(not torch.equal(p0[k], dpo[k]) for k in p0)
    assert any(not torch.equal(dpo[k], infifpo[k]) for k in p0)


def test_template_arguments_reach_every_stage_that_renders_a_models_template(tmp_path):
    """pivot.chat_template_kwargs reaches the pivot's SFT, its scoring and both preference
    runs; a source's only its own SFT and scoring."""
    from nemo_infifpo.demo.pipeline import Layout, build_stages
    from nemo_infifpo.demo.world import WorldFiles

    config = _config(**{"pivot.chat_template_kwargs": {"enable_thinking": False, "date_string": "2025-01-31"}})
    names = [config.pivot.name, *(s.name for s in config.sources)]
    world = WorldFiles(root=tmp_path, model_dirs={n: tmp_path / n for n in names},
                       sft_data={n: tmp_path / f"{n}.jsonl" for n in names}, pairs_train=tmp_path / "train.jsonl",
                       pairs_heldout=tmp_path / "heldout.jsonl", description={})
    layout = Layout(tmp_path / "out")
    override = 'tokenizer.chat_template_kwargs={enable_thinking:false,date_string:"2025-01-31"}'
    with_kwargs, without = [], []
    for stage in build_stages(config, layout, world):
        try:
            command = stage.command()
        except FileNotFoundError:  # a stage that needs an earlier stage's output
            continue
        (with_kwargs if override in command else without).append(stage.name)
    pivot = config.pivot.name
    assert {f"sft/{pivot}", f"score/{pivot}", "train/infifpo", "train/dpo"} <= set(with_kwargs), with_kwargs
    assert all(not name.endswith(tuple(s.name for s in config.sources)) for name in with_kwargs), with_kwargs
