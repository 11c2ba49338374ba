"""The multi-node launch path on a real two-node Slurm cluster.

``slurm/local_cluster.sh up --nodes 2`` runs two slurmd nodes on this machine, each in its own
network namespace with its own address, hostname and /etc/hosts, sharing the filesystem (the
shared filesystem of a cluster). Here ``sbatch slurm/train_phi4.sh`` runs the tiny pipeline
with training on 2 nodes x 1 task, so that what only exists with several hosts really runs:
srun spreading the ranks over two hosts, MASTER_ADDR from the node list, the rendezvous and
gloo across hosts, checkpoints written from both nodes into one directory, the requeue of a
two-node job, and scoring array tasks landing on different nodes.

The reference runs (one node x 2 tasks) use the same cluster, pinned to one node. The cluster
has its own INFIFPO_SLURM_HOME and ports and runs next to the single-node one of the other
Slurm tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_slurm_cluster import LOCAL_CLUSTER, REPO, Cluster, cluster_session
from test_slurm_pipeline import (
    TRAIN_STEPS,
    copy_scoring,
    hf_state,
    jsonl,
    read_pipeline,
    stage_jobs,
    submit_pipeline,
    tiny_assets,  # noqa: F401  (fixture)
    tiny_env,
    wait_for,
)

pytestmark = pytest.mark.slow

TWO_NODE_HOME = Path(os.environ.get("INFIFPO_SLURM_TWO_NODE_HOME", "/tmp/infifpo-slurm-2nodes"))
TWO_NODE_PORT = os.environ.get("INFIFPO_SLURM_TWO_NODE_PORT", "6827")
NODES = ["node1", "node2"]


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[Cluster]:
    yield from cluster_session(home=TWO_NODE_HOME, nodes=2, port=TWO_NODE_PORT)


# ----------------------------------------------------------------------------- helpers


def hostnames(cluster: Cluster, nodelist: str) -> list[str]:
    return cluster.run("scontrol", "show", "hostnames", nodelist).stdout.split()


def first_loss(out: Path) -> float:
    metrics = [m for m in jsonl(out / "train" / "metrics.jsonl") if "loss" in m]
    assert metrics and int(metrics[0]["step"]) == 1, metrics[:1]
    return float(metrics[0]["loss"])


def logs(out: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.out")))


def run_pipeline(cluster: Cluster, root: Path, out: Path, **settings: str) -> dict[str, str]:
    """The tiny pipeline (no evaluation) into ``out``; waits for every stage."""
    ids = submit_pipeline(cluster, REPO, tiny_env(cluster, root, out, **settings), out, cwd=REPO)
    cluster.wait(stage_jobs(ids), timeout=600, poll=1.0)
    states = {s: read_pipeline(out)["stages"][s]["state"] for s in ("score", "merge", "train", "export")}
    assert states == dict.fromkeys(states, "complete"), logs(out)
    return ids


def assert_same_weights(a: Path, b: Path) -> None:
    import torch

    first, second = hf_state(a), hf_state(b)
    assert first.keys() == second.keys()
    for name, tensor in second.items():
        torch.testing.assert_close(first[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# Two nodes x one task each; tiny config at TP=2 unless INFIFPO_TP says otherwise.
TWO_NODES = dict(INFIFPO_NODES="2", INFIFPO_TASKS_PER_NODE="1")
ONE_NODE = dict(INFIFPO_NODES="1", INFIFPO_TASKS_PER_NODE="2")
# Two ranks per scoring task (data parallel): each task has a rendezvous of its own.
SCORING = dict(INFIFPO_SCORE_TASKS="2")


@pytest.fixture(scope="module")
def one_node_run(two_nodes: Cluster, tiny_assets: Path) -> Path:  # noqa: F811
    """The reference: every scoring task and training (TP=2) on a single node."""
    out = tiny_assets / "one-node"
    run_pipeline(two_nodes, tiny_assets, out, **ONE_NODE, **SCORING, INFIFPO_TP="2", INFIFPO_SCORE_SBATCH_ARGS="--nodelist=node1")
    return out


@pytest.fixture(scope="module")
def two_node_run(two_nodes: Cluster, tiny_assets: Path, one_node_run: Path) -> tuple[Path, dict[str, str]]:  # noqa: F811
    """Scoring tasks spread over both nodes (each takes a whole node), training TP=2 across
    the two nodes. Submitted from a shell that exports MASTER_ADDR/MASTER_PORT (left over from
    a torchrun set-up, or set by a site's profile): every stage must rendezvous in its own
    allocation regardless, wherever it lands."""
    out = tiny_assets / "two-nodes"
    ids = run_pipeline(two_nodes, tiny_assets, out, **TWO_NODES, **SCORING, INFIFPO_TP="2", INFIFPO_SCORE_SBATCH_ARGS="--exclusive",
                       MASTER_ADDR="node2", MASTER_PORT="29500")
    return out, ids


# ----------------------------------------------------------------------------- the cluster


def test_nodes_are_separate_hosts(two_nodes: Cluster, tmp_path: Path) -> None:
    """One task per node: each sees its own hostname and address, and resolves the other."""
    probe = tmp_path / "probe.sh"
    probe.write_text("echo $SLURM_PROCID $SLURM_NODEID $(hostname) $(ip -4 -o addr show eth0 | awk '{print $4}')"
                     " $(getent hosts node1 node2 | awk '{print $1}' | paste -sd,)\n")
    job = two_nodes.sbatch("--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/out", "--wrap", f"srun bash {probe}")
    two_nodes.wait([job], timeout=120)
    lines = sorted((tmp_path / "out").read_text().split("\n"))
    rows = [line.split() for line in lines if line.strip()]
    assert [r[:3] for r in rows] == [["0", "0", "node1"], ["1", "1", "node2"]], lines
    addresses = [r[3].split("/")[0] for r in rows]
    assert len(set(addresses)) == 2
    for row in rows:  # every node resolves both names to the nodes' own addresses
        assert row[4].split(",") == addresses, rows
    assert two_nodes.job(job)["JobState"] == "COMPLETED"


LAYOUT_WORKER = '''
"""One rank's place in a TP=2 x DP=2 layout over srun, and a sum over each of its groups."""
import json, socket
import torch

def main():
    from megatron.core import parallel_state
    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed, read_launch_env

    launch = read_launch_env()
    info = init_distributed(2, 1)
    sums = {}
    for name, group in (("tp", parallel_state.get_tensor_model_parallel_group()),
                        ("dp", parallel_state.get_data_parallel_group())):
        value = torch.tensor([float(info.rank)])
        torch.distributed.all_reduce(value, group=group)
        sums[name] = int(value.item())
    print(json.dumps({"host": socket.gethostname(), "rank": info.rank, "local_rank": info.local_rank,
                      "world": info.world_size, "master": launch.master_addr, "tp_rank": info.tp_rank,
                      "dp_rank": info.dp_rank, "sums": sums}), flush=True)
    destroy_distributed()

if __name__ == "__main__":
    main()
'''


def test_ranks_and_groups_on_two_nodes_by_two(two_nodes: Cluster, tmp_path: Path) -> None:
    """2 nodes x 2 ranks through srun and init_distributed: global ranks in node order, local
    ranks 0/1 on each node, the master on node1, tensor-parallel pairs inside a node and
    data-parallel pairs across the nodes (the layout that keeps TP traffic node-local)."""
    worker = tmp_path / "layout.py"
    worker.write_text(LAYOUT_WORKER)
    job = two_nodes.sbatch("--nodes=2", "--ntasks-per-node=2", f"--output={tmp_path}/out", "--wrap",
                           f"PYTHONPATH={REPO} OMP_NUM_THREADS=1 srun {sys.executable} {worker}")
    two_nodes.wait([job], timeout=300)
    text = (tmp_path / "out").read_text()
    assert two_nodes.job(job)["JobState"] == "COMPLETED", text
    ranks = sorted((json.loads(line) for line in text.splitlines() if line.startswith("{")), key=lambda r: r["rank"])
    layout = [(r["host"], r["rank"], r["local_rank"], r["tp_rank"], r["dp_rank"]) for r in ranks]
    assert layout == [("node1", 0, 0, 0, 0), ("node1", 1, 1, 1, 0), ("node2", 2, 0, 0, 1), ("node2", 3, 1, 1, 1)], text
    assert {(r["world"], r["master"]) for r in ranks} == {(4, "node1")}
    assert [r["sums"] for r in ranks] == [{"tp": 1, "dp": 2}, {"tp": 1, "dp": 4}, {"tp": 5, "dp": 2}, {"tp": 5, "dp": 4}]

def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def test_up_down_removes_only_what_it_made(two_nodes: Cluster, tmp_path: Path) -> None:
    """A second two-node cluster (own home, ports, subnet) next to the session's: `down`
    stops its daemons and removes its namespaces, links and /etc/netns files, nothing else."""
    env = dict(os.environ, INFIFPO_SLURM_HOME=str(tmp_path / "slurm"), INFIFPO_SLURM_PORT="6847")
    env["SLURM_CONF"] = str(tmp_path / "slurm" / "etc" / "slurm.conf")
    before_ns, before_links = _netns(), _links()
    up = subprocess.run(["bash", str(LOCAL_CLUSTER), "up", "--nodes", "2"], env=env, capture_output=True, text=True, timeout=300, check=False)
    try:
        assert up.returncode == 0, up.stderr
        ours = {"infifpo6847-node1", "infifpo6847-node2"}
        assert _netns() - before_ns == ours
        assert _links() - before_links == {"ifp6847br", "ifp6847n1", "ifp6847n2"}
        pids = [int((tmp_path / "slurm" / "run" / f"{d}.pid").read_text()) for d in ("munged", "slurmctld", "slurmd-node1", "slurmd-node2")]
        status = subprocess.run(["bash", str(LOCAL_CLUSTER), "status"], env=env, capture_output=True, text=True, timeout=60, check=False)
        assert status.returncode == 0 and "node2" in status.stdout, status.stdout + status.stderr
    finally:
        down = subprocess.run(["bash", str(LOCAL_CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert down.returncode == 0, down.stderr
    assert _netns() == before_ns and _links() == before_links
    assert not any(Path("/etc/netns", ns).exists() for ns in ours)
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    # The session's cluster is untouched.
    states = two_nodes.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
    assert sorted(s.split()[0] for s in states if s.strip()) == NODES


# ----------------------------------------------------------------------------- the pipeline


def test_scoring_array_across_nodes_merges_to_the_same_scored_set(two_nodes: Cluster, one_node_run: Path, two_node_run: tuple[Path, dict[str, str]]) -> None:
    import pyarrow.parquet as pq

    from nemo_infifpo.data.scored_set import read_scored_set

    out, ids = two_node_run
    tasks = two_nodes.jobs(ids["score"])
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2", "3"]
    assert all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert {t["NodeList"] for t in tasks} == set(NODES), [(t["ArrayTaskId"], t["NodeList"]) for t in tasks]
    one, two = (pq.read_table(p / "merge" / "train.scored.parquet") for p in (one_node_run, out))
    assert two.num_rows == 48
    assert two.replace_schema_metadata(None).equals(one.replace_schema_metadata(None))
    assert list(read_scored_set(out / "merge" / "train.scored.parquet").source_names) == ["qwen2", "llama", "mistral"]


def test_tensor_parallel_across_nodes_matches_one_node(two_nodes: Cluster, one_node_run: Path, two_node_run: tuple[Path, dict[str, str]]) -> None:
    """TP=2 with one rank per node: the first loss equals the one-node run's, and so does the
    exported model (checkpoint shards written from both nodes into one directory)."""
    out, ids = two_node_run
    record = two_nodes.job(ids["train"])
    assert (record["NumNodes"], record["NumTasks"]) == ("2", "2"), record
    assert hostnames(two_nodes, record["NodeList"]) == NODES
    log = (out / "logs" / f"train-{ids['train']}.out").read_text()
    assert "nodes=2 tasks=2 master=node1:" in log, log
    one, two = first_loss(one_node_run), first_loss(out)
    print(f"first loss, TP=2: one node {one!r}, two nodes {two!r}")
    assert two == one
    assert max(int(m["step"]) for m in jsonl(out / "train" / "metrics.jsonl")) == TRAIN_STEPS
    assert_same_weights(out / "hf", one_node_run / "hf")


def test_data_parallel_across_nodes_matches_one_node(two_nodes: Cluster, tiny_assets: Path, two_node_run: tuple[Path, dict[str, str]]) -> None:  # noqa: F811
    """DP=2 with one rank per node against DP=2 on one node (scoring and merge reused): same
    first loss, same exported model."""
    scored, _ = two_node_run
    runs: dict[str, tuple[Path, dict[str, str]]] = {}
    for name, layout in (("dp-one-node", ONE_NODE), ("dp-two-nodes", TWO_NODES)):
        out = tiny_assets / name
        copy_scoring(scored, out, merge=True)
        env = tiny_env(two_nodes, tiny_assets, out, **layout, INFIFPO_TP="1")
        runs[name] = (out, submit_pipeline(two_nodes, REPO, env, out, cwd=REPO))
    # Both at once: the cluster has room for both, and each spends much of its time starting up.
    two_nodes.wait([j for _, ids in runs.values() for j in stage_jobs(ids)], timeout=600, poll=1.0)
    (one, one_ids), (two, two_ids) = runs["dp-one-node"], runs["dp-two-nodes"]
    for out, ids in runs.values():
        assert (ids["score"], ids["merge"]) == ("complete", "complete"), ids
        assert read_pipeline(out)["stages"]["export"]["state"] == "complete", logs(out)
    assert hostnames(two_nodes, two_nodes.job(two_ids["train"])["NodeList"]) == NODES
    assert len(hostnames(two_nodes, two_nodes.job(one_ids["train"])["NodeList"])) == 1
    print(f"first loss, DP=2: one node {first_loss(one)!r}, two nodes {first_loss(two)!r}")
    assert first_loss(two) == first_loss(one)
    assert_same_weights(two / "hf", one / "hf")


def test_two_node_preemption_resumes_to_the_same_weights(two_nodes: Cluster, tiny_assets: Path, two_node_run: tuple[Path, dict[str, str]]) -> None:  # noqa: F811
    """SIGUSR1 to the batch shell of the two-node training job mid-run: both ranks checkpoint
    into the shared directory, the job requeues itself, resumes on two nodes, and the exported
    model equals the uninterrupted two-node run's."""
    first, _ = two_node_run
    out = tiny_assets / "two-nodes-preempt"
    copy_scoring(first, out, merge=True)
    env = tiny_env(two_nodes, tiny_assets, out, **TWO_NODES, INFIFPO_TP="2")
    ids = submit_pipeline(two_nodes, REPO, env, out, cwd=REPO)
    train = ids["train"]
    metrics = out / "train" / "metrics.jsonl"
    wait_for(lambda: len(jsonl(metrics)) >= 1 or not two_nodes.active([train]), 900, "the first training step", poll=0.2)
    if len(jsonl(metrics)) >= TRAIN_STEPS or not two_nodes.active([train]):
        pytest.fail(f"training finished before it could be signalled; raise TRAIN_STEPS ({TRAIN_STEPS})")
    two_nodes.run("scancel", "--signal=USR1", "--batch", train)
    two_nodes.wait(stage_jobs(ids), timeout=600, poll=1.0)

    record = two_nodes.job(train)
    log = (out / "logs" / f"train-{train}.out").read_text()
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1, log
    assert "requeued to resume" in log, log
    assert hostnames(two_nodes, record["NodeList"]) == NODES
    launches = [line for line in log.splitlines() if "nodes=2 tasks=2 master=node1:" in line]
    assert len(launches) >= 2 and "restart=0" in launches[0] and "restart=1" in launches[1], log
    # Saved where it stopped, resumed from there: every step logged exactly once.
    saved = re.search(r"stop signal received: saved step (\d+)", log)
    resumed = re.search(r"resumed from \S+ at step (\d+)", log)
    assert saved and resumed and saved.group(1) == resumed.group(1), log
    assert 1 <= int(saved.group(1)) < TRAIN_STEPS
    assert [int(m["step"]) for m in jsonl(metrics) if "step" in m] == list(range(1, TRAIN_STEPS + 1))
    assert read_pipeline(out)["stages"]["export"]["state"] == "complete", logs(out)
    assert_same_weights(out / "hf", first / "hf")

