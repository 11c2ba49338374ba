"""benchmarks/gpu_check.py, the one-GPU check of the CUDA path, in its --cpu-smoke mode: every
part a CPU can run (local-spec parity with transformers, score -> merge -> packed training with
step-0 parity through the training path, SIGUSR1 + resume, export -> transformers), so the
script itself is known to work before a GPU runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_passes_every_check(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--work-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["passed"] and result["mode"] == "cpu-smoke"
    assert set(result["checks"]) == {
        "parity_fp32_local_vs_hf", "pipeline_step0_parity_training_path", "pipeline_three_plus_steps_finite",
        "pipeline_loss_decreases", "resume_interrupted_at_step_3", "resume_same_step4_loss", "export_loads_and_matches",
    }
    pipeline = result["pipeline"]
    assert pipeline["step0_parity_max_abs_diff"] < 1e-4
    assert pipeline["resumed_losses"] == pipeline["losses"]  # the resumed run reproduces the straight one
    assert (tmp_path / "resumed" / "checkpoints" / "step_0000003").is_dir()  # the SIGUSR1 checkpoint
    assert (tmp_path / "hf" / "config.json").is_file()


def test_gpu_check_without_a_gpu_says_so():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 2:
        pytest.skip("a usable CUDA device is present")
    assert "needs one NVIDIA GPU" in json.loads(proc.stdout)["error"]
