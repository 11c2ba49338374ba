"""`sbatch slurm/train_phi4.sh` on the local single-node Slurm cluster.

Two layers:

- **Stand-in stages** (always run): a copy of slurm/ next to small Python stand-ins for the
  five recipes that honour the same command-line contracts (Hydra-style ``key=value``
  arguments, srun ranks, checkpoint-and-exit-0 on SIGUSR1/SIGTERM, resume from output_dir).
  They check the Slurm side on its own: dependency order, a failing scoring task cancelling
  everything after it, reruns that resubmit only what is missing, and pre-emption (requeue,
  resume, same result).
- **Real stages** on tiny CPU models (``INFIFPO_GPUS_PER_NODE=0``, 2 training tasks with
  gloo): the same scenarios through recipes/*.py, plus the exported checkpoint loading with
  ``AutoModelForCausalLM`` and matching the trained megatron weights. Each test is skipped
  while the recipe files it needs do not exist yet.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import local_eval_tasks
import pytest
from test_slurm_cluster import REPO, Cluster, cluster_session, slurm_time


@pytest.fixture(scope="session", name="slurm_cluster")
def _slurm_cluster() -> Iterator[Cluster]:
    yield from cluster_session()


HOST = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=False).stdout.strip()
ORCHESTRATOR = "slurm/train_phi4.sh"


# ----------------------------------------------------------------------------- helpers


def pipeline_env(cluster: Cluster, **settings: str) -> dict[str, str]:
    """The cluster's environment without any INFIFPO_* of the caller, plus ``settings``."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("INFIFPO_") or k == "INFIFPO_SLURM_HOME"}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"})
    env.update(settings)
    return env


def submit_pipeline(cluster: Cluster, repo: Path, env: dict[str, str], out: Path, cwd: Path) -> dict[str, str]:
    """`sbatch <repo>/slurm/train_phi4.sh`; waits for the orchestrator and returns the stage
    job ids it printed ("complete" for skipped stages) plus its own id under "pipeline"."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}-orchestrator-%j.out"
    job = cluster.sbatch(f"--output={log}", str(repo / ORCHESTRATOR), env=env, cwd=cwd)
    cluster.wait([job], timeout=300)
    text = Path(str(log).replace("%j", job)).read_text()
    record = cluster.job(job)
    assert record["JobState"] == "COMPLETED", text
    lines = [line for line in text.splitlines() if line.startswith("score=")]
    assert lines, text
    ids = dict(item.split("=", 1) for item in lines[-1].split())
    ids["pipeline"] = job
    return ids


def stage_jobs(ids: dict[str, str]) -> list[str]:
    return [ids[s] for s in ("score", "merge", "train", "export", "eval") if ids.get(s, "off") not in ("complete", "off")]


def read_pipeline(out: Path) -> dict[str, Any]:
    return json.loads((out / "pipeline.json").read_text())


def refresh_status(cluster: Cluster, repo: Path, env: dict[str, str], cwd: Path) -> dict[str, Any]:
    result = subprocess.run(["bash", str(repo / ORCHESTRATOR), "--status"], env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def marker_time(out: Path, unit: str, kind: str) -> float:
    text = (out / "status" / f"{unit}.{kind}").read_text()
    return float(text.split("time=")[1].split()[0])


def assert_stage_order(cluster: Cluster, out: Path, ids: dict[str, str], n_tasks: int) -> None:
    """Every stage started after everything before it had finished: by the stages' own
    markers (sub-second) and by Slurm's start/end times (whole seconds) of the jobs in ``ids``."""
    score_end = max(marker_time(out, f"score.{i}", "complete") for i in range(n_tasks))
    units = [f"score.{i}" for i in range(n_tasks)] + ["merge", "train", "export"]
    origin = min(marker_time(out, u, "started") for u in units)
    # The stage timeline (seconds from the first start), shown with `pytest -s`.
    for unit in units:
        start, end = marker_time(out, unit, "started") - origin, marker_time(out, unit, "complete") - origin
        print(f"timeline {unit:8s} {start:7.1f}s -> {end:7.1f}s")
    assert score_end <= marker_time(out, "merge", "started")
    assert marker_time(out, "merge", "complete") <= marker_time(out, "train", "started")
    assert marker_time(out, "train", "complete") <= marker_time(out, "export", "started")
    stages = [cluster.jobs(ids["score"])] + [[cluster.job(ids[s])] for s in ("merge", "train", "export")]
    for before, after in itertools.pairwise(stages):
        assert all(r["JobState"] == "COMPLETED" for r in before + after), before + after
        assert max(slurm_time(r["EndTime"]) for r in before) <= min(slurm_time(r["StartTime"]) for r in after)
    if ids.get("eval", "off").isdigit():  # the evaluation stage, after the export
        start, end = marker_time(out, "eval", "started") - origin, marker_time(out, "eval", "complete") - origin
        print(f"timeline {'eval':8s} {start:7.1f}s -> {end:7.1f}s")
        assert marker_time(out, "export", "complete") <= marker_time(out, "eval", "started")
        record = cluster.job(ids["eval"])
        assert record["JobState"] == "COMPLETED", record
        assert slurm_time(stages[-1][0]["EndTime"]) <= slurm_time(record["StartTime"])


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- models list


def _models_list(*args: str, cwd: Path | None = None) -> list[list[str]]:
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "models_list.py"), *args], capture_output=True, text=True, cwd=cwd, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "#index\tname\tpath\tbackend\ttp\tpp\toverrides"
    return [line.split("\t") for line in lines[1:]]


def test_models_list_paper_sources() -> None:
    rows = _models_list("--sources", str(REPO / "configs/sources/phi4_paper.yaml"), "--models-dir", "/m")
    assert [r[1] for r in rows] == [
        "pivot", "qwen2.5-14b-instruct", "mistral-small-24b-instruct-2501", "gemma-3-12b-it",
        "qwen2.5-coder-14b-instruct", "qwen2.5-math-7b-instruct",
    ]
    assert rows[0][2] == "/m/phi-4" and rows[2][2] == "/m/Mistral-Small-24B-Instruct-2501"
    assert [r[3] for r in rows] == ["megatron", "megatron", "megatron", "hf", "megatron", "megatron"]
    assert [r[0] for r in rows] == [str(i) for i in range(6)]
    assert rows[2][4] == "2"  # Mistral-Small scored at TP=2


def test_models_list_comma_separated(tmp_path: Path) -> None:
    (tmp_path / "gemma").mkdir()
    (tmp_path / "gemma" / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    rows = _models_list("--pivot", "p:megatron:2", "--sources", "qwen,gemma,/abs/qwen:hf", cwd=tmp_path)
    assert rows == [
        ["0", "pivot", str(tmp_path / "p"), "megatron", "2", "1", ""],
        ["1", "qwen", str(tmp_path / "qwen"), "megatron", "1", "1", ""],
        ["2", "gemma", str(tmp_path / "gemma"), "hf", "1", "1", ""],
        ["3", "qwen-2", "/abs/qwen", "hf", "1", "1", ""],
    ]


def test_models_list_tiny_sources() -> None:
    rows = _models_list("--sources", str(REPO / "configs/sources/tiny.yaml"), "--models-dir", "/tiny")
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("pivot", "/tiny/tiny-phi3", "megatron"), ("qwen2", "/tiny/tiny-qwen2", "megatron"),
        ("llama", "/tiny/tiny-llama", "megatron"), ("mistral", "/tiny/tiny-mistral", "hf"),
    ]
    assert rows[3][6] == "tokenizer.chat_template=plain"


# ----------------------------------------------------------------------------- common.sh helpers


def _bash(script: str, **env: str) -> str:
    """Run ``script`` with slurm/common.sh sourced; returns stdout."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("INFIFPO_", "SLURM_"))}
    full_env.update(env)
    result = subprocess.run(["bash", "-c", f"set -euo pipefail; source {REPO}/slurm/common.sh; {script}"],
                            capture_output=True, text=True, env=full_env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("value", ["/plain/path", "with space", "a=b,c", "[x]", "it's", "C:\\dir", "end\\", "q\\'", "{a: 1}"])
def test_hydra_quoting_round_trips_through_hydra(value: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    kv = _bash('infifpo_hydra_kv model.path "$V"', V=value)
    assert parser.parse_override(kv).value() == value
    listed = _bash('printf "source_dirs=%s" "$(infifpo_hydra_list "$V" plain "$V")"', V=value)
    assert parser.parse_override(listed).value() == [value, "plain", value]


def test_shell_helpers() -> None:
    out = _bash(
        """
        infifpo_split_words words "a=1  'b=two words' c"; printf '<%s>' "${words[@]}"; echo
        infifpo_dependency_flags deps "" 12 "" 13; printf '<%s>' "${deps[@]}"; echo
        infifpo_dependency_flags none ""; echo "${#none[@]}"
        INFIFPO_REPO=/r INFIFPO_CONTAINER_IMAGE=nvcr.io#nvidia/nemo:25.04 INFIFPO_CONTAINER_MOUNTS=/lustre:/lustre
        infifpo_load_settings >/dev/null
        infifpo_container_flags c; printf '<%s>' "${c[@]}"; echo
        INFIFPO_ACCOUNT=acct INFIFPO_PARTITION=gpu INFIFPO_SBATCH_ARGS="--qos=high" INFIFPO_TRAIN_SBATCH_ARGS="--exclusive"
        infifpo_common_sbatch_flags f INFIFPO_TRAIN_SBATCH_ARGS; printf '<%s>' "${f[@]}"; echo
        printf '%s\n' "$(infifpo_json_str "$(printf 'a"b\\c\td')")"
        """,
        INFIFPO_OUT="/tmp/x",
    )
    lines = out.splitlines()
    assert lines[0] == "<a=1><b=two words><c>"
    assert lines[1] == "<--dependency=afterok:12:13><--kill-on-invalid-dep=yes>"
    assert lines[2] == "0"
    assert lines[3] == "<--container-image=nvcr.io#nvidia/nemo:25.04><--container-mounts=/lustre:/lustre><--container-workdir=/r>"
    assert lines[4] == "<--account=acct><--partition=gpu><--qos=high><--exclusive>"
    assert json.loads(lines[5]) == 'a"b\\c\td'


def test_array_spec_and_dry_run(tmp_path: Path) -> None:
    """The GPU submission flags, without a GPU cluster: INFIFPO_DRY_RUN prints the commands."""
    models = tmp_path / "models"
    for name in ("phi-4", "Qwen2.5-14B-Instruct", "Mistral-Small-24B-Instruct-2501", "gemma-3-12b-it",
                 "Qwen2.5-Coder-14B-Instruct", "Qwen2.5-Math-7B-Instruct"):
        (models / name).mkdir(parents=True)
    (tmp_path / "pairs.jsonl").write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFIFPO_", "SLURM_JOB", "SLURM_ARRAY"))}
    env.update(INFIFPO_DRY_RUN="1", INFIFPO_DATA=str(tmp_path / "pairs.jsonl"), INFIFPO_MODELS_DIR=str(models),
               INFIFPO_OUT=str(tmp_path / "out"), INFIFPO_PYTHON=sys.executable, INFIFPO_SCORE_PARALLEL="3",
               INFIFPO_EXPORT_SBATCH_ARGS="--mem=200G")
    result = subprocess.run(["bash", str(REPO / ORCHESTRATOR)], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "score=dry-score merge=dry-merge train=dry-train export=dry-export eval=dry-evaluate"
    commands = {line.split()[-1].split("/")[-1]: line for line in result.stderr.splitlines() if line.startswith("dry run: sbatch")}
    score, merge, train, export = (commands[f"{s}.sbatch"] for s in ("score", "merge", "train", "export"))
    assert "--array=0-5%3" in score and "--ntasks=8" in score and "--gpus-per-node=8" in score
    assert "--dependency=afterok:dry-score" in merge and "--kill-on-invalid-dep=yes" in merge
    for flag in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300", "--dependency=afterok:dry-merge"):
        assert flag in train, train
    assert "--mem=200G" in export and "--dependency=afterok:dry-train" in export
    evaluate = commands["evaluate.sbatch"]  # one GPU (vLLM) after the export
    assert "--gpus-per-node=1" in evaluate and "--dependency=afterok:dry-export" in evaluate and "--mem=200G" not in evaluate
    assert not (tmp_path / "out" / "pipeline.json").exists() and not list((tmp_path / "out" / "status").glob("*.job"))
    assert _bash("infifpo_array_spec 0 1 2 5 7 8; echo; infifpo_array_spec 3; echo") == "0-2,5,7-8\n3\n"


# ----------------------------------------------------------------------------- stand-in stages

STANDIN_COMMON = '''
"""Shared by the stand-in recipes: key=value parsing (Hydra quoting), rank, files."""
import ast, json, os
from pathlib import Path

def parse(argv):
    out = {}
    it = iter(argv)
    for a in it:
        if a in ("--config-name", "--config-dir"):
            out[a] = next(it)
        elif "=" in a:
            k, v = a.split("=", 1)
            out[k] = ast.literal_eval(v) if v[:1] in "'[" else v
    return out

def rank():
    return int(os.environ.get("SLURM_PROCID", "0")), int(os.environ.get("SLURM_NTASKS", "1"))

def append(path, record):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\\n")

def write(path, data):
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(data)); os.replace(tmp, path)
'''

STANDINS = {
    "score.py": '''
import sys, time
from pathlib import Path
from _standin import parse, rank, write
args = parse(sys.argv[1:])
model = Path(args["model.path"])
if not (model / "config.json").is_file():
    sys.exit(f"stand-in score: no config.json in {model}")
r, n = rank()
time.sleep(0.2)
if r == 0:
    write(Path(args["output_dir"]) / "scores.json", {"args": args, "ranks": n})
''',
    "merge_scores.py": '''
import sys
from pathlib import Path
from _standin import parse, write
args = parse(sys.argv[1:])
for d in [args["pivot_dir"], *args["source_dirs"]]:
    if not (Path(d) / "scores.json").is_file():
        sys.exit(f"stand-in merge: no scores in {d}")
write(Path(args["output_path"]), {"args": args})
''',
    # A "model" w updated once per step; SIGUSR1/SIGTERM: finish the step, save, exit 0.
    "train_infifpo.py": '''
import json, os, signal, sys, time
from pathlib import Path
from _standin import append, parse, rank, write
args = parse(sys.argv[1:])
r, n = rank()
out = Path(args["output_dir"]); ckpts = out / "checkpoints"
stop = []
signal.signal(signal.SIGUSR1, lambda s, f: stop.append("USR1"))
signal.signal(signal.SIGTERM, lambda s, f: stop.append("TERM"))
steps = int(args.get("trainer.max_steps", 5))
delay = float(args.get("+standin.step_seconds", 0.1))
if not Path(args["data.path"]).is_file():
    sys.exit("stand-in train: no data")
step, w = 0, 1.0
if (ckpts / "latest").is_file():
    state = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "state.json").read_text())
    step, w = state["step"], state["w"]
if r == 0:
    append(out / "launch.jsonl", {
        "ranks": n, "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")],
        "job": os.environ.get("SLURM_JOB_ID"), "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
        "config": args.get("--config-name"), "model": args["model.path"], "resume_step": step})
while step < steps:
    time.sleep(delay)
    step += 1
    w = w * 0.9 + step
    if r == 0:
        append(out / "metrics.jsonl", {"step": step})
    if stop:
        break
if stop:
    time.sleep(float(args.get("+standin.save_seconds", 0)))
if r == 0:
    name = f"step_{step:07d}"
    write(ckpts / name / "state.json", {"step": step, "w": w})
    (ckpts / ".latest").write_text(name); os.replace(ckpts / ".latest", ckpts / "latest")
    if stop:
        append(out / "signals.jsonl", {"signal": stop[0], "step": step})
''',
    "export_hf.py": '''
import json, sys
from pathlib import Path
from _standin import parse, write
args = parse(sys.argv[1:])
assert args.get("overwrite") == "true", args
state = json.loads((Path(args["checkpoint_path"]) / "state.json").read_text())
write(Path(args["output_path"]) / "config.json", {"standin": True})
write(Path(args["output_path"]) / "weights.json", {"state": state, "checkpoint": args["checkpoint_path"]})
''',
    "import_hf.py": "raise SystemExit('not used by the pipeline')\n",
    # models=[{name: 'a', path: '/x'}, ...] is Hydra syntax, not a Python literal: parsed here.
    "evaluate.py": '''
import re, sys
from pathlib import Path
from _standin import write
models = next(a for a in sys.argv[1:] if a.startswith("models="))
args = dict(a.split("=", 1) for a in sys.argv[1:] if not a.startswith("models="))
out = Path(args["output_dir"].strip("'"))
names = []
for name, path in re.findall(r"name: '([^']*)', path: '([^']*)'", models):
    if not (Path(path) / "config.json").is_file():
        sys.exit(f"stand-in evaluate: no config.json in {path}")
    write(out / name / "results.json", {"path": path, "args": args})
    names.append(name)
write(out / "summary.json", {"models": names})
(out / "summary.md").write_text("| " + " | ".join(names) + " |\\n")
''',
}


def standin_weights(steps: int) -> float:
    w = 1.0
    for step in range(1, steps + 1):
        w = w * 0.9 + step
    return w


@pytest.fixture(scope="module")
def standin_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of slurm/ (the scripts under test) beside stand-in recipes."""
    root = tmp_path_factory.mktemp("standin")
    repo = root / "repo"
    shutil.copytree(REPO / "slurm", repo / "slurm")
    (repo / "recipes").mkdir()
    (repo / "recipes" / "_standin.py").write_text(STANDIN_COMMON)
    for name, body in STANDINS.items():
        (repo / "recipes" / name).write_text(textwrap.dedent(body))
    for model in ("pivot-model", "src-a", "src-b", "src-c"):
        (root / "models" / model).mkdir(parents=True)
        (root / "models" / model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    (root / "data.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    return repo


def standin_env(cluster: Cluster, repo: Path, out: Path, sources: str, **extra: str) -> dict[str, str]:
    root = repo.parent
    settings = dict(
        INFIFPO_DATA=str(root / "data.jsonl"),
        INFIFPO_PIVOT=str(root / "models" / "pivot-model"),
        INFIFPO_SOURCES=sources,
        INFIFPO_OUT=str(out),
        INFIFPO_CONFIG="infifpo_tiny",
        INFIFPO_NODES="1",
        INFIFPO_GPUS_PER_NODE="0",
        INFIFPO_TASKS_PER_NODE="2",
        INFIFPO_PYTHON=sys.executable,
        INFIFPO_OVERRIDES="trainer.max_steps=5",
    )
    settings.update(extra)
    return pipeline_env(cluster, **settings)


@pytest.mark.slow
def test_standin_pipeline_runs_every_stage_in_order(slurm_cluster: Cluster, standin_repo: Path) -> None:
    root = standin_repo.parent
    out = root / "run-order"
    sources = f"{root}/models/src-a,{root}/models/src-b"
    env = standin_env(slurm_cluster, standin_repo, out, sources)
    # Submitted from another directory: the scripts find the repo through sbatch's path.
    ids = submit_pipeline(slurm_cluster, standin_repo, env, out, cwd=root)
    assert all(ids[s].isdigit() for s in ("score", "merge", "train", "export")), ids
    slurm_cluster.wait(stage_jobs(ids), timeout=300)

    pipeline = read_pipeline(out)
    assert pipeline["pipeline_job_id"] == ids["pipeline"]
    assert [m["name"] for m in pipeline["models"]] == ["pivot", "src-a", "src-b"]
    assert pipeline["stages"]["score"]["state"] == "complete"
    assert {k: v["job_id"] for k, v in pipeline["stages"]["score"]["tasks"].items()} == {str(i): f"{ids['score']}_{i}" for i in range(3)}
    for stage in ("merge", "train", "export"):
        assert pipeline["stages"][stage] == {"job_id": ids[stage], "state": "complete", "slurm_state": ""}
    assert pipeline["settings"]["INFIFPO_CONFIG"] == "infifpo_tiny"
    assert_stage_order(slurm_cluster, out, ids, 3)

    # What each stage was given.
    for i, name in enumerate(["pivot-model", "src-a", "src-b"]):
        score = json.loads((out / "scores" / ["pivot", "src-a", "src-b"][i] / "scores.json").read_text())
        assert score["args"]["model.path"] == str(root / "models" / name)
        assert score["args"]["model.backend"] == "megatron" and score["args"]["dtype"] == "float32"
        assert score["ranks"] == 1
    merged = json.loads((out / "merge" / "train.scored.parquet").read_text())
    assert merged["args"]["source_names"] == ["src-a", "src-b"]
    assert merged["args"]["source_dirs"] == [str(out / "scores" / "src-a"), str(out / "scores" / "src-b")]
    (launch,) = jsonl(out / "train" / "launch.jsonl")
    assert launch["ranks"] == 2 and launch["config"] == "infifpo_tiny"
    assert launch["master"] == [HOST, str(15000 + int(ids["train"]) % 15000)]
    exported = json.loads((out / "hf" / "weights.json").read_text())
    assert exported["checkpoint"] == str(out / "train" / "checkpoints" / "step_0000005")
    assert exported["state"]["w"] == pytest.approx(standin_weights(5))
    # Evaluation: the initial pivot and the fused model, the table's path in pipeline.json.
    summary_path = str(out / "eval" / "summary.md")
    assert pipeline["stages"]["eval"] == {"job_id": ids["eval"], "state": "complete", "slurm_state": "", "summary": summary_path}
    assert json.loads((out / "eval" / "summary.json").read_text())["models"] == ["pivot", "fused"]
    assert json.loads((out / "eval" / "pivot" / "results.json").read_text())["path"] == str(root / "models" / "pivot-model")
    evaluated = json.loads((out / "eval" / "fused" / "results.json").read_text())
    assert evaluated["path"] == str(out / "hf") and evaluated["args"]["backend"] == "hf"
    status = subprocess.run(["bash", str(standin_repo / ORCHESTRATOR), "--status"], env=env, cwd=root,
                            capture_output=True, text=True, timeout=120, check=True)
    assert f"evaluation summary: {summary_path}" in status.stderr

    # A rerun finds everything complete and submits nothing.
    again = submit_pipeline(slurm_cluster, standin_repo, env, out, cwd=root)
    assert [again[s] for s in ("score", "merge", "train", "export", "eval")] == ["complete"] * 5
    assert read_pipeline(out)["stages"]["train"]["job_id"] == ids["train"]


@pytest.mark.slow
def test_standin_failed_scoring_task_stops_the_pipeline_and_rerun_completes_it(slurm_cluster: Cluster, standin_repo: Path) -> None:
    root = standin_repo.parent
    out = root / "run-failure"
    broken = root / "models" / "src-broken"
    broken.mkdir()
    sources = f"{root}/models/src-a,{broken},{root}/models/src-b"
    env = standin_env(slurm_cluster, standin_repo, out, sources)
    ids = submit_pipeline(slurm_cluster, standin_repo, env, out, cwd=root)
    slurm_cluster.wait(stage_jobs(ids), timeout=300)

    tasks = {r["ArrayTaskId"]: r["JobState"] for r in slurm_cluster.jobs(ids["score"])}
    assert tasks == {"0": "COMPLETED", "1": "COMPLETED", "2": "FAILED", "3": "COMPLETED"}
    for stage in ("merge", "train", "export"):
        record = slurm_cluster.job(ids[stage])
        assert (record["JobState"], record["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), record
        assert not (out / "status" / f"{stage}.started").exists(), f"{stage} must never run"
    assert not (out / "merge").exists() and not (out / "train").exists() and not (out / "hf").exists()
    status = refresh_status(slurm_cluster, standin_repo, env, cwd=root)
    assert status["stages"]["score"]["tasks"]["2"]["state"] == "failed"
    assert status["stages"]["score"]["state"] == "failed"
    assert [status["stages"][s]["state"] for s in ("merge", "train", "export")] == ["cancelled"] * 3

    # Fix the model, rerun: only task 2 is scored again, then the rest of the pipeline.
    (broken / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    rerun = submit_pipeline(slurm_cluster, standin_repo, env, out, cwd=root)
    assert all(rerun[s].isdigit() for s in ("score", "merge", "train", "export")), rerun
    slurm_cluster.wait(stage_jobs(rerun), timeout=300)
    assert [r["ArrayTaskId"] for r in slurm_cluster.jobs(rerun["score"])] == ["2"]
    pipeline = read_pipeline(out)
    jobs = {k: v["job_id"] for k, v in pipeline["stages"]["score"]["tasks"].items()}
    assert jobs == {"0": f"{ids['score']}_0", "1": f"{ids['score']}_1", "2": f"{rerun['score']}_2", "3": f"{ids['score']}_3"}
    assert pipeline["stages"]["score"]["state"] == "complete"
    assert all(pipeline["stages"][s]["state"] == "complete" for s in ("merge", "train", "export"))
    assert_stage_order(slurm_cluster, out, rerun, 4)


@pytest.mark.slow
def test_standin_preemption_requeues_and_resumes(slurm_cluster: Cluster, standin_repo: Path) -> None:
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends before the time limit), then
    an external `scontrol requeue` (SIGTERM to the job): both times training saves, the job
    comes back and resumes, and the result equals an uninterrupted run's."""
    root = standin_repo.parent
    out = root / "run-preempt"
    steps = 40
    env = standin_env(
        slurm_cluster, standin_repo, out, f"{root}/models/src-a",
        INFIFPO_OVERRIDES=f"trainer.max_steps={steps} +standin.step_seconds=0.25 +standin.save_seconds=1",
    )
    ids = submit_pipeline(slurm_cluster, standin_repo, env, out, cwd=root)
    train = ids["train"]
    metrics = out / "train" / "metrics.jsonl"
    wait_for(lambda: len(jsonl(metrics)) >= 3, 240, "training to make progress")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", train)
    wait_for(lambda: len(jsonl(out / "train" / "launch.jsonl")) >= 2 and len(jsonl(metrics)) >= len(jsonl(out / "train" / "signals.jsonl")) and
             len(jsonl(metrics)) >= jsonl(out / "train" / "launch.jsonl")[-1]["resume_step"] + 3, 240, "training to come back")
    assert int(slurm_cluster.job(train)["Restarts"]) == 1
    assert slurm_cluster.job(ids["export"])["JobState"] == "PENDING", "export must wait through the requeue"
    slurm_cluster.run("scontrol", "requeue", train)
    slurm_cluster.wait(stage_jobs(ids), timeout=300)

    record = slurm_cluster.job(train)
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) == 2, record
    signals = jsonl(out / "train" / "signals.jsonl")
    assert [s["signal"] for s in signals] == ["USR1", "TERM"]
    launches = jsonl(out / "train" / "launch.jsonl")
    assert [launch["restart"] for launch in launches] == [0, 1, 2]
    assert [launch["resume_step"] for launch in launches] == [0, signals[0]["step"], signals[1]["step"]]
    assert 0 < signals[0]["step"] < signals[1]["step"] < steps
    # Every step exactly once: saved where it stopped, resumed from there.
    assert [m["step"] for m in jsonl(metrics)] == list(range(1, steps + 1))
    exported = json.loads((out / "hf" / "weights.json").read_text())
    assert exported["state"] == {"step": steps, "w": pytest.approx(standin_weights(steps))}
    assert slurm_time(record["EndTime"]) <= slurm_time(slurm_cluster.job(ids["export"])["StartTime"])
    assert read_pipeline(out)["stages"]["train"]["state"] == "complete"


# ----------------------------------------------------------------------------- real stages

RECIPES = ("score.py", "merge_scores.py", "train_infifpo.py", "export_hf.py")
TINY_CONFIG = "infifpo_tiny"
# 48 rows, 4 pairs per step: 12 steps per epoch; several epochs leave the pre-emption test
# time to signal training mid-run.
TRAIN_STEPS = 24
# tiny.yaml: pivot tiny-phi3, sources tiny-qwen2, tiny-llama (megatron), tiny-mistral (hf).
TINY_MODELS = {"tiny-phi3": ("phi3", 1), "tiny-qwen2": ("qwen2", 2), "tiny-llama": ("llama", 3), "tiny-mistral": ("mistral", 4)}


def require_stages() -> None:
    missing = [f"recipes/{r}" for r in RECIPES if not (REPO / "recipes" / r).is_file()]
    if not (REPO / "configs" / f"{TINY_CONFIG}.yaml").is_file():
        missing.append(f"configs/{TINY_CONFIG}.yaml")
    if missing:
        pytest.skip(f"pipeline stages not written yet: {', '.join(missing)}")


def tiny_rows() -> list[dict[str, Any]]:
    sys.path.insert(0, str(REPO / "tests"))
    from workers.train_common import ROWS

    rows = []
    for k in range(4):  # 48 short rows
        for row in ROWS:
            prompt = row["prompt"] if isinstance(row["prompt"], list) else f"{row['prompt']}" + (f" ({k})" if k else "")
            rows.append({**row, "id": f"{row['id']}-{k}", "prompt": prompt})
    return rows


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_stages()
    from nemo_infifpo.testing.models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny_pipeline")
    for name, (family, seed) in TINY_MODELS.items():
        save_tiny_hf_model(family, root / "models" / name, seed=seed)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tiny_rows()))
    return root


def tiny_env(cluster: Cluster, root: Path, out: Path, **extra: str) -> dict[str, str]:
    settings = dict(
        INFIFPO_DATA=str(root / "data.jsonl"),
        INFIFPO_SOURCES=str(REPO / "configs" / "sources" / "tiny.yaml"),
        INFIFPO_MODELS_DIR=str(root / "models"),
        INFIFPO_OUT=str(out),
        INFIFPO_CONFIG=TINY_CONFIG,
        INFIFPO_NODES="1",
        INFIFPO_GPUS_PER_NODE="0",
        INFIFPO_TASKS_PER_NODE="2",
        INFIFPO_SCORE_PARALLEL="2",  # a 2-core CI machine: two scoring jobs at a time
        INFIFPO_PYTHON=sys.executable,
        INFIFPO_OVERRIDES=f"trainer.max_steps={TRAIN_STEPS} trainer.max_epochs=4",
        OMP_NUM_THREADS="1",
        INFIFPO_EVAL="0",  # evaluated once, in tiny_run
    )
    settings.update(extra)
    return pipeline_env(cluster, **settings)


@pytest.fixture(scope="module")
def tiny_eval_tasks(tiny_assets: Path) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """Local lm-eval tasks for the evaluation stage: the echo targets are the initial pivot's
    own greedy answers, the choices those of tests/local_eval_tasks.py."""
    pivot = local_eval_tasks.Reference(tiny_assets / "models" / "tiny-phi3")
    echo_rows = [{"prompt": p, "answer": pivot.greedy(p)} for p in local_eval_tasks.PROMPTS]
    choice_rows = local_eval_tasks.choice_rows()
    directory = local_eval_tasks.write_tasks(tiny_assets / "eval_tasks", echo_rows, choice_rows)
    return directory, echo_rows, choice_rows


COMPARE_WORKER = '''
"""Exported HF checkpoint vs the megatron weights of the last training checkpoint."""
import json, sys
import torch

def main():
    from transformers import AutoModelForCausalLM
    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed
    from nemo_infifpo.models.checkpoint import current_shard_context, load_megatron_model
    from nemo_infifpo.models.mapping import iter_hf_tensors
    from nemo_infifpo.models.registry import weight_rules_for
    from nemo_infifpo.training.checkpoint import find_latest_checkpoint

    train_dir, hf_dir, initial_dir = sys.argv[1:4]
    init_distributed(1, 1)
    checkpoint = find_latest_checkpoint(train_dir)
    loaded = load_megatron_model(checkpoint, params_dtype=torch.float32)
    ctx = current_shard_context(loaded.arch, loaded.padded_vocab_size)
    megatron = {k: v.detach().float() for k, v in iter_hf_tensors(loaded.model, weight_rules_for(loaded.arch), ctx)}
    destroy_distributed()
    exported = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    initial = AutoModelForCausalLM.from_pretrained(initial_dir, dtype=torch.float32).state_dict()
    diffs = {k: float((exported[k].float() - v).abs().max()) for k, v in megatron.items()}
    changed = {k: float((exported[k].float() - initial[k].float()).abs().max()) for k in megatron}
    print(json.dumps({"checkpoint": str(checkpoint), "names": sorted(megatron), "exported_names": sorted(exported),
                      "max_diff": diffs, "changed": changed}))

if __name__ == "__main__":
    main()
'''


def compare_export(root: Path, out: Path) -> dict[str, Any]:
    worker = root / "compare_export.py"
    worker.write_text(COMPARE_WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, str(worker), str(out / "train"), str(out / "hf"), str(root / "models" / "tiny-phi3")],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def hf_state(path: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).state_dict()


def copy_scoring(src: Path, dst: Path, *, merge: bool) -> None:
    """Reuse another run's scoring (and merge) results: outputs plus completion markers."""
    (dst / "status").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src / "scores", dst / "scores", dirs_exist_ok=True)
    for marker in (src / "status").glob("score.*.complete"):
        shutil.copy2(marker, dst / "status" / marker.name)
    if merge:
        shutil.copytree(src / "merge", dst / "merge")
        shutil.copy2(src / "status" / "merge.complete", dst / "status" / "merge.complete")


@pytest.fixture(scope="module")
def tiny_run(slurm_cluster: Cluster, tiny_assets: Path, tiny_eval_tasks: tuple) -> tuple[Path, dict[str, str]]:
    """One uninterrupted pipeline on the tiny models, evaluation included (shared by the tests below)."""
    out = tiny_assets / "run"
    tasks = f"{local_eval_tasks.GENERATE_TASK},{local_eval_tasks.CHOICE_TASK}"
    env = tiny_env(slurm_cluster, tiny_assets, out, INFIFPO_EVAL="1", INFIFPO_EVAL_TASKS=tasks,
                   INFIFPO_EVAL_INCLUDE_PATH=str(tiny_eval_tasks[0]), HF_DATASETS_OFFLINE="1")
    ids = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    slurm_cluster.wait(stage_jobs(ids), timeout=1800, poll=1.0)
    return out, ids


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(slurm_cluster: Cluster, tiny_assets: Path, tiny_run: tuple[Path, dict[str, str]], tiny_eval_tasks: tuple) -> None:
    out, ids = tiny_run
    pipeline = read_pipeline(out)
    states = {s: pipeline["stages"][s]["state"] for s in ("score", "merge", "train", "export")}
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((out / "logs").glob("*.out")))
    assert states == dict.fromkeys(states, "complete"), logs
    assert [m["name"] for m in pipeline["models"]] == ["pivot", "qwen2", "llama", "mistral"]
    assert [m["backend"] for m in pipeline["models"]] == ["megatron", "megatron", "megatron", "hf"]
    assert_stage_order(slurm_cluster, out, ids, 4)

    from nemo_infifpo.data.scored_set import read_scored_set

    scored = read_scored_set(out / "merge" / "train.scored.parquet")
    assert list(scored.source_names) == ["qwen2", "llama", "mistral"]
    metrics = jsonl(out / "train" / "metrics.jsonl")
    assert metrics and max(int(m.get("step", 0)) for m in metrics) == TRAIN_STEPS

    # The export loads with plain transformers and holds exactly the trained weights.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "hf"))
    assert model.config.architectures == ["Phi3ForCausalLM"]
    report = compare_export(tiny_assets, out)
    assert report["names"], report
    assert max(report["max_diff"].values()) <= 1e-6, report["max_diff"]
    assert max(report["changed"].values()) > 0, "training did not change the pivot"

    # Evaluation (CPU, lm-eval's hf back end, local tasks): the initial pivot and the fused
    # model, every number equal to a plain transformers computation on the same checkpoints.
    assert pipeline["stages"]["eval"]["state"] == "complete", logs
    assert pipeline["stages"]["eval"]["summary"] == str(out / "eval" / "summary.md")
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["models"] == ["pivot", "fused"]
    _, echo_rows, choice_rows = tiny_eval_tasks
    for name, path in (("pivot", tiny_assets / "models" / "tiny-phi3"), ("fused", out / "hf")):
        expected = local_eval_tasks.expected_metrics(local_eval_tasks.Reference(path), echo_rows, choice_rows)
        results = json.loads((out / "eval" / name / "results.json").read_text())["results"]
        assert results[local_eval_tasks.GENERATE_TASK]["exact_match,none"] == pytest.approx(expected["exact_match"]), name
        assert results[local_eval_tasks.CHOICE_TASK]["acc,none"] == pytest.approx(expected["acc"]), name
        assert results[local_eval_tasks.CHOICE_TASK]["acc_norm,none"] == pytest.approx(expected["acc_norm"]), name
    echo = next(r for r in summary["rows"] if r["task"] == local_eval_tasks.GENERATE_TASK)
    assert echo["values"]["pivot"] == 1.0  # the echo targets are the pivot's own answers
    assert "| **average** (2 tasks) |" in (out / "eval" / "summary.md").read_text()


@pytest.mark.slow
def test_tiny_failed_scoring_task_and_rerun(slurm_cluster: Cluster, tiny_assets: Path, tiny_run: tuple[Path, dict[str, str]]) -> None:
    """A source that cannot be loaded: its scoring task fails, merge/train/export never run;
    once the model is there, a rerun scores only that source and finishes the pipeline."""
    first, _ = tiny_run
    out = tiny_assets / "run-failure"
    broken = tiny_assets / "models" / "broken"
    broken.mkdir(exist_ok=True)
    # pivot and qwen2 under the same names and inputs as in the first run: their scores are
    # reused (copied with their completion markers); only "broken" is new.
    sources = tiny_assets / "sources-broken.yaml"
    sources.write_text(json.dumps({
        "models_dir": str(tiny_assets / "models"),
        "pivot": {"path": "tiny-phi3", "backend": "megatron"},
        "sources": [{"name": "qwen2", "path": "tiny-qwen2", "backend": "megatron"},
                    {"name": "broken", "path": "broken", "backend": "megatron"}],
    }))
    copy_scoring(first, out, merge=False)
    env = tiny_env(slurm_cluster, tiny_assets, out, INFIFPO_SOURCES=str(sources))
    ids = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    slurm_cluster.wait(stage_jobs(ids), timeout=1800, poll=1.0)
    # Only the broken source was submitted (the others are complete), and it failed.
    assert [(r["ArrayTaskId"], r["JobState"]) for r in slurm_cluster.jobs(ids["score"])] == [("2", "FAILED")]
    for stage in ("merge", "train", "export"):
        record = slurm_cluster.job(ids[stage])
        assert (record["JobState"], record["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), record
        assert not (out / "status" / f"{stage}.started").exists()

    from nemo_infifpo.testing.models import save_tiny_hf_model

    save_tiny_hf_model("llama", broken, seed=5)
    rerun = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    slurm_cluster.wait(stage_jobs(rerun), timeout=1800, poll=1.0)
    assert [r["ArrayTaskId"] for r in slurm_cluster.jobs(rerun["score"])] == ["2"]
    pipeline = read_pipeline(out)
    assert all(pipeline["stages"][s]["state"] == "complete" for s in ("score", "merge", "train", "export")), pipeline["stages"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "hf"))


@pytest.mark.slow
def test_tiny_preemption_resumes_to_the_same_weights(slurm_cluster: Cluster, tiny_assets: Path, tiny_run: tuple[Path, dict[str, str]]) -> None:
    """Scoring and merge reused from the uninterrupted run (so only train and export are
    submitted); SIGUSR1 to the training batch shell mid-run: it checkpoints, is requeued,
    resumes, and the exported weights equal the uninterrupted run's."""
    first, _ = tiny_run
    out = tiny_assets / "run-preempt"
    copy_scoring(first, out, merge=True)
    env = tiny_env(slurm_cluster, tiny_assets, out)
    ids = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    assert (ids["score"], ids["merge"]) == ("complete", "complete"), ids
    train = ids["train"]
    metrics = out / "train" / "metrics.jsonl"
    wait_for(lambda: len(jsonl(metrics)) >= 1 or not slurm_cluster.active([train]), 900, "the first training step", poll=0.5)
    if len(jsonl(metrics)) >= TRAIN_STEPS or not slurm_cluster.active([train]):
        pytest.fail(f"training finished before it could be signalled; raise TRAIN_STEPS ({TRAIN_STEPS})")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", train)
    slurm_cluster.wait(stage_jobs(ids), timeout=1800, poll=1.0)

    record = slurm_cluster.job(train)
    log = (out / "logs" / f"train-{train}.out").read_text()
    assert record["JobState"] == "COMPLETED" and int(record["Restarts"]) >= 1, log
    assert "requeued to resume" in log, log
    steps = [int(m["step"]) for m in jsonl(metrics) if "step" in m]
    assert max(steps) == TRAIN_STEPS
    export_logs = "\n".join(p.read_text()[-3000:] for p in (out / "logs").glob("export-*.out"))
    assert read_pipeline(out)["stages"]["export"]["state"] == "complete", export_logs

    import torch

    resumed, uninterrupted = hf_state(out / "hf"), hf_state(first / "hf")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- start from prompts


def _generation_list(*args: str) -> list[list[str]]:
    result = subprocess.run([sys.executable, str(REPO / "slurm" / "generation_list.py"), *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


def test_generation_list_paper_settings() -> None:
    rows = _generation_list("--sources", str(REPO / "configs/sources/phi4_paper.yaml"), "--models-dir", "/m")
    assert rows[0] == ["#index", "name", "path", "backend", "tp", "samples", "temperature", "top_p", "max_new_tokens", "seed", "overrides"]
    models = _models_list("--sources", str(REPO / "configs/sources/phi4_paper.yaml"), "--models-dir", "/m")
    assert [(r[1], r[2]) for r in rows[1:]] == [(m[1], m[2]) for m in models]  # the same names and paths
    # The paper: 8 samples from the pivot, 4 from each source, temperature 0.8.
    assert [int(r[5]) for r in rows[1:]] == [8, 4, 4, 4, 4, 4]
    assert {r[6] for r in rows[1:]} == {"0.8"} and {r[3] for r in rows[1:]} == {"vllm"}
    assert rows[3][4] == "2"  # Mistral-Small generates at TP=2
    assert rows[6][10] == "data.max_prompt_length=1024"  # Qwen2.5-Math: 4k positions
    judge = _generation_list("--sources", str(REPO / "configs/sources/phi4_paper.yaml"), "--models-dir", "/m", "--judge")
    assert judge == [["reward_model", "/m/Skywork-Reward-Llama-3.1-8B-v0.2", "judge.max_length=8192"]]
    assert _generation_list("--sources", "a,b", "--pivot", "/p", "--backend", "hf")[1][3:6] == ["hf", "1", "8"]
    assert _generation_list("--sources", "a", "--judge", "function:pkg.mod:f") == [["function", "pkg.mod:f", ""]]


def test_prompts_start_dry_run_and_bad_settings(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("p", "s", "rm"):
        (models / name).mkdir(parents=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INFIFPO_", "SLURM_"))}
    env.update(INFIFPO_PROMPTS=str(prompts), INFIFPO_PIVOT=str(models / "p"), INFIFPO_SOURCES=str(models / "s"),
               INFIFPO_JUDGE=str(models / "rm"), INFIFPO_OUT=str(tmp_path / "out"), INFIFPO_DRY_RUN="1",
               INFIFPO_GENERATE_SHARDS="2", INFIFPO_JUDGE_SHARDS="3", INFIFPO_GPUS_PER_NODE="8", INFIFPO_PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / ORCHESTRATOR)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stderr.splitlines() if line.startswith("dry run: sbatch")]
    scripts = [line.split()[-1].rsplit("/", 1)[-1] for line in commands]
    assert scripts == ["generate.sbatch", "judge.sbatch", "pairs.sbatch", "train.sbatch", "export.sbatch",
                       "score.sbatch", "merge.sbatch", "train.sbatch", "export.sbatch", "evaluate.sbatch"]
    assert "--array=0-3" in commands[0] and "--array=0-2" in commands[1] and "--gpus-per-node=8" in commands[1]
    assert "--dependency=afterok:dry-export" in commands[5]  # scoring waits for p0, the exported SFT model
    assert "--output=" + str(tmp_path / "out" / "logs" / "sft-%j.out") in commands[3]
    tsv = (tmp_path / "out" / "models.tsv").read_text().splitlines()
    assert tsv[1].split("\t")[2] == str(tmp_path / "out" / "sft" / "hf")
    assert (tmp_path / "out" / "sft" / "models.tsv").read_text().splitlines()[1].split("\t")[2] == str(models / "p")
    # The evaluation compares the pivot as given, p0 (the SFT model) and the fused model.
    settings = {k: v for k, v in env.items() if k.startswith("INFIFPO_") and k != "INFIFPO_DRY_RUN"}
    listed = _bash("INFIFPO_REPO=" + str(REPO) + "; infifpo_load_settings; infifpo_prompt_eval_default; infifpo_eval_models", **settings)
    assert listed.splitlines() == [f"pivot\t{models / 'p'}", f"sft\t{tmp_path / 'out' / 'sft' / 'hf'}",
                                   f"fused\t{tmp_path / 'out' / 'hf'}"]
    both = subprocess.run(["bash", str(REPO / ORCHESTRATOR)], env={**env, "INFIFPO_DATA": str(prompts)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert both.returncode == 1 and "INFIFPO_PROMPTS and INFIFPO_DATA are alternatives" in both.stderr
    missing = subprocess.run(["bash", str(REPO / ORCHESTRATOR)], env={**env, "INFIFPO_JUDGE": str(tmp_path / "nope")},
                             capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 1 and "judge: reward model" in missing.stderr


PROMPT_STAGES = ("generate", "judge", "pairs", "sft", "sft_export", "score", "merge", "train", "export")


@pytest.fixture(scope="module")
def prompt_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_stages()
    from nemo_infifpo.testing.models import save_tiny_hf_model
    from nemo_infifpo.testing.reward_models import save_tiny_reward_model

    root = tmp_path_factory.mktemp("prompts_pipeline")
    for name, (family, seed) in {"tiny-phi3": ("phi3", 1), "tiny-qwen2": ("qwen2", 2)}.items():
        save_tiny_hf_model(family, root / "models" / name, seed=seed)
    save_tiny_reward_model(root / "models" / "tiny-rm", family="qwen2", seed=4)
    # A source that cannot generate yet: config and tokenizer, no weights.
    broken = root / "models" / "tiny-llama"
    save_tiny_hf_model("llama", root / "scratch-llama", seed=3)
    broken.mkdir()
    for path in (root / "scratch-llama").iterdir():
        if "safetensors" not in path.name:
            shutil.copy2(path, broken / path.name)
    words = ["reverse", "sort", "add", "count"]
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"id": f"p{i:03d}", "prompt": f"Please {words[i % 4]} the digits {i * 7919 % 1000}"}) + "\n" for i in range(48)))
    (root / "sources.yaml").write_text(json.dumps({
        "models_dir": str(root / "models"),
        "generation": {"backend": "hf", "temperature": 0.8, "max_new_tokens": 12, "pivot_samples": 2, "source_samples": 2},
        "judge": {"type": "reward_model", "path": "tiny-rm"},
        "pivot": {"path": "tiny-phi3", "backend": "megatron"},
        "sources": [{"name": "qwen2", "path": "tiny-qwen2", "backend": "megatron"},
                    {"name": "llama", "path": "tiny-llama", "backend": "hf", "generation": {"samples": 3}}],
    }))
    return root


def prompts_env(cluster: Cluster, root: Path, out: Path) -> dict[str, str]:
    return pipeline_env(
        cluster, INFIFPO_PROMPTS=str(root / "prompts.jsonl"), INFIFPO_SOURCES=str(root / "sources.yaml"),
        INFIFPO_OUT=str(out), INFIFPO_CONFIG=TINY_CONFIG, INFIFPO_SFT_CONFIG=TINY_CONFIG,
        INFIFPO_SFT_OVERRIDES="loss.type=sft trainer.step0_parity_check=false trainer.max_steps=4",
        INFIFPO_OVERRIDES="trainer.max_steps=4",
        # Random tiny models rarely end a turn within 12 tokens: keep cut-off answers.
        INFIFPO_PAIRS_OVERRIDES="pairs.allow_truncated=true",
        INFIFPO_NODES="1", INFIFPO_GPUS_PER_NODE="0", INFIFPO_TASKS_PER_NODE="2", INFIFPO_GENERATE_PARALLEL="2",
        INFIFPO_SCORE_PARALLEL="2", INFIFPO_PYTHON=sys.executable, OMP_NUM_THREADS="1", INFIFPO_EVAL="0",
    )


def prompt_stage_jobs(ids: dict[str, str]) -> list[str]:
    return [ids[s] for s in PROMPT_STAGES if ids.get(s, "complete") != "complete"]


@pytest.mark.slow
def test_tiny_pipeline_from_prompts(slurm_cluster: Cluster, prompt_assets: Path) -> None:
    """prompts -> generate -> judge -> pairs -> SFT -> export SFT -> score p0 + sources -> merge ->
    InfiFPO -> export on the local cluster. A source that cannot generate fails its task and
    cancels everything after it; once fixed, a rerun resubmits only that task and completes the
    chain; a third run finds every stage complete."""
    out = prompt_assets / "run"
    env = prompts_env(slurm_cluster, prompt_assets, out)
    ids = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    slurm_cluster.wait(prompt_stage_jobs(ids), timeout=900, poll=1.0)
    generate = {r["ArrayTaskId"]: r["JobState"] for r in slurm_cluster.jobs(ids["generate"])}
    assert generate == {"0": "COMPLETED", "1": "COMPLETED", "2": "FAILED"}, generate
    assert "cannot load a causal language model" in (out / "logs" / f"generate-{ids['generate']}_2.out").read_text()
    for stage in ("judge", "pairs", "sft", "sft_export", "score", "merge", "train", "export"):
        records = slurm_cluster.jobs(ids[stage]) if stage in ("judge", "score") else [slurm_cluster.job(ids[stage])]
        assert all(r["JobState"] == "CANCELLED" for r in records), (stage, records)
    assert read_pipeline(out)["stages"]["generate"]["state"] == "failed"

    from nemo_infifpo.testing.models import save_tiny_hf_model

    save_tiny_hf_model("llama", prompt_assets / "models" / "tiny-llama", seed=3)
    rerun = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    slurm_cluster.wait(prompt_stage_jobs(rerun), timeout=1800, poll=1.0)
    assert [r["ArrayTaskId"] for r in slurm_cluster.jobs(rerun["generate"])] == ["2"]
    pipeline = refresh_status(slurm_cluster, REPO, env, cwd=REPO)
    logs = "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in sorted((out / "logs").glob("*.out")))
    assert {s: pipeline["stages"][s]["state"] for s in PROMPT_STAGES} == dict.fromkeys(PROMPT_STAGES, "complete"), logs

    # Each stage started after the one before it had finished (the stages' own markers).
    def marker(unit: str, kind: str) -> float:
        if unit in ("sft", "sft_export"):
            return marker_time(out / "sft", {"sft": "train", "sft_export": "export"}[unit], kind)
        return marker_time(out, unit, kind)

    chain = [[f"generate.{i}" for i in range(3)], ["judge.0"], ["pairs"], ["sft"], ["sft_export"],
             [f"score.{i}" for i in range(3)], ["merge"], ["train"], ["export"]]
    for before, after in itertools.pairwise(chain):
        assert max(marker(u, "complete") for u in before) <= min(marker(u, "started") for u in after), (before, after)

    report = json.loads((out / "pairs" / "report.json").read_text())
    assert report["prompts"]["sft"] + report["prompts"]["preference"] + sum(report["prompts"]["excluded"].values()) == 48
    assert report["candidates"]["total"] == 48 * (2 + 2 + 3)
    assert set(report["models"]) == {"pivot", "qwen2", "llama"}
    sft_rows = jsonl(out / "pairs" / "sft.jsonl")
    pairs = jsonl(out / "pairs" / "pairs.jsonl")
    assert len(sft_rows) == report["prompts"]["sft"] and len(pairs) == report["prompts"]["preference"]
    assert not {r["id"] for r in sft_rows} & {r["id"] for r in pairs}
    assert all(r["chosen_score"] > r["rejected_score"] and r["chosen_model"] in report["models"] for r in pairs)

    # p0 is the SFT model: trained on sft.jsonl from the pivot, exported, scored and trained.
    assert max(int(m["step"]) for m in jsonl(out / "sft" / "train" / "metrics.jsonl")) == 4
    manifest = json.loads((out / "scores" / "pivot" / "manifest.json").read_text())
    assert manifest["info"]["model_path"] == str(out / "sft" / "hf")
    assert manifest["info"]["num_rows"] == len(pairs)
    sft_model, initial = hf_state(out / "sft" / "hf"), hf_state(prompt_assets / "models" / "tiny-phi3")
    assert any(float((sft_model[k] - initial[k]).abs().max()) > 0 for k in initial)
    fused = hf_state(out / "hf")
    assert any(float((fused[k] - sft_model[k]).abs().max()) > 0 for k in sft_model)

    again = submit_pipeline(slurm_cluster, REPO, env, out, cwd=REPO)
    assert {s: again[s] for s in PROMPT_STAGES} == dict.fromkeys(PROMPT_STAGES, "complete"), again
