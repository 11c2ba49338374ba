"""A real single-node Slurm cluster (slurm/local_cluster.sh) and the behaviour the pipeline
scripts rely on: jobs, multi-task srun, afterok chains, kill_invalid_depend; plus shellcheck
over slurm/.

The fixtures and helpers here are shared with tests/test_slurm_pipeline.py. The cluster is
installed with apt when missing (root); the tests are skipped only when it cannot be brought
up AND apt cannot install it (no root / no apt / no network): in CI they must run.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
LOCAL_CLUSTER = SLURM_DIR / "local_cluster.sh"
SLURM_HOME = Path(os.environ.get("INFIFPO_SLURM_HOME", "/tmp/infifpo-slurm"))

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers


def _run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, check=False, **kw)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def _apt_reason() -> str | None:
    """Why apt cannot install Slurm here, or None if it (probably) can."""
    if os.geteuid() != 0:
        return "not root: cannot install or start slurm-wlm/munge"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    return None


class Cluster:
    """The running cluster: an environment with SLURM_CONF and small client helpers."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        return _run(list(cmd), env=self.env, timeout=timeout, check=check)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        result = _run(["sbatch", "--parsable", *args], env=env or self.env, cwd=cwd)
        return result.stdout.strip().split(";")[0]

    def active(self, job_ids: list[str] | None = None) -> list[str]:
        """Queued/running job ids (all jobs, or those of ``job_ids``; array tasks count)."""
        out = self.run("squeue", "-h", "-o", "%A %F %T", check=False).stdout
        active = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            if job_ids is None or parts[0] in job_ids or parts[1] in job_ids:
                active.append(parts[0])
        return active

    def wait(self, job_ids: list[str] | None = None, timeout: float = 600, poll: float = 0.25) -> None:
        """Until none of ``job_ids`` (or no job at all) is queued or running. Polls squeue:
        `sbatch --wait` notices completion only seconds later."""
        deadline = time.monotonic() + timeout
        while self.active(job_ids):
            if time.monotonic() > deadline:
                queue = self.run("squeue", check=False).stdout
                raise AssertionError(f"jobs {job_ids} still active after {timeout}s:\n{queue}")
            time.sleep(poll)

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` records (one per array task) as dicts."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return [_parse_record(line) for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        records = self.jobs(job_id)
        assert len(records) == 1, records
        return records[0]


def _parse_record(line: str) -> dict[str, str]:
    record: dict[str, str] = {}
    for token in line.split():
        if "=" in token:
            key, value = token.split("=", 1)
            record.setdefault(key, value)
    return record


def slurm_time(value: str) -> datetime:
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%S")


def cluster_running(env: dict[str, str]) -> bool:
    return _run(["bash", str(LOCAL_CLUSTER), "status"], env=env, check=False).returncode == 0


def cluster_session(home: Path = SLURM_HOME, nodes: int = 1, port: str | None = None) -> Iterator[Cluster]:
    """Bring a local cluster up (installing it if needed) for the session; take it down at
    the end only if this session started it. (The ``slurm_cluster`` fixture of the test
    modules; bringing up a running cluster is a no-op.) ``nodes`` > 1: one network namespace
    per node (slurm/local_cluster.sh up --nodes); ``port``: its slurmctld port, so that it can
    run next to another cluster."""
    env = dict(os.environ)
    env["INFIFPO_SLURM_HOME"] = str(home)
    env["SLURM_CONF"] = str(home / "etc" / "slurm.conf")
    if port is not None:
        env["INFIFPO_SLURM_PORT"] = port
    was_running = shutil.which("sbatch") is not None and cluster_running(env)
    up = _run(["bash", str(LOCAL_CLUSTER), "up", "--nodes", str(nodes)], env=env, timeout=900, check=False)
    if up.returncode != 0:
        reason = _apt_reason()
        if shutil.which("slurmctld") is None and reason is not None:
            pytest.skip(f"Slurm is not installed and cannot be: {reason}")
        if shutil.which("slurmctld") is None and "apt-get install" in up.stderr:
            pytest.skip(f"Slurm is not installed and apt could not install it:\n{up.stderr[-2000:]}")
        pytest.fail(f"local_cluster.sh up failed:\nstdout:\n{up.stdout}\nstderr:\n{up.stderr}")
    assert f"export SLURM_CONF={env['SLURM_CONF']}" in up.stdout
    cluster = Cluster(env)
    yield cluster
    if not was_running:
        _run(["bash", str(LOCAL_CLUSTER), "down"], env=env, check=False)


slurm_cluster = pytest.fixture(scope="session", name="slurm_cluster")(cluster_session)


# ----------------------------------------------------------------------------- tests


def test_up_is_idempotent(slurm_cluster: Cluster) -> None:
    started = time.monotonic()
    second = _run(["bash", str(LOCAL_CLUSTER), "up"], env=slurm_cluster.env, timeout=300)
    assert time.monotonic() - started < 30, "a second `up` must not reinstall or restart anything"
    assert f"export SLURM_CONF={slurm_cluster.env['SLURM_CONF']}" in second.stdout
    pids = {name: (SLURM_HOME / "run" / f"{name}.pid").read_text().strip() for name in ("slurmctld", "slurmd")}
    _run(["bash", str(LOCAL_CLUSTER), "up"], env=slurm_cluster.env, timeout=300)
    assert pids == {name: (SLURM_HOME / "run" / f"{name}.pid").read_text().strip() for name in pids}
    state = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
    assert state and state[0] in {"idle", "mix", "alloc"}, state
    assert cluster_running(slurm_cluster.env)


def test_trivial_job_and_two_task_srun(slurm_cluster: Cluster, tmp_path: Path) -> None:
    started = time.monotonic()
    job = slurm_cluster.sbatch(f"--output={tmp_path}/trivial.out", "--wrap", "echo hello from $SLURM_JOB_ID")
    multi = slurm_cluster.sbatch(
        "--ntasks=2",
        f"--output={tmp_path}/multi.out",
        "--wrap",
        "srun --ntasks=2 bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'",
    )
    slurm_cluster.wait([job, multi], timeout=120)
    assert (tmp_path / "trivial.out").read_text().strip() == f"hello from {job}"
    lines = sorted((tmp_path / "multi.out").read_text().split("\n"))
    assert "task 0 of 2" in lines and "task 1 of 2" in lines, lines
    for job_id in (job, multi):
        assert slurm_cluster.job(job_id)["JobState"] == "COMPLETED"
    print(f"two trivial jobs in {time.monotonic() - started:.1f}s")


def _stamp_job(path: Path, name: str, fail: bool = False) -> str:
    body = f"date +%s.%N > {path}/{name}.start; sleep 1; date +%s.%N > {path}/{name}.end"
    return body + ("; exit 3" if fail else "")


def test_dependency_chain_runs_in_order(slurm_cluster: Cluster, tmp_path: Path) -> None:
    ids: list[str] = []
    for name in ("a", "b", "c"):
        deps = [f"--dependency=afterok:{ids[-1]}"] if ids else []
        ids.append(slurm_cluster.sbatch(*deps, f"--output={tmp_path}/{name}.out", "--wrap", _stamp_job(tmp_path, name)))
    slurm_cluster.wait(ids, timeout=120)
    stamps = {n: (float((tmp_path / f"{n}.start").read_text()), float((tmp_path / f"{n}.end").read_text())) for n in "abc"}
    assert stamps["a"][1] <= stamps["b"][0] and stamps["b"][1] <= stamps["c"][0], stamps
    records = [slurm_cluster.job(i) for i in ids]
    assert [r["JobState"] for r in records] == ["COMPLETED"] * 3
    for before, after in itertools.pairwise(records):
        assert slurm_time(before["EndTime"]) <= slurm_time(after["StartTime"])


def test_failed_job_cancels_dependents(slurm_cluster: Cluster, tmp_path: Path) -> None:
    """kill_invalid_depend (cluster-wide, no --kill-on-invalid-dep here): a failed afterok
    dependency cancels the dependents instead of leaving them pending forever."""
    first = slurm_cluster.sbatch(f"--output={tmp_path}/a.out", "--wrap", _stamp_job(tmp_path, "a", fail=True))
    second = slurm_cluster.sbatch(f"--dependency=afterok:{first}", f"--output={tmp_path}/b.out", "--wrap", _stamp_job(tmp_path, "b"))
    third = slurm_cluster.sbatch(f"--dependency=afterok:{second}", f"--output={tmp_path}/c.out", "--wrap", _stamp_job(tmp_path, "c"))
    slurm_cluster.wait([first, second, third], timeout=120)
    assert slurm_cluster.job(first)["JobState"] == "FAILED"
    for job_id in (second, third):
        record = slurm_cluster.job(job_id)
        assert record["JobState"] == "CANCELLED", record
        assert record["Reason"] == "DependencyNeverSatisfied", record
    assert not (tmp_path / "b.start").exists() and not (tmp_path / "c.start").exists()


def test_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip("shellcheck is not installed and cannot be installed (no root/apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "shellcheck"]
        if _run(install, env=env, timeout=600, check=False).returncode != 0:
            _run(["apt-get", "update", "-q"], env=env, timeout=600, check=False)
            if _run(install, env=env, timeout=600, check=False).returncode != 0:
                pytest.skip("shellcheck could not be installed with apt-get")
    scripts = sorted(str(p.relative_to(REPO)) for p in [*SLURM_DIR.glob("*.sh"), *SLURM_DIR.glob("*.sbatch")])
    assert {"slurm/train_phi4.sh", "slurm/common.sh", "slurm/local_cluster.sh", "slurm/score.sbatch",
            "slurm/merge.sbatch", "slurm/train.sbatch", "slurm/export.sbatch"} <= set(scripts)
    result = _run(["shellcheck", "-x", *scripts], cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
