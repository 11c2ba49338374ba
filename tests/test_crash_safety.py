"""Crash safety, fast part: durable atomic writes, output locks, torn metrics, checkpoint
checksums, the resume guard and the step-0 tolerance. (Real training runs that exercise them
together: tests/test_crash_safety_e2e.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_infifpo import atomic
from nemo_infifpo.locking import OutputLock, OutputLockedError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        assert atomic.process_umask() == umask
        path = atomic.write_text_atomic(tmp_path / "manifest.json", "{}\n")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == mode


def test_atomic_write_fsyncs_data_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert events == ["fsync-file", "rename", "fsync-dir"]


def test_stale_temporaries_of_one_target_are_removed(tmp_path):
    target = tmp_path / "shard-00001-of-00004.parquet"
    stale = [tmp_path / f".{target.name}.abc123.tmp", tmp_path / f".{target.name}.zz.tmp"]
    others = [tmp_path / ".shard-00002-of-00004.parquet.abc.tmp", tmp_path / "shard-00001-of-00004.json"]
    for path in stale + others:
        path.write_text("partial")
    removed = atomic.remove_stale_temporaries(target)
    assert sorted(removed) == sorted(stale)
    assert all(not p.exists() for p in stale) and all(p.exists() for p in others)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic.write_text_atomic(tmp_path / "state.json", "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


# --------------------------------------------------------------------------- locks


def test_a_second_holder_is_refused_with_the_holder_named(tmp_path):
    with OutputLock(tmp_path / ".lock", stage="training"):
        with pytest.raises(OutputLockedError) as error:
            OutputLock(tmp_path / ".lock", stage="training").acquire()
        message = str(error.value)
        assert f"process {os.getpid()} on {socket.gethostname()}" in message
        assert "training run" in message and str(tmp_path / ".lock") in message
    assert not (tmp_path / ".lock").exists()  # released
    OutputLock(tmp_path / ".lock", stage="training").acquire().release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    code = (
        "import sys, time; from nemo_infifpo.locking import OutputLock; "
        "OutputLock(sys.argv[1], stage='scoring').acquire(); print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(OutputLockedError):  # alive: refused
        OutputLock(tmp_path / ".lock", stage="scoring").acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING):
        lock = OutputLock(tmp_path / ".lock", stage="scoring").acquire()
    assert f"process {proc.pid} no longer exists" in caplog.text
    assert lock.held
    lock.release()


def _foreign_lock(path: Path, *, age_s: float, job: str | None = None, restart: int = 0) -> None:
    holder = {"token": "t0", "stage": "training", "host": "node-elsewhere", "pid": 4242, "pid_start": "1",
              "slurm_job_id": job, "slurm_restart_count": restart, "started": time.time() - age_s}
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_lock_on_another_node_is_stale_only_without_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_INFIFPO_LOCK_STALE_S", "30")
    _foreign_lock(tmp_path / ".lock", age_s=5)
    with pytest.raises(OutputLockedError, match="node-elsewhere"):
        OutputLock(tmp_path / ".lock", stage="training").acquire()
    _foreign_lock(tmp_path / ".lock", age_s=120)
    OutputLock(tmp_path / ".lock", stage="training").acquire().release()


def test_a_requeued_slurm_job_takes_over_its_own_earlier_lock(tmp_path, monkeypatch):
    _foreign_lock(tmp_path / ".lock", age_s=1, job="777", restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    OutputLock(tmp_path / ".lock", stage="training").acquire().release()
    _foreign_lock(tmp_path / ".lock", age_s=1, job="778", restart=0)  # another job: refused
    with pytest.raises(OutputLockedError):
        OutputLock(tmp_path / ".lock", stage="training").acquire()


def test_the_heartbeat_keeps_a_long_run_fresh(tmp_path):
    lock = OutputLock(tmp_path / ".lock", stage="training", stale_after_s=0.4).acquire()
    try:
        os.utime(lock.path, (time.time() - 100, time.time() - 100))
        time.sleep(0.5)
        assert time.time() - lock.path.stat().st_mtime < 0.4
    finally:
        lock.release()


def test_release_leaves_a_lock_taken_over_by_someone_else(tmp_path):
    lock = OutputLock(tmp_path / ".lock", stage="training").acquire()
    lock._stop.set()
    _foreign_lock(tmp_path / ".lock", age_s=0)  # e.g. taken over after a long pause of ours
    lock.release()
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "node-elsewhere"


def test_concurrent_acquirers_one_wins(tmp_path):
    code = (
        "import sys, time; from nemo_infifpo.locking import OutputLock, OutputLockedError\n"
        "while time.time() < float(sys.argv[2]): pass\n"
        "try:\n    OutputLock(sys.argv[1], stage='scoring').acquire(); print('won'); time.sleep(2)\n"
        "except OutputLockedError:\n    print('refused')\n"
    )
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".lock"), start], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(6)]
    outcomes = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outcomes) == ["refused"] * 5 + ["won"]


# --------------------------------------------------------------------------- metrics.jsonl


def _logger(tmp_path, start_step):
    from nemo_infifpo.training.config import LoggingConfig
    from nemo_infifpo.training.metrics import MetricsLogger

    return MetricsLogger(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False), enabled=True,
                         total_steps=9, start_step=start_step, run_config={})


@pytest.mark.parametrize("tail", ['{"step": 4, "lo', "\x00" * 64, '{"step": 4, "loss": 1.0}' + "\x00" * 300])
def test_a_torn_last_metrics_line_is_repaired_on_resume(tmp_path, tail, caplog):
    lines = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(lines + tail)
    with caplog.at_level(logging.WARNING):
        logger = _logger(tmp_path, start_step=3)
    logger.log({"step": 4, "loss": 0.5, "lr": 1e-3})
    logger.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["loss"] == 0.5
    if tail.endswith('"lo'):  # a partial record (NULs alone are just dropped; step 4 is repeated)
        assert "torn last line" in caplog.text and "metrics.jsonl" in caplog.text


def test_a_damaged_metrics_line_in_the_middle_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, oops\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a metrics record"):
        _logger(tmp_path, start_step=3)


# --------------------------------------------------------------------------- checkpoint checksums


def _fake_checkpoint(root: Path, step: int) -> Path:
    from nemo_infifpo.models.checkpoint import METADATA_FILE
    from nemo_infifpo.training.checkpoint import TrainerState, _record_checksums, checkpoint_name

    path = root / "checkpoints" / checkpoint_name(step)
    (path / "train_state").mkdir(parents=True)
    (path / "weights").mkdir()
    (path / METADATA_FILE).write_text("{}")
    (path / "weights" / "__0_0.distcp").write_bytes(os.urandom(4096))
    (path / "train_state" / "__0_0.distcp").write_bytes(os.urandom(1024))
    TrainerState(step=step, consumed_samples=4 * step).write(path)
    _record_checksums(path)
    atomic.write_text_atomic(root / "checkpoints" / "latest", path.name + "\n")
    return path


def test_an_intact_checkpoint_verifies(tmp_path):
    from nemo_infifpo.training.checkpoint import CHECKSUMS_FILE, verify_checkpoint

    path = _fake_checkpoint(tmp_path, 1)
    listed = json.loads((path / CHECKSUMS_FILE).read_text())["files"]
    assert sorted(listed) == ["nemo_infifpo_model.json", "train_state/__0_0.distcp", "trainer_state.json", "weights/__0_0.distcp"]
    assert verify_checkpoint(path) == []


def test_a_flipped_byte_and_a_truncated_file_are_named(tmp_path):
    from nemo_infifpo.training.checkpoint import verify_checkpoint

    path = _fake_checkpoint(tmp_path, 1)
    weights = path / "weights" / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    data[1234] ^= 0x10
    weights.write_bytes(bytes(data))
    (path / "train_state" / "__0_0.distcp").write_bytes(b"short")
    problems = verify_checkpoint(path)
    assert any("weights/__0_0.distcp" in p and "checksum mismatch" in p for p in problems)
    assert any("train_state/__0_0.distcp" in p and "5 bytes, 1024 when saved" in p for p in problems)


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog):
    from nemo_infifpo.training.checkpoint import CheckpointCorruptError, find_resumable_checkpoint

    older, newest = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    assert find_resumable_checkpoint(tmp_path) == newest
    with open(newest / "weights" / "__0_0.distcp", "r+b") as handle:
        handle.truncate(100)
    with caplog.at_level(logging.ERROR):
        assert find_resumable_checkpoint(tmp_path) == older
    assert "step_0000004 is damaged" in caplog.text and "weights/__0_0.distcp" in caplog.text
    (older / "trainer_state.json").write_text('{"step": 2, "consumed')  # torn (size differs too)
    with pytest.raises(CheckpointCorruptError, match="every checkpoint .* is damaged .*step_0000004, step_0000002"):
        find_resumable_checkpoint(tmp_path)
    assert find_resumable_checkpoint(tmp_path / "nothing-here") is None


# --------------------------------------------------------------------------- resume guard


def _inputs(**changes):
    from nemo_infifpo.training.config import parse_config
    from nemo_infifpo.training.resume import run_inputs

    raw = {"model": {"path": "/models/p0"}, "data": {"path": "/data/train.parquet"}, "output_dir": "/runs/a",
           "optim": {"lr": 1e-6, "min_lr": 0.0, "warmup_fraction": 0.1}, "trainer": {"max_steps": 100}}
    for key, value in changes.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return run_inputs(parse_config(raw), "fp-1")


def test_resume_with_the_same_inputs_passes(tmp_path):
    from nemo_infifpo.training.resume import check_resume

    check_resume(tmp_path, _inputs(), 100, 40, _inputs(), 100, ())


@pytest.mark.parametrize("change, key", [
    ({"model__path": "/models/other"}, "model.path"),
    ({"optim__lr": 2e-6}, "optim.lr"),
    ({"loss__type": "dpo"}, "loss.type"),
    ({"trainer__max_steps": 300}, "trainer.max_steps"),
])
def test_resume_with_changed_inputs_is_refused_naming_the_key(tmp_path, change, key):
    from nemo_infifpo.training.config import ConfigError
    from nemo_infifpo.training.resume import check_resume

    with pytest.raises(ConfigError) as error:
        check_resume(tmp_path, _inputs(), 100, 40, _inputs(**change), 100, ())
    assert key in str(error.value) and f"checkpoint.allow_changes=[{key}]" in str(error.value)


def test_seed_and_other_data_contents_are_refused(tmp_path):
    from nemo_infifpo.training.config import ConfigError
    from nemo_infifpo.training.resume import check_resume

    saved = _inputs()
    moved = dict(saved, **{"data.path": "/scratch/copy.parquet"})  # same contents elsewhere: fine
    check_resume(tmp_path, saved, 100, 40, moved, 100, ())
    with pytest.raises(ConfigError, match="data.path: the file .* has other contents"):
        check_resume(tmp_path, saved, 100, 40, dict(saved, **{"data.fingerprint": "fp-2"}), 100, ())
    with pytest.raises(ConfigError, match="seed: checkpoint 1234, now 7"):
        check_resume(tmp_path, saved, 100, 40, dict(saved, seed=7), 100, ())


def test_an_allowed_schedule_change_logs_the_learning_rate_jump(tmp_path, caplog):
    from nemo_infifpo.training.resume import check_resume

    with caplog.at_level(logging.WARNING):
        check_resume(tmp_path, _inputs(), 100, 40, _inputs(trainer__max_steps=300), 300, ("trainer.max_steps",))
    assert "changed trainer.max_steps" in caplog.text
    assert "learning rate jumps from" in caplog.text and "over 300 steps (was 100)" in caplog.text


def test_allow_changes_is_validated():
    from nemo_infifpo.training.config import ConfigError, parse_config

    base = {"model": {"path": "p"}, "data": {"path": "d"}, "output_dir": "o"}
    assert parse_config({**base, "checkpoint": {"allow_changes": ["optim.lr"]}}).checkpoint.allow_changes == ("optim.lr",)
    with pytest.raises(ConfigError, match="checkpoint.allow_changes.*'model.tensor_model_parallel_size'.*not checked"):
        parse_config({**base, "checkpoint": {"allow_changes": ["model.tensor_model_parallel_size"]}})
    with pytest.raises(ConfigError, match="must be a list"):
        parse_config({**base, "checkpoint": {"allow_changes": "optim.lr"}})


def test_data_fingerprint_sees_scores_and_order():
    from nemo_infifpo.training.resume import data_fingerprint

    lengths = torch.tensor([[5, 6], [7, 8]])
    scores = {"ref_chosen": torch.tensor([-1.0, -2.0], dtype=torch.float64)}
    base = data_fingerprint(["a", "b"], lengths, scores)
    assert base == data_fingerprint(["a", "b"], lengths.clone(), {k: v.clone() for k, v in scores.items()})
    assert base != data_fingerprint(["b", "a"], lengths, scores)
    assert base != data_fingerprint(["a", "b"], lengths, {"ref_chosen": torch.tensor([-1.0, -2.5], dtype=torch.float64)})


# --------------------------------------------------------------------------- step-0 tolerance


def test_parity_tolerance_scales_with_tokens_for_summed_scores():
    from nemo_infifpo.training.parity import ParityReport, ParityRow

    # float32 rounding of a ~2000-nat sum over 1500 tokens
    row = ParityRow("long", "chosen", -2000.0, -2000.0 + 4e-3, 1500, 1500)
    assert ParityReport([row], 1e-4, per_token=True).failures == []
    assert ParityReport([row], 1e-4, per_token=False).failures == [row]
    wrong = ParityRow("wrong", "chosen", -2000.0, -1990.0, 1500, 1500)  # a real mismatch still fails
    report = ParityReport([row, wrong], 1e-4, per_token=True)
    assert report.failures == [wrong] and "per token" in report.message()


# --------------------------------------------------------------------------- signals


def test_stop_signals_install_before_heavy_imports():
    """The recipe installs its handlers first thing; that import must not pull in torch."""
    code = "import sys; import nemo_infifpo.training.signals; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- docs/BAD_INPUTS.md

# The train/export rows of the bad-input table and the tests that reproduce them.
TRAINING_CASES = {
    "invalid_row_for_pivot_template": "test_training_units.py::test_training_leaves_out_rows_the_pivot_template_cannot_encode",
    "too_many_invalid_rows_in_training": "test_training_units.py::test_training_stops_above_the_excluded_fraction_or_under_fail",
    "scored_in_another_dtype": "test_training_units.py::test_a_pivot_scored_in_another_dtype_is_named_before_any_model_is_built",
    "scored_at_another_layout_bf16": "test_training_units.py::test_in_bf16_the_scoring_layout_and_back_end_must_match",
    "scored_with_another_template": "test_training_e2e.py::test_wrong_template_fails_fingerprint_check_first",
    "step0_mismatch": "test_training_e2e.py::test_wrong_template_fails_step0_parity",
    "bf16_on_cpu": "test_training_e2e.py::test_bf16_on_cpu_is_refused",
    "allow_changes_unknown_key": "test_crash_safety.py::test_allow_changes_is_validated",
    "resume_with_changed_config": "test_crash_safety_e2e.py::test_a_changed_config_is_refused_on_resume_and_allowed_explicitly",
    "second_run_into_output_dir": "test_crash_safety_e2e.py::test_two_runs_into_one_output_dir",
    "damaged_newest_checkpoint": "test_crash_safety_e2e.py::test_a_flipped_byte_is_detected_and_resume_falls_back",
    "every_checkpoint_damaged": "test_crash_safety_e2e.py::test_every_checkpoint_damaged_is_refused_not_restarted",
    "torn_metrics_line": "test_crash_safety.py::test_a_torn_last_metrics_line_is_repaired_on_resume",
    "damaged_metrics_line": "test_crash_safety.py::test_a_damaged_metrics_line_in_the_middle_names_file_and_line",
    "stop_signal_during_startup": "test_crash_safety_e2e.py::test_a_stop_signal_during_startup_exits_cleanly",
    "export_damaged_checkpoint": "test_crash_safety_e2e.py::test_export_refuses_a_damaged_checkpoint_and_a_locked_output",
    "export_into_locked_output": "test_crash_safety_e2e.py::test_export_refuses_a_damaged_checkpoint_and_a_locked_output",
}


# The generate/judge/build_pairs rows and the tests that reproduce them.
GENERATION_CASES = {
    "no_prompts": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "model_cannot_generate": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "generation_rerun_with_other_inputs": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "negative_temperature": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "judge_function_not_importable": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "reward_model_without_path": "test_generation_stages.py::test_bad_inputs_give_one_clear_line_and_lose_nothing",
    "judge_raises_or_returns_nan": "test_generation_stages.py::test_function_judge_excludes_and_reports_answers_it_cannot_score",
    "pairs_from_other_outputs": "test_build_pairs.py::test_build_pairs_refuses_mismatched_inputs",
    "bad_split_fraction": "test_build_pairs.py::test_build_pairs_recipe_reports_bad_options",
}


def test_training_rows_of_the_bad_input_table_have_their_tests():
    import ast

    table = (REPO / "docs" / "BAD_INPUTS.md").read_text()
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| `")]
    for stages, cases in ((("train", "export"), TRAINING_CASES), (("generate", "judge", "build_pairs"), GENERATION_CASES)):
        ours = {cells[0].strip().strip("`") for cells in rows if cells[2].strip() in stages}
        assert ours == set(cases), stages
    for case, node in {**TRAINING_CASES, **GENERATION_CASES}.items():
        file, name = node.split("::")
        tree = ast.parse((REPO / "tests" / file).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, (case, node)
