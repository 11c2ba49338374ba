"""Process-group and megatron model-parallel initialisation for torchrun, srun or plain python.

One entry point, :func:`init_distributed`, turns whatever launcher started this process into
an initialised ``torch.distributed`` world plus megatron's tensor/pipeline/data-parallel
groups, on GPUs (nccl) or on CPU (gloo, with :mod:`.cpu_compat` switched on).
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

import torch

from nemo_infifpo.engine.cpu_compat import enable_cpu_compat, running_on_cpu, seed_cpu_model_parallel

# Port range used when MASTER_PORT is derived from a Slurm job id: above the well-known and
# registered-service ports most clusters use, below Linux's default ephemeral range (32768+).
_SLURM_PORT_BASE = 15000
_SLURM_PORT_SPAN = 15000


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class ParallelInfo:
    """This rank's place in the tensor x pipeline x data parallel layout."""

    rank: int
    world_size: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    is_first_stage: bool
    is_last_stage: bool


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``[...]``."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _expand_ranges(body: str) -> list[str]:
    """``"001-003,010"`` -> ``["001", "002", "003", "010"]`` (zero padding kept)."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            out.extend(str(i).zfill(width) for i in range(int(lo), int(hi) + 1))
        elif item:
            out.append(item)
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list like ``gpu[001-003,010],login1`` without ``scontrol``.

    Several bracket groups in one name (``rack[1-2]-n[1-2]``) expand as a product, in the
    order Slurm lists them.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        expanded = [""]
        for prefix, body in re.findall(r"([^\[]*)(?:\[([^\]]*)\])?", name):
            if not prefix and not body:
                continue
            suffixes = _expand_ranges(body) if body else [""]
            expanded = [e + prefix + s for e in expanded for s in suffixes]
        hosts.extend(expanded)
    return hosts


def read_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/master address from torchrun, Slurm ``srun``, or default to one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if int(env["SLURM_NTASKS"]) == 1:
            # A single task has no peers: rendezvous with itself. MASTER_ADDR/MASTER_PORT may
            # be inherited from the submitting shell (sbatch exports its environment), naming
            # another node or a port in use there, and the store would wait for it forever.
            return LaunchEnv(
                rank=0,
                world_size=1,
                local_rank=int(env.get("SLURM_LOCALID", "0")),
                master_addr="127.0.0.1",
                master_port=_free_port(),
                launcher="slurm",
            )
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        hosts = expand_nodelist(nodelist)
        master_addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
        if "MASTER_PORT" in env:
            master_port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            # Every task of the job derives the same port with no communication; different
            # jobs sharing a node get different ports.
            master_port = _SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % _SLURM_PORT_SPAN
        else:
            master_port = 29500
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=master_addr,
            master_port=master_port,
            launcher="slurm",
        )
    return LaunchEnv(
        rank=0,
        world_size=1,
        local_rank=0,
        master_addr="127.0.0.1",
        master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port(),
        launcher="single",
    )


_INFO: ParallelInfo | None = None
_OWNS_PROCESS_GROUP = False
_GENERATION = 0  # how many process groups this process has created (store key namespace)


def get_parallel_info() -> ParallelInfo:
    """The info returned by the last :func:`init_distributed`."""
    if _INFO is None:
        raise RuntimeError("init_distributed() has not been called")
    return _INFO


def init_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    *,
    seed: int = 1234,
    device: str | torch.device | None = None,
) -> ParallelInfo:
    """Initialise torch.distributed and megatron's parallel groups; return this rank's layout.

    ``device=None`` picks ``cuda:LOCAL_RANK`` + nccl when CUDA is available, else CPU + gloo
    (and switches on the CPU compatibility patches). Calling again with the same sizes
    returns the existing info; other sizes raise (call :func:`destroy_distributed` first).
    """
    global _INFO, _OWNS_PROCESS_GROUP, _GENERATION
    from megatron.core import parallel_state, tensor_parallel

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    if _INFO is not None:
        if (_INFO.tp, _INFO.pp) != (tp, pp):
            raise RuntimeError(
                f"distributed already initialised with tp={_INFO.tp}, pp={_INFO.pp}; "
                f"cannot re-initialise with tp={tp}, pp={pp} (call destroy_distributed() first)"
            )
        return _INFO
    if tp < 1 or pp < 1:
        raise ValueError(f"parallel sizes must be >= 1, got tp={tp}, pp={pp}")

    launch = read_launch_env()
    if launch.world_size % (tp * pp) != 0:
        raise ValueError(
            f"world size {launch.world_size} is not divisible by tensor_model_parallel_size "
            f"({tp}) x pipeline_model_parallel_size ({pp}) = {tp * pp}; "
            "launch a multiple of tp*pp processes"
        )

    if device is None:
        use_cpu = running_on_cpu()
        dev = torch.device("cpu") if use_cpu else torch.device("cuda", launch.local_rank)
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", launch.local_rank)
        use_cpu = dev.type == "cpu"
    if use_cpu:
        enable_cpu_compat()
    else:
        torch.cuda.set_device(dev)

    if not torch.distributed.is_initialized():
        # torchrun exported the env:// variables (and may host the store in its agent);
        # for srun and plain python the address comes from the LaunchEnv explicitly, without
        # exporting anything into this process's environment.
        if launch.launcher == "torchrun":
            url = "env://"
        else:
            url = f"tcp://{launch.master_addr}:{launch.master_port}"
        store, _, _ = next(torch.distributed.rendezvous(url, rank=launch.rank, world_size=launch.world_size))
        # destroy_process_group() restarts torch's group numbering, but torchrun's agent store
        # outlives it: a re-init would read the previous incarnation's keys and the ranks
        # would wire groups to dead peers. A fresh key namespace per init avoids that.
        store = torch.distributed.PrefixStore(f"nemo_infifpo/init{_GENERATION}", store)
        _GENERATION += 1
        torch.distributed.init_process_group(
            backend="gloo" if use_cpu else "nccl",
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
        )
        _OWNS_PROCESS_GROUP = True
    world_size = torch.distributed.get_world_size()
    if world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by tp*pp = {tp * pp}")

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp
    )

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    # Same default seed on every rank so parameters replicated across TP/DP are identical;
    # tensor-parallel shards draw from per-TP-rank streams inside megatron's RNG tracker.
    torch.manual_seed(seed)
    if use_cpu:
        seed_cpu_model_parallel(seed, tp_rank=tp_rank)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)

    _INFO = ParallelInfo(
        rank=torch.distributed.get_rank(),
        world_size=world_size,
        local_rank=launch.local_rank,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        tp_rank=tp_rank,
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=dev,
        is_first_stage=parallel_state.is_pipeline_first_stage(ignore_virtual=True),
        is_last_stage=parallel_state.is_pipeline_last_stage(ignore_virtual=True),
    )
    return _INFO


def destroy_distributed() -> None:
    """Tear down megatron's groups and (if we created it) the default process group."""
    global _INFO, _OWNS_PROCESS_GROUP
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _OWNS_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNS_PROCESS_GROUP = False
    _INFO = None
