"""The demo pipeline: every stage is the entry point the cluster runs, as a subprocess.

    world ─► sft/<model> (torchrun, loss.type=sft) ─► export/<model> (HF)
          ─► pairs (rejected = p0's own mistakes) ─► score/<model> ─► merge
          ─► train/infifpo, train/dpo (torchrun, TP/PP=2) ─► export/infifpo, export/dpo
          ─► eval/<model> (transformers, on the exported checkpoints) ─► report

Stages form a small dependency graph run by :func:`run_stages` on ``parallel_jobs`` CPU
slots: a torchrun stage takes ``nproc`` slots, any other stage one, and each process runs one
thread (``OMP_NUM_THREADS=1``: on a 2-core machine, two single-threaded processes beat one
two-threaded process for models this small, and oversubscribed gloo ranks crawl). Independent
single-process stages (exports, scoring, evaluation) therefore run two at a time; results do
not depend on the order, since every stage reads only the finished outputs of its
dependencies.

Each stage's stdout/stderr goes to ``<output_dir>/logs/<stage>.log``; a failing stage stops the
demo (the other running stages are terminated) and its log tail is shown.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.demo.config import DemoConfig, ModelSpec
from nemo_infifpo.demo.world import WorldFiles

__all__ = ["Stage", "StageFailed", "StageResult", "run_demo", "run_stages"]

log = logging.getLogger("nemo_infifpo.demo")

MARKER = ".nemo-infifpo-demo"  # written into output_dir: only such a directory is ever replaced
REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
# The three preference-trained / initial pivots evaluated against each other.
PIVOT_BEFORE, DPO, INFIFPO = "p0", "dpo", "infifpo"


# --------------------------------------------------------------------------- stages


@dataclass
class Stage:
    """A unit of work: one subprocess.

    ``command`` is called when the stage starts, so it may read outputs of its dependencies
    (e.g. the name of the checkpoint a training run ended with).
    """

    name: str
    command: Callable[[], list[str]]
    deps: tuple[str, ...] = ()
    slots: int = 1


@dataclass
class StageResult:
    name: str
    status: str  # ok | failed | timeout
    seconds: float
    started_s: float  # since the demo started (run_stages' clock_start)
    command: str | None  # None for in-process steps (world, report)
    log: str


class StageFailed(RuntimeError):
    def __init__(self, result: StageResult, tail: str) -> None:
        super().__init__(f"stage {result.name} failed after {result.seconds:.1f}s (log: {result.log})\n{tail}")
        self.result = result


@dataclass
class _Running:
    stage: Stage
    started: float
    log_path: Path
    command: str
    process: subprocess.Popen
    log_file: Any
    timed_out: bool = False


def stage_env() -> dict[str, str]:
    """The environment of every stage: offline, CPU, one thread per process, the repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # The demo is a CPU demo: identical numbers on a machine that happens to have a GPU.
            "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def _terminate(process: subprocess.Popen) -> None:
    """Stop a stage we started, with its children (torchrun ranks): its own process group."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_stages(
    stages: Sequence[Stage], *, slots: int, log_dir: Path, timeout_s: float, clock_start: float | None = None
) -> list[StageResult]:
    """Run ``stages`` respecting ``deps`` and ``slots``; stop at the first failure.

    Ready stages start in the given order, and a ready stage that does not fit blocks the ones
    after it (no back-filling), so a two-slot torchrun stage is never starved by a stream of
    one-slot stages.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate stage names: {names}")
    known = set(names)
    for stage in stages:
        missing = [d for d in stage.deps if d not in known]
        if missing:
            raise ValueError(f"stage {stage.name} depends on unknown stage(s) {missing}")
    log_dir.mkdir(parents=True, exist_ok=True)
    env = stage_env()
    pending = list(stages)
    running: dict[str, _Running] = {}
    done: set[str] = set()
    results: list[StageResult] = []
    start_all = time.perf_counter() if clock_start is None else clock_start  # times are relative to it

    def start(stage: Stage) -> None:
        log_path = log_dir / (stage.name.replace("/", "_") + ".log")
        started = time.perf_counter()
        argv = stage.command()
        command = shlex.join(argv)
        log_file = log_path.open("w", encoding="utf-8")
        log_file.write(f"$ {command}\n")
        log_file.flush()
        # A session of its own: the stage and its children (torchrun ranks) stop as a group.
        process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        running[stage.name] = _Running(stage, started, log_path, command, process, log_file)
        log.info("[%6.1fs] start  %s", started - start_all, stage.name)

    def finish(entry: _Running) -> StageResult:
        entry.log_file.close()
        if entry.timed_out:
            status = "timeout"
        else:
            status = "ok" if entry.process.returncode == 0 else "failed"
        result = StageResult(
            name=entry.stage.name,
            status=status,
            seconds=round(time.perf_counter() - entry.started, 2),
            started_s=round(entry.started - start_all, 2),
            command=entry.command,
            log=str(entry.log_path),
        )
        log.info("[%6.1fs] %-6s %s (%.1fs)", time.perf_counter() - start_all, "done" if status == "ok" else "FAILED", result.name, result.seconds)
        return result

    def stop_all() -> None:
        for other in running.values():
            _terminate(other.process)
            other.log_file.close()

    try:
        while pending or running:
            used = sum(min(r.stage.slots, slots) for r in running.values())
            for stage in list(pending):
                if not all(d in done for d in stage.deps):
                    continue
                need = min(stage.slots, slots)
                if used + need > slots:
                    break
                pending.remove(stage)
                start(stage)
                used += need
            if not running and pending:
                raise RuntimeError(f"stages can never start (dependency cycle?): {[s.name for s in pending]}")
            time.sleep(0.05)
            for name, entry in list(running.items()):
                if entry.process.poll() is None:
                    if time.perf_counter() - entry.started > timeout_s:
                        entry.timed_out = True
                        _terminate(entry.process)
                    continue
                del running[name]
                result = finish(entry)
                results.append(result)
                if result.status != "ok":
                    stop_all()
                    running.clear()
                    raise StageFailed(result, _tail(entry.log_path))
                done.add(name)
    except BaseException:
        stop_all()  # KeyboardInterrupt included: never leave ranks behind
        raise
    return results


# --------------------------------------------------------------------------- the demo's stages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun(nproc: int, script: str, args: list[str]) -> list[str]:
    # `python -m torch.distributed.run` is `torchrun`, with this interpreter for certain.
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(RECIPES / script), *args,
    ]


def _python(script: str, args: list[str]) -> list[str]:
    return [sys.executable, str(RECIPES / script), *args]


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint a finished training run points ``latest`` at."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} not found: did the training stage save a checkpoint?")
    return run_dir / "checkpoints" / pointer.read_text().strip()


@dataclass
class Layout:
    """Where every stage reads and writes, under the demo's output directory."""

    root: Path

    @property
    def world(self) -> Path:
        return self.root / "world"

    def sft_run(self, name: str) -> Path:
        return self.root / "runs" / f"sft-{name}"

    def hf(self, name: str) -> Path:
        return self.root / "models" / "hf" / name

    def scores(self, name: str) -> Path:
        return self.root / "scores" / name

    def pairs(self, split: str, config: DemoConfig) -> Path:
        """The preference pairs scoring, training and evaluation use (``split``: train | heldout)."""
        if config.world.rejected == "synthetic":
            return self.world / "data" / f"pairs_{split}.jsonl"
        return self.root / "data" / f"pairs_{split}.jsonl"

    @property
    def pairs_stats(self) -> Path:
        return self.root / "data" / "pairs.json"

    @property
    def scored_set(self) -> Path:
        return self.root / "data" / "train.scored.parquet"

    def pref_run(self, name: str) -> Path:
        return self.root / "runs" / name

    def evaluation(self, name: str) -> Path:
        return self.root / "eval" / f"{name}.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


# Shared by every train_infifpo.py launch: the tiny CPU config, no periodic checkpoints (a
# final one only), metrics.jsonl without TensorBoard event files.
_TRAIN_COMMON = ["--config-name", "infifpo_tiny", "checkpoint.interval=0", "logging.tensorboard=false", "logging.progress_bar=false"]


def template_overrides(spec: ModelSpec) -> list[str]:
    """The Hydra override passing ``spec``'s chat-template variables to a stage (none if empty)."""
    if not spec.chat_template_kwargs:
        return []
    pairs = ",".join(f"{key}:{json.dumps(value)}" for key, value in spec.chat_template_kwargs.items())
    return [f"tokenizer.chat_template_kwargs={{{pairs}}}"]


def build_stages(config: DemoConfig, layout: Layout, world: WorldFiles) -> list[Stage]:
    """All stages after the world is built, in priority order."""
    specs: list[ModelSpec] = [config.pivot, *config.sources]
    world_models, sft_data = world.model_dirs, world.sft_data
    pairs_train, pairs_heldout = layout.pairs("train", config), layout.pairs("heldout", config)
    nproc = config.nproc
    stages: list[Stage] = []

    # 1. SFT: each model learns its skill mix (the sources become specialists, the pivot a
    #    weak generalist: the paper's stage-1 SFT model p0).
    for spec in specs:
        sft = spec.sft
        run = layout.sft_run(spec.name)
        args = [
            *_TRAIN_COMMON, f"model.path={world_models[spec.name]}", f"data.path={sft_data[spec.name]}", f"output_dir={run}",
            "loss.type=sft", "model.tensor_model_parallel_size=1", "model.pipeline_model_parallel_size=1",
            f"model.micro_batch_size={sft.micro_batch_size}", f"model.global_batch_size={sft.global_batch_size}",
            f"trainer.max_steps={sft.steps}", f"optim.lr={sft.lr}", f"optim.min_lr={sft.min_lr}",
            f"optim.warmup_fraction={sft.warmup_fraction}", f"seed={config.seed}", *template_overrides(spec),
        ]
        stages.append(Stage(f"sft/{spec.name}", lambda a=args: _torchrun(nproc, "train_infifpo.py", a), slots=nproc))

    # 2. Export each SFT model to HF: the sources are then what they are on a cluster (HF
    #    directories), and the pivot's export is p0, what InfiFPO/DPO start from and score with.
    for spec in specs:
        out = layout.hf(PIVOT_BEFORE if spec is config.pivot else spec.name)
        run = layout.sft_run(spec.name)
        stages.append(
            Stage(
                f"export/{spec.name}",
                lambda r=run, o=out: _python("export_hf.py", [f"checkpoint_path={latest_checkpoint(r)}", f"output_path={o}", "overwrite=true"]),
                deps=(f"sft/{spec.name}",),
            )
        )

    # 3. The pairs' rejected side: p0's own wrong answers (the paper samples y_l from the pivot).
    pairs_deps: tuple[str, ...] = ()
    if config.world.rejected == "pivot":
        pairs_args = [
            "-m", "nemo_infifpo.demo.pairs", "--model", str(layout.hf(PIVOT_BEFORE)),
            "--inputs", str(world.pairs_train), str(world.pairs_heldout), "--outputs", str(pairs_train), str(pairs_heldout),
            "--stats", str(layout.pairs_stats), "--max-new-tokens", str(config.evaluation.max_new_tokens),
            "--batch-size", str(config.evaluation.batch_size),
        ]
        stages.append(Stage("pairs", lambda: [sys.executable, *pairs_args], deps=(f"export/{config.pivot.name}",)))
        pairs_deps = ("pairs",)

    # 4. Score p0 and every source on the training pairs, each with its own tokenizer/template.
    for spec in specs:
        model_dir = layout.hf(PIVOT_BEFORE if spec is config.pivot else spec.name)
        args = [
            f"model.path={model_dir}", f"model.backend={spec.score_backend}", f"data.path={pairs_train}",
            f"output_dir={layout.scores(spec.name)}", "dtype=float32", "data.max_length=120", "progress=false",
            *template_overrides(spec),
        ]
        stages.append(Stage(f"score/{spec.name}", lambda a=args: _python("score.py", a), deps=(f"export/{spec.name}", *pairs_deps)))

    # 5. Merge into the scored training set (sources in config order).
    source_names = [s.name for s in config.sources]
    merge_args = [
        f"data.path={pairs_train}", f"pivot_dir={layout.scores(config.pivot.name)}",
        "source_dirs=[" + ",".join(str(layout.scores(n)) for n in source_names) + "]",
        "source_names=[" + ",".join(source_names) + "]", f"output_path={layout.scored_set}",
    ]
    stages.append(Stage("merge", lambda: _python("merge_scores.py", merge_args), deps=tuple(f"score/{s.name}" for s in specs)))

    # 6. Evaluate the models that exist before preference training (overlaps with scoring).
    evaluation = config.evaluation

    def eval_stage(name: str, deps: tuple[str, ...]) -> Stage:
        args = [
            "-m", "nemo_infifpo.demo.evaluate", "--model", str(layout.hf(name)), "--name", name,
            "--data", str(pairs_heldout), "--output", str(layout.evaluation(name)),
            "--max-new-tokens", str(evaluation.max_new_tokens), "--batch-size", str(evaluation.batch_size),
            "--examples", str(evaluation.examples_per_skill),
        ]
        return Stage(f"eval/{name}", lambda: [sys.executable, *args], deps=(*deps, *pairs_deps))

    stages.append(eval_stage(PIVOT_BEFORE, (f"export/{config.pivot.name}",)))
    for spec in config.sources:
        stages.append(eval_stage(spec.name, (f"export/{spec.name}",)))

    # 7. InfiFPO and the DPO baseline: same pivot p0, data, layout, steps and optimiser.
    p = config.preference
    common = [
        *_TRAIN_COMMON, f"model.path={layout.hf(PIVOT_BEFORE)}", f"data.path={layout.scored_set}",
        f"model.tensor_model_parallel_size={p.tensor_model_parallel_size}",
        f"model.pipeline_model_parallel_size={p.pipeline_model_parallel_size}",
        f"model.micro_batch_size={p.micro_batch_size}", f"model.global_batch_size={p.global_batch_size}",
        f"trainer.max_steps={p.steps}", f"optim.lr={p.lr}", f"optim.min_lr={p.min_lr}",
        f"optim.warmup_fraction={p.warmup_fraction}", f"loss.beta={p.beta}", f"loss.length_norm={str(p.length_norm).lower()}",
        f"loss.fusion={p.fusion}", f"loss.clip={str(p.clip).lower()}", f"loss.include_pivot={str(p.include_pivot).lower()}",
        f"seed={config.seed}", *template_overrides(config.pivot), *p.overrides,
    ]
    runs = {
        INFIFPO: [*common, "loss.type=infifpo", f"output_dir={layout.pref_run(INFIFPO)}"],
        DPO: [*common, "loss.type=dpo", f"output_dir={layout.pref_run(DPO)}", *p.dpo_overrides],
    }
    for name, args in runs.items():
        stages.append(Stage(f"train/{name}", lambda a=args: _torchrun(nproc, "train_infifpo.py", a), deps=("merge",), slots=nproc))
    for name in runs:
        run = layout.pref_run(name)
        stages.append(
            Stage(
                f"export/{name}",
                lambda r=run, o=layout.hf(name): _python("export_hf.py", [f"checkpoint_path={latest_checkpoint(r)}", f"output_path={o}", "overwrite=true"]),
                deps=(f"train/{name}",),
            )
        )
    for name in runs:
        stages.append(eval_stage(name, (f"export/{name}",)))
    return stages


# --------------------------------------------------------------------------- the demo


def prepare_output_dir(path: Path, *, overwrite: bool) -> None:
    """An empty ``path`` carrying the demo marker; refuses to delete anything else."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise FileExistsError(f"{path} exists, is not empty and was not written by the demo: choose another output_dir")
        if not overwrite:
            raise FileExistsError(f"{path} holds an earlier demo run; pass overwrite=true to replace it")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("written by nemo_infifpo.demo; `make demo` replaces this directory\n")


def run_demo(config: DemoConfig, *, config_name: str) -> Path:
    """Run the whole demo; returns the report's path."""
    from nemo_infifpo.demo.report import write_report
    from nemo_infifpo.demo.world import build_world

    started = time.perf_counter()
    if not RECIPES.is_dir():
        # The stages are the repository's recipes/ scripts, which a wheel install lacks.
        raise FileNotFoundError(f"{RECIPES} not found: run the demo from a source checkout (pip install -e .)")
    root = Path(config.output_dir).resolve()
    prepare_output_dir(root, overwrite=config.overwrite)
    layout = Layout(root)
    log.info("demo %r -> %s", config_name, root)

    t0 = time.perf_counter()
    world = build_world(config, layout.world)
    world_result = StageResult("world", "ok", round(time.perf_counter() - t0, 2), round(t0 - started, 2), None, "")
    log.info("world built in %.1fs: %d training pairs, %d held-out pairs", world_result.seconds, world.description["pairs_train"], world.description["pairs_heldout"])

    stages = build_stages(config, layout, world)
    results = [world_result]
    try:
        results += run_stages(
            stages, slots=config.parallel_jobs, log_dir=layout.logs, timeout_s=config.stage_timeout_s, clock_start=started
        )
    except StageFailed as failure:
        log.error("%s", failure)
        raise

    t0 = time.perf_counter()
    report = write_report(config, config_name=config_name, layout=layout, world=world, results=results, started=started)
    log.info("report written in %.1fs: %s (total %.1fs)", time.perf_counter() - t0, report, time.perf_counter() - started)
    return report
