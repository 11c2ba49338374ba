"""Launch-environment parsing: torchrun, Slurm srun, and a plain single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nemo_infifpo.engine.distributed import LaunchEnv, expand_nodelist, read_launch_env

_LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
    "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST", "SLURM_JOB_ID",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_torchrun_vars(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "MASTER_ADDR": "node7", "MASTER_PORT": "29400"}.items():
        clean_env.setenv(name, value)
    # torchrun wins over Slurm variables when both are present (torchrun inside an allocation).
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    assert read_launch_env() == LaunchEnv(5, 8, 1, "node7", 29400, "torchrun")


def test_slurm_vars(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                        "SLURM_JOB_NODELIST": "gpu[001-003,010]", "SLURM_JOB_ID": "123456"}.items():
        clean_env.setenv(name, value)
    env = read_launch_env()
    assert (env.rank, env.world_size, env.local_rank) == (9, 16, 1)
    assert env.master_addr == "gpu001"
    assert env.launcher == "slurm"
    assert 1024 < env.master_port < 32768
    # Every task of the job derives the same port; another job gets another one.
    assert read_launch_env().master_port == env.master_port
    clean_env.setenv("SLURM_JOB_ID", "123457")
    assert read_launch_env().master_port != env.master_port
    # An explicit MASTER_PORT / MASTER_ADDR wins.
    clean_env.setenv("MASTER_PORT", "31000")
    clean_env.setenv("MASTER_ADDR", "10.0.0.2")
    env = read_launch_env()
    assert (env.master_addr, env.master_port) == ("10.0.0.2", 31000)


def test_slurm_plain_host_list(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a1,b2",
                        "SLURM_JOB_ID": "7"}.items():
        clean_env.setenv(name, value)
    env = read_launch_env()
    assert env.master_addr == "a1" and env.local_rank == 0



def test_slurm_single_task_ignores_an_inherited_master(clean_env: pytest.MonkeyPatch) -> None:
    """A one-task step (export, merge, one-rank scoring) has no peers: a MASTER_ADDR/PORT that
    came with the submitting shell's environment must not send its store to another node."""
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "node[1-2]",
                        "SLURM_JOB_ID": "7", "MASTER_ADDR": "node2", "MASTER_PORT": "29500"}.items():
        clean_env.setenv(name, value)
    env = read_launch_env()
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "slurm", "127.0.0.1")
    assert env.master_port != 29500

@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
        ("a1,b2", ["a1", "b2"]),
        ("node7", ["node7"]),
        ("node[1-2],login[05]", ["node1", "node2", "login05"]),
        ("r[1-2]-n[08-09]", ["r1-n08", "r1-n09", "r2-n08", "r2-n09"]),
        ("gpu-a100-[1,3]", ["gpu-a100-1", "gpu-a100-3"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_plain_process(clean_env: pytest.MonkeyPatch) -> None:
    env = read_launch_env()
    assert (env.rank, env.world_size, env.local_rank) == (0, 1, 0)
    assert env.master_addr == "127.0.0.1" and env.launcher == "single"
    assert 0 < env.master_port < 65536


def test_explicit_environ_mapping() -> None:
    env = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "1234"})
    assert env == LaunchEnv(1, 2, 0, "127.0.0.1", 1234, "torchrun")


_INIT_SCRIPT = r"""
import json
from nemo_infifpo.engine import cpu_compat
from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
out = {}
try:
    init_distributed(2, 1)
except ValueError as err:
    out["indivisible"] = str(err)
info = init_distributed(1, 1, seed=3, device="cpu")
out["info"] = [info.world_size, info.tp, info.pp, info.dp, str(info.device), info.is_first_stage, info.is_last_stage]
out["same_again"] = init_distributed(1, 1) is info
try:
    init_distributed(1, 1) and init_distributed(1, 2)
except RuntimeError as err:
    out["resize"] = str(err)
out["cpu_compat"] = cpu_compat.is_cpu_compat_enabled()
import torch
from megatron.core import tensor_parallel
with tensor_parallel.get_cuda_rng_tracker().fork():
    out["forked_draw"] = torch.rand(1).item()
destroy_distributed()
out["reinit"] = init_distributed(1, 1).world_size
destroy_distributed()
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_init_distributed_single_process(clean_env: pytest.MonkeyPatch) -> None:
    """init/idempotence/resize error/destroy/re-init, in a subprocess (patches stay out of pytest)."""
    proc = subprocess.run([sys.executable, "-c", _INIT_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "not divisible" in out["indivisible"]
    assert out["info"] == [1, 1, 1, 1, "cpu", True, True]
    assert out["same_again"] is True
    assert "tp=1, pp=1" in out["resize"]
    assert out["cpu_compat"] is True
    assert 0.0 <= out["forked_draw"] < 1.0
    assert out["reinit"] == 1
