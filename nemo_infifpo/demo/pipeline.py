"""The demo pipeline: the paper's recipe in miniature, every stage the entry point a cluster runs.

    world ─► origin/<model>: the world's models (the pivot before fusion; specialist sources)
          ─► export/<model> ─► generate/<model> (pivot 8, sources 4 samples at T=0.8)
          ─► judge (function judge: the world's checker) ─► pairs (half SFT, half preference)
          ─► sft (stage 1, SFT half) ─► export/p0
          ─► score/p0, score/<source> (preference half) ─► merge
          ─► train/infifpo, train/dpo (torchrun, TP=2) ─► export/infifpo, export/dpo
          ─► eval/before, eval/after (recipes/evaluate.py, lm-eval tasks of the world) ─► report

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

from nemo_infifpo.demo.config import DemoConfig, ModelSpec, PreferenceConfig, TrainConfig
from nemo_infifpo.demo.world import WorldFiles

__all__ = ["Stage", "StageFailed", "StageResult", "run_demo", "run_stages"]

log = logging.getLogger("nemo_infifpo.demo")

MARKER = ".nemo-infifpo-demo"  # written into output_dir: only such a directory is ever replaced
REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes"
# The pivot after stage-1 SFT, and after each preference objective (see config.RESERVED_NAMES).
P0, DPO, INFIFPO = "p0", "dpo", "infifpo"
# The function judge of the world (recipes/judge.py judge.type=function).
JUDGE = "nemo_infifpo.demo.world:check_answer"


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


def torchrun_command(nproc: int, script: str, args: list[str]) -> list[str]:
    # `python -m torch.distributed.run` is `torchrun`, with this interpreter for certain.
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(RECIPES / script), *args,
    ]


def python_command(script: str, args: list[str]) -> list[str]:
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

    def origin_run(self, name: str) -> Path:
        return self.root / "runs" / f"origin-{name}"

    def hf(self, name: str) -> Path:
        return self.root / "models" / "hf" / name

    def generation(self, name: str) -> Path:
        return self.root / "generation" / name

    @property
    def judge(self) -> Path:
        return self.root / "judge"

    @property
    def pairs(self) -> Path:
        """recipes/build_pairs.py output: sft.jsonl, pairs.jsonl, report.json."""
        return self.root / "pairs"

    def scores(self, name: str) -> Path:
        return self.root / "scores" / name

    @property
    def scored_set(self) -> Path:
        return self.root / "data" / "train.scored.parquet"

    def run(self, name: str) -> Path:
        """Training runs of the recipe: ``sft`` (-> p0), ``infifpo``, ``dpo``."""
        return self.root / "runs" / name

    @property
    def evaluation(self) -> Path:
        return self.root / "eval"

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


def _listing(values: Sequence[Any]) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def supervised_args(config: DemoConfig, spec: ModelSpec, train: TrainConfig, *, model: Path, data: Path, output: Path) -> list[str]:
    """recipes/train_infifpo.py arguments of a supervised (loss.type=sft) run, data parallel."""
    return [
        *_TRAIN_COMMON, f"model.path={model}", f"data.path={data}", f"output_dir={output}",
        "loss.type=sft", "model.tensor_model_parallel_size=1", "model.pipeline_model_parallel_size=1",
        f"model.micro_batch_size={train.micro_batch_size}", f"model.global_batch_size={train.global_batch_size}",
        f"trainer.max_steps={train.steps}", f"optim.lr={train.lr}", f"optim.min_lr={train.min_lr}",
        f"optim.warmup_fraction={train.warmup_fraction}", f"seed={config.seed}", *template_overrides(spec),
    ]


def preference_args(config: DemoConfig, layout: Layout, loss: str, output: Path, p: PreferenceConfig | None = None) -> list[str]:
    """recipes/train_infifpo.py arguments of the InfiFPO or DPO run from p0 (``p``: the
    preference settings, default the config's)."""
    p = p or config.preference
    args = [
        *_TRAIN_COMMON, f"model.path={layout.hf(P0)}", f"data.path={layout.scored_set}",
        f"model.tensor_model_parallel_size={p.tensor_model_parallel_size}",
        f"model.pipeline_model_parallel_size={p.pipeline_model_parallel_size}",
        f"model.micro_batch_size={p.micro_batch_size}", f"model.global_batch_size={p.global_batch_size}",
        f"trainer.max_steps={p.steps}", f"optim.lr={p.lr}", f"optim.min_lr={p.min_lr}",
        f"optim.warmup_fraction={p.warmup_fraction}", f"loss.beta={p.beta}", f"loss.length_norm={str(p.length_norm).lower()}",
        f"loss.fusion={p.fusion}", f"loss.clip={str(p.clip).lower()}", f"loss.include_pivot={str(p.include_pivot).lower()}",
        f"seed={config.seed}", *template_overrides(config.pivot), *p.overrides, f"loss.type={loss}", f"output_dir={output}",
    ]
    return args + (list(p.dpo_overrides) if loss == DPO else [])


def export_stage(name: str, run: Path, output: Path, dep: str) -> Stage:
    return Stage(
        f"export/{name}",
        lambda: python_command("export_hf.py", [f"checkpoint_path={latest_checkpoint(run)}", f"output_path={output}", "overwrite=true"]),
        deps=(dep,),
    )


def evaluate_args(config: DemoConfig, layout: Layout, world: WorldFiles, models: Sequence[str], output: Path, split: str) -> list[str]:
    """recipes/evaluate.py on the world's tasks of ``split`` (greedy, exact match, chat template)."""
    listing = ", ".join(f"{{name: {name}, path: '{layout.hf(name)}'}}" for name in models)
    return [
        f"models=[{listing}]", f"tasks={_listing(world.task_names(split))}", f"include_path={world.tasks}",
        f"output_dir={output}", f"batch_size={config.evaluation.batch_size}", "dtype=float32", "device=cpu",
        "log_samples=true",
    ]


def build_stages(config: DemoConfig, layout: Layout, world: WorldFiles) -> list[Stage]:
    """All stages after the world is built, in priority order."""
    specs: list[ModelSpec] = [config.pivot, *config.sources]
    sources = [s.name for s in config.sources]
    nproc = config.nproc
    stages: list[Stage] = []

    # 1. The world's models: each learns its skill mix from correct answers (the sources
    #    become specialists, the pivot a weak generalist), and is exported to HF: from here on
    #    they are what they are on a cluster, HF directories.
    for spec in specs:
        run = layout.origin_run(spec.name)
        args = supervised_args(config, spec, spec.origin, model=world.model_dirs[spec.name], data=world.origin_data[spec.name], output=run)
        stages.append(Stage(f"origin/{spec.name}", lambda a=args: torchrun_command(nproc, "train_infifpo.py", a), slots=nproc))
    for spec in specs:
        stages.append(export_stage(spec.name, layout.origin_run(spec.name), layout.hf(spec.name), f"origin/{spec.name}"))

    # 2. Every model answers every training prompt, several samples each, with its own template.
    g = config.generation
    for spec in specs:
        args = [
            f"model.path={layout.hf(spec.name)}", f"model.name={spec.name}", f"data.path={world.prompts['train']}",
            f"output_dir={layout.generation(spec.name)}", f"sampling.n={spec.samples}", f"sampling.temperature={g.temperature}",
            f"sampling.top_p={g.top_p}", f"sampling.max_new_tokens={g.max_new_tokens}", f"sampling.seed={config.seed}",
            "dtype=float32", f"batch.max_prompts={g.max_prompts}", *template_overrides(spec),
        ]
        stages.append(Stage(f"generate/{spec.name}", lambda a=args: python_command("generate.py", a), deps=(f"export/{spec.name}",)))

    # 3. The world's checker judges every answer; 4. best -> chosen, worst -> rejected, half SFT.
    generation_dirs = _listing([layout.generation(s.name) for s in specs])
    generated = tuple(f"generate/{s.name}" for s in specs)
    judge_args = [
        f"data.path={world.prompts['train']}", f"generation_dirs={generation_dirs}", f"output_dir={layout.judge}",
        "judge.type=function", f"judge.function={JUDGE}",
    ]
    stages.append(Stage("judge", lambda: python_command("judge.py", judge_args), deps=generated))
    pairs_args = [
        f"data.path={world.prompts['train']}", f"generation_dirs={generation_dirs}", f"judge_dir={layout.judge}",
        f"output_dir={layout.pairs}", f"split.sft_fraction={config.pairs.sft_fraction}", f"pairs.min_gap={config.pairs.min_gap}",
    ]
    stages.append(Stage("pairs", lambda: python_command("build_pairs.py", pairs_args), deps=("judge",)))

    # 5. Stage 1: SFT of the pivot on the SFT half -> p0, the model InfiFPO and DPO start from.
    sft_args = supervised_args(config, config.pivot, config.sft, model=layout.hf(config.pivot.name), data=layout.pairs / "sft.jsonl", output=layout.run("sft"))
    stages.append(Stage("sft", lambda: torchrun_command(nproc, "train_infifpo.py", sft_args), deps=("pairs",), slots=nproc))
    stages.append(export_stage(P0, layout.run("sft"), layout.hf(P0), "sft"))

    # 6. Score p0 and every source on the preference half, each with its own tokenizer/template.
    preference_rows = layout.pairs / "pairs.jsonl"
    for spec in specs:
        name = P0 if spec is config.pivot else spec.name
        args = [
            f"model.path={layout.hf(name)}", f"model.backend={spec.score_backend}", f"data.path={preference_rows}",
            f"output_dir={layout.scores(name)}", "dtype=float32", "data.max_length=120", "progress=false",
            *template_overrides(spec),
        ]
        deps = (f"export/{P0}",) if spec is config.pivot else ("pairs", f"export/{spec.name}")
        stages.append(Stage(f"score/{name}", lambda a=args: python_command("score.py", a), deps=deps))
    merge_args = [
        f"data.path={preference_rows}", f"pivot_dir={layout.scores(P0)}",
        f"source_dirs={_listing([layout.scores(n) for n in sources])}", f"source_names={_listing(sources)}",
        f"output_path={layout.scored_set}",
    ]
    stages.append(Stage("merge", lambda: python_command("merge_scores.py", merge_args), deps=(f"score/{P0}", *(f"score/{n}" for n in sources))))

    # 7. Evaluate the models that exist before fusion while the rest runs.
    split = config.evaluation.split
    before = [config.pivot.name, *sources]
    stages.append(Stage("eval/before", lambda: python_command("evaluate.py", evaluate_args(config, layout, world, before, layout.evaluation, split)),
                        deps=tuple(f"export/{n}" for n in before)))

    # 8. InfiFPO and the DPO baseline: same p0, data, layout, steps and optimiser.
    for name in (INFIFPO, DPO):
        args = preference_args(config, layout, name, layout.run(name))
        stages.append(Stage(f"train/{name}", lambda a=args: torchrun_command(nproc, "train_infifpo.py", a), deps=("merge",), slots=nproc))
    for name in (INFIFPO, DPO):
        stages.append(export_stage(name, layout.run(name), layout.hf(name), f"train/{name}"))

    # 9. Every model in one table (the models evaluated before are reused, not rerun).
    stages.append(Stage("eval/after", lambda: python_command("evaluate.py", evaluate_args(config, layout, world, evaluated_models(config), layout.evaluation, split)),
                        deps=("eval/before", f"export/{P0}", f"export/{INFIFPO}", f"export/{DPO}")))
    return stages


def evaluated_models(config: DemoConfig) -> list[str]:
    """Column order of the comparison: the pivot before fusion first (the baseline of Δ)."""
    return [config.pivot.name, P0, DPO, INFIFPO, *(s.name for s in config.sources)]


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
    log.info("world built in %.1fs: %s prompts", world_result.seconds, world.description["prompts"])

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
