"""End-to-end InfiFPO training on CPU with 2 gloo ranks (tiny Phi-3 pivot, toy scored set).

Three launches, each checked by several tests (a torchrun launch costs 10-30 s):

* ``train_parallel`` - TP=2 and PP=2 runs, packing, DPO, SFT, DP/micro-batch equivalence;
* ``train_resume``   - straight vs SIGTERM + resume (same and other layout), export;
* ``train_failures`` - step-0 parity failure, fingerprint mismatch, NaN, bf16 on CPU (1 process).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchrun import REPO, WORKERS, run_torchrun
from workers import train_common as tc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fixture_json(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_fixture")
    path = root / "fixture.json"
    path.write_text(json.dumps(tc.build_fixture(root)))
    return path


def _weights(directory: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(directory / f"{name}.pt")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# --------------------------------------------------------------------------- parallel runs


@pytest.fixture(scope="module")
def parallel(fixture_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_parallel")
    run_torchrun("train_parallel.py", str(fixture_json), str(out), timeout=600)
    return out, json.loads((out / "result.json").read_text())


def _reference_step1_loss(fixture_json: Path, rows: list[int]) -> float:
    """infifpo_loss from the precomputed scores with s_p = s_p0 (the step-0 policy)."""
    from nemo_infifpo.data.scored_set import read_scored_set
    from nemo_infifpo.loss import infifpo_loss

    scores = read_scored_set(json.loads(fixture_json.read_text())["scored"]).scores(True, rows)
    losses, _ = infifpo_loss(
        scores["ref_chosen"], scores["ref_rejected"], scores["ref_chosen"], scores["ref_rejected"],
        scores["source_chosen"], scores["source_rejected"], beta=2.5, fusion="max_margin",
    )
    return float(losses.mean())


@pytest.mark.parametrize("run", ["tp2", "pp2"])
def test_step1_loss_is_reference_loss_and_loss_decreases(parallel, fixture_json, run):
    _, result = parallel
    losses = result[run]["losses"]
    # Whole toy set as one unshuffled global batch: step 1 sees rows 0..N-1 at the initial weights.
    reference = _reference_step1_loss(fixture_json, list(range(len(tc.ROWS))))
    assert losses[0] == pytest.approx(reference, abs=1e-4)
    assert result[run]["parity"] < 1e-4  # megatron at TP/PP vs the HF-computed p0 scores
    assert result[run]["records"][0]["step0_parity_max_abs_diff"] == result[run]["parity"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.05 * losses[0]


def test_tp2_and_pp2_follow_the_same_trajectory(parallel):
    _, result = parallel
    assert result["tp2"]["losses"] == pytest.approx(result["pp2"]["losses"], rel=1e-3, abs=1e-6)
    grad_tp = [r["grad_norm"] for r in result["tp2"]["records"]]
    grad_pp = [r["grad_norm"] for r in result["pp2"]["records"]]
    assert grad_tp == pytest.approx(grad_pp, rel=1e-3)


def test_metrics_records(parallel):
    out, result = parallel
    record = result["tp2"]["records"][0]
    for key in ("step", "loss", "reward_chosen", "reward_rejected", "margin", "accuracy", "lr", "grad_norm",
                "tokens_per_s", "step_time_s", "fusion/clipped_fraction"):
        assert key in record, key
    assert record["step"] == 1 and record["margin"] == pytest.approx(record["reward_chosen"] - record["reward_rejected"])
    selected = {k: v for k, v in record.items() if k.startswith("fusion/selected/")}
    assert set(selected) == {f"fusion/selected/{c}" for c in (*tc.SOURCE_NAMES, "p0")}
    assert sum(selected.values()) == len(tc.ROWS)
    assert (out / "tp2" / "config.yaml").is_file()


def test_packed_equals_padded(parallel):
    out, result = parallel
    assert result["tp2_packed"]["losses"][0] == pytest.approx(result["tp2_padded"]["losses"][0], abs=1e-6)
    padded, packed = _weights(out, "tp2_padded.step1_weights"), _weights(out, "tp2_packed.step1_weights")
    assert _max_diff(padded, packed) < 1e-6


def test_same_update_whatever_dp_micro_batch_and_accumulation(parallel):
    out, result = parallel
    reference = _weights(out, "dp2_mbs1.final_weights")  # DP=2, micro-batch 1
    for name in ("tp2_mbs2", "pp2_2micro"):  # DP=1 with micro-batch 2; DP=1 with 2 micro-batches
        assert _max_diff(reference, _weights(out, f"{name}.final_weights")) < 1e-6, name
        assert result[name]["losses"] == pytest.approx(result["dp2_mbs1"]["losses"], abs=1e-5)


def test_dpo_matches_trl(parallel, fixture_json):
    from test_loss import _trl_dpo  # TRL's own DPOTrainer loss, called on given scores

    from nemo_infifpo.data.scored_set import read_scored_set

    _, result = parallel
    dpo = result["dpo"]
    assert dpo["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # step 0: policy = reference
    policy = dpo["policy_step2"]
    scores = read_scored_set(json.loads(fixture_json.read_text())["scored"]).scores(False, policy["rows"])
    trl = _trl_dpo(
        torch.tensor(policy["chosen"], dtype=torch.float64), torch.tensor(policy["rejected"], dtype=torch.float64),
        scores["ref_chosen"], scores["ref_rejected"], beta=0.1, loss_type="sigmoid",
    )
    assert dpo["losses"][1] == pytest.approx(float(trl), abs=1e-5)


def test_sft_lowers_chosen_nll(parallel):
    _, result = parallel
    losses = result["sft"]["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert result["sft"]["records"][0]["response_tokens"] > 0


# --------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resume(fixture_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_resume")
    run_torchrun("train_resume.py", str(fixture_json), str(out), timeout=600)
    return out, json.loads((out / "result.json").read_text())


def test_sigterm_saves_and_returns(resume):
    _, result = resume
    interrupted = result["interrupted"]
    assert interrupted["step"] == 3 and interrupted["stopped_by_signal"]
    assert interrupted["checkpoint"].endswith("step_0000003")
    assert "step_0000003" in interrupted["checkpoints_after_stop"]
    assert interrupted["handler_restored"]


def test_resume_reproduces_the_straight_run(resume):
    out, result = resume
    assert result["interrupted"]["steps_logged"] == [1, 2, 3, 4, 5, 6]
    assert result["interrupted"]["losses"] == result["straight"]["losses"]  # bit for bit
    assert _max_diff(_weights(out, "straight"), _weights(out, "resumed")) == 0.0
    assert result["resumed"]["parity"] is None  # the step-0 check runs at step 0 only


def test_resumed_run_keeps_hf_assets_after_pruning(resume):
    _, result = resume
    resumed = result["resumed"]
    assert resumed["checkpoints_with_assets"] == {"step_0000004": True, "step_0000006": True}
    assert resumed["assets_dir"].endswith("step_0000006/hf_assets") and resumed["assets_dir_has_config"]


def test_resume_at_another_layout(resume):
    out, result = resume
    other = result["other_layout"]
    assert other["step"] == 6 and other["steps_logged"] == [1, 2, 3, 4, 5, 6]
    assert other["losses"] == pytest.approx(result["straight"]["losses"], abs=1e-5)
    assert _max_diff(_weights(out, "straight"), _weights(out, "other_layout")) < 1e-6


def test_checkpoint_retention_and_export(resume):
    out, result = resume
    assert result["straight"]["checkpoints"] == ["latest", "step_0000004", "step_0000006"]
    assert (out / "straight" / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    from safetensors.torch import load_file

    exported = {}
    for shard in (out / "exported").glob("*.safetensors"):
        exported.update(load_file(shard))
    assert _max_diff(_weights(out, "straight"), exported) == 0.0
    assert (out / "exported" / "config.json").is_file() and (out / "exported" / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def failures(fixture_json, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_failures")
    proc = subprocess.run(
        [sys.executable, str(WORKERS / "train_failures.py"), str(fixture_json), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def test_wrong_template_fails_step0_parity(failures):
    outcome = failures["wrong_template"]
    assert outcome["error"] == "Step0ParityError"
    assert "step-0 parity failed" in outcome["message"]
    assert "trainer.step0_parity_atol" in outcome["message"]
    # The worst rows are listed with id, side, both scores and the difference.
    assert any(row["id"] in outcome["message"] for row in tc.ROWS)
    assert "precomputed" in outcome["message"] and "recomputed" in outcome["message"]


def test_wrong_template_fails_fingerprint_check_first(failures):
    outcome = failures["fingerprint"]
    assert outcome["error"] == "FingerprintMismatchError"
    assert "tokenizer.chat_template" in outcome["message"] and "builtin:plain" in outcome["message"]


def test_nan_stops_before_update_without_saving(failures):
    outcome = failures["nan"]
    assert outcome["error"] == "NonFiniteError"
    assert outcome["message"].startswith("step 2:")
    assert outcome["checkpoints"] == ["latest", "step_0000001"] and outcome["latest"] == "step_0000001"
    assert outcome["steps_logged"] == [1]


def test_step0_parity_runs_the_training_path(failures):
    """A bug in packing (not used by scoring) must fail parity: it checks the training forward."""
    assert failures["packing_ok"]["error"] is None, failures["packing_ok"]
    outcome = failures["broken_packing"]
    assert outcome["error"] == "Step0ParityError", outcome
    assert "step-0 parity failed" in outcome["message"]


def test_bf16_on_cpu_is_refused(failures):
    outcome = failures["bf16_on_cpu"]
    assert outcome["error"] == "ConfigError" and "model.precision" in outcome["message"]


# --------------------------------------------------------------------------- the recipe


def test_recipe_trains_single_process(fixture_json, tmp_path):
    """recipes/train_infifpo.py as users run it (Hydra overrides, plain python, one rank):
    parity check, two steps, final checkpoint. (Resuming is covered by train_resume.)"""
    fixture = json.loads(fixture_json.read_text())
    out = tmp_path / "run"
    command = [
        sys.executable, str(REPO / "recipes" / "train_infifpo.py"), "--config-name", "infifpo_tiny",
        f"model.path={fixture['pivot']}", f"data.path={fixture['scored']}", f"output_dir={out}",
        "model.tensor_model_parallel_size=1", "model.micro_batch_size=1", "trainer.max_steps=2",
        "checkpoint.interval=0", "logging.tensorboard=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    records = tc.read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["step0_parity_max_abs_diff"] < 1e-4
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000002"
