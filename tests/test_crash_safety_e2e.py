"""Crash safety with real training runs (tiny pivot, CPU): damaged checkpoints, changed
configs, torn metrics, shared-directory permissions, two runs into one output_dir, and a stop
signal during start-up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from torchrun import REPO, WORKERS
from workers import train_common as tc

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("crash_fixture")
    built = tc.build_fixture(root)
    (root / "fixture.json").write_text(json.dumps(built))
    return {**built, "json": str(root / "fixture.json")}


@pytest.fixture(scope="module")
def crash(fixture, tmp_path_factory):
    out = tmp_path_factory.mktemp("train_crash")
    proc = subprocess.run([sys.executable, str(WORKERS / "train_crash.py"), fixture["json"], str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def test_a_flipped_byte_is_detected_and_resume_falls_back(crash):
    result = crash["fallback"]
    assert result["first"]["error"] is None and result["first"]["step"] == 2
    second = result["second"]
    assert second["error"] is None and second["step"] == 2
    assert any("step_0000002 is damaged" in m and "checksum mismatch" in m and Path(result["victim"]).name in m
               for m in second["logged"]), second["logged"]
    assert any("resuming from" in m and "step_0000001" in m for m in second["logged"])
    assert result["weights_diff"] == 0.0  # step 2 retrained from step 1: the same weights, bit for bit
    assert result["steps_logged"] == [1, 2]


def test_every_checkpoint_damaged_is_refused_not_restarted(crash):
    third = crash["fallback"]["third"]
    assert third["error"] == "CheckpointCorruptError"
    assert "step_0000002, step_0000001" in third["message"] and "move them aside" in third["message"]


def test_a_changed_config_is_refused_on_resume_and_allowed_explicitly(crash):
    result = crash["guard"]
    assert result["changed"]["error"] == "ConfigError"
    assert "optim.lr: checkpoint 0.001, now 0.0005" in result["changed"]["message"]
    assert "checkpoint.allow_changes=[optim.lr]" in result["changed"]["message"]
    assert result["config_unchanged_by_refusal"]
    allowed = result["allowed"]
    assert allowed["error"] is None and allowed["step"] == 5
    assert any("learning rate jumps" in m for m in allowed["logged"])
    assert any("torn last line" in m for m in allowed["logged"])
    assert result["steps_logged"] == [1, 2, 3, 4, 5]


def test_files_follow_the_umask_for_shared_project_directories(crash):
    modes = crash["modes"]
    assert any(name.startswith("checkpoints/step_0000005/") for name in modes)
    wrong = {name: mode for name, mode in modes.items() if int(mode, 8) & 0o060 != 0o060}
    assert not wrong, wrong


# --------------------------------------------------------------------------- the recipe


def _recipe(fixture, out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, str(REPO / "recipes" / "train_infifpo.py"), "--config-name", "infifpo_tiny",
        f"model.path={fixture['pivot']}", f"data.path={fixture['scored']}", f"output_dir={out}",
        "model.tensor_model_parallel_size=1", "model.micro_batch_size=1", "logging.tensorboard=false",
        "checkpoint.interval=0", *overrides,
    ]


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early (exit {proc.returncode}): {proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.2)


def test_two_runs_into_one_output_dir(fixture, tmp_path):
    """A second training into a running one's output_dir is refused at once; after the first
    stops (SIGUSR1: checkpoint, exit 0) the same command resumes it."""
    out = tmp_path / "run"
    first = subprocess.Popen(_recipe(fixture, out, "trainer.max_steps=100000"), cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2, first)
        second = subprocess.run(_recipe(fixture, out, "trainer.max_steps=100000"), cwd=REPO, env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-4000:]
        assert f"is in use by the training run of process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGUSR1)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-4000:]
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert not (out / ".lock").exists()
    resumed = subprocess.run(
        _recipe(fixture, out, f"trainer.max_steps={stopped_at + 1}", "checkpoint.allow_changes=[trainer.max_steps]"),
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [r["step"] for r in tc.read_metrics(out)] == list(range(1, stopped_at + 2))


def test_a_stop_signal_during_startup_exits_cleanly(fixture, tmp_path):
    """SIGUSR1 while the run is still starting (right after it locked its output, before the
    model is loaded): exit 0 without a step or a checkpoint, so Slurm can requeue it."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_recipe(fixture, out, "trainer.max_steps=2"), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / ".lock").is_file(), proc)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-4000:]
    assert "stop signal received during start-up" in stderr
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints" / "latest").exists()
    assert not (out / ".lock").exists()


def test_export_refuses_a_damaged_checkpoint_and_a_locked_output(crash, tmp_path):
    from nemo_infifpo.locking import OutputLock, sibling_lock_path

    damaged = Path(crash["fallback"]["victim"])  # relative to the run; the run's checkpoints are all truncated now
    root = Path(crash["run_dirs"]["fallback"])
    command = [sys.executable, str(REPO / "recipes" / "export_hf.py"), f"checkpoint_path={root / 'checkpoints' / 'step_0000002'}",
               f"output_path={tmp_path / 'hf'}"]
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "export refused" in proc.stderr and damaged.name in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "hf").exists()

    intact = Path(crash["run_dirs"]["guard"]) / "checkpoints" / "step_0000005"
    command[2] = f"checkpoint_path={intact}"
    with OutputLock(sibling_lock_path(tmp_path / "hf"), stage="export"):
        proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is in use by the export run" in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()
