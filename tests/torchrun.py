"""Run a worker script under ``torchrun`` with N gloo ranks and fail with its output.

Multi-process tests exercise real megatron-core tensor/pipeline parallel code on CPU. Each test
launches a small worker from ``tests/workers/`` and asserts on what the workers write (JSON
files, exit code), so failures show the ranks' own tracebacks.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

WORKERS = Path(__file__).parent / "workers"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    worker: str | Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run ``worker`` (a file name under tests/workers or a path) on ``nproc`` local ranks."""
    script = Path(worker)
    if not script.is_absolute():
        script = WORKERS / script
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(script), *args,
    ]
    full_env = dict(os.environ)
    # One thread per rank: two ranks share two cores, oversubscription makes gloo crawl.
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                     "PYTHONPATH": str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")})
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    if env:
        full_env.update(env)
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script.name} {' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc
