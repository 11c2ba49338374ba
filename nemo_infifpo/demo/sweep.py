"""Choosing the demo's training settings on the *validation* prompts, never the held-out ones.

    python recipes/demo_sweep.py            # -> demo-output-sweep/sweep.md (kept as docs/DEMO_SWEEP.md)

1. The demo runs once with ``evaluation.split=validation`` (the *base*: world, models, samples,
   pairs, p0 with the configured ``sft`` settings, the scored set).
2. Stage-1 SFT is rerun from the pivot before fusion for every ``(lr, steps)`` of the SFT grid.
3. InfiFPO and DPO are rerun from the base's p0 for every ``(lr, beta)`` of the preference grid.

Every run is exported and evaluated on the validation prompts through the same entry points as
the demo. A new SFT setting changes p0 and therefore the scored set: when the SFT grid prefers
other settings than the configured ones, put them into the config and run the sweep again, so
that the preference grid starts from that p0.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.demo.config import DemoConfig
from nemo_infifpo.demo.pipeline import (
    DPO,
    INFIFPO,
    P0,
    Layout,
    Stage,
    python_command,
    torchrun_command,
    evaluate_args,
    export_stage,
    preference_args,
    run_demo,
    run_stages,
    supervised_args,
)
from nemo_infifpo.demo.report import accuracy_table
from nemo_infifpo.demo.world import load_world

__all__ = ["SweepGrid", "run_sweep"]

log = logging.getLogger("nemo_infifpo.demo.sweep")


@dataclass(frozen=True)
class SweepGrid:
    sft_lr: tuple[float, ...] = (1e-3, 3e-3)
    sft_steps: tuple[int, ...] = (30, 60, 120)
    lr: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    beta: tuple[float, ...] = (0.1, 0.5, 2.5)


def _tag(value: float) -> str:
    return f"{value:g}"


def run_sweep(config: DemoConfig, grid: SweepGrid, output_dir: Path, *, config_name: str) -> Path:
    """Run the sweep under ``output_dir``; returns the path of its Markdown table."""
    output_dir = output_dir.resolve()
    base_dir = output_dir / "base"
    base = dataclasses.replace(
        config, output_dir=str(base_dir), overwrite=True, evaluation=dataclasses.replace(config.evaluation, split="validation")
    )
    if (base_dir / "summary.json").is_file():
        log.info("base run found: %s", base_dir)
    else:
        run_demo(base, config_name=config_name)
    layout = Layout(base_dir)
    world = load_world(layout.world)
    eval_root = output_dir / "eval"
    stages: list[Stage] = []
    runs: dict[str, dict[str, Any]] = {}

    def evaluate(name: str, dep: str) -> None:
        args = evaluate_args(base, layout, world, [name], eval_root / name, "validation")
        stages.append(Stage(f"eval/{name}", lambda: python_command("evaluate.py", args), deps=(dep,)))

    for lr, steps in itertools.product(grid.sft_lr, grid.sft_steps):
        name = f"sft-lr{_tag(lr)}-s{steps}"
        train = dataclasses.replace(config.sft, lr=lr, min_lr=lr / 10, steps=steps)
        args = supervised_args(base, config.pivot, train, model=layout.hf(config.pivot.name), data=layout.pairs / "sft.jsonl", output=layout.run(name))
        stages.append(Stage(f"train/{name}", lambda a=args: torchrun_command(base.nproc, "train_infifpo.py", a), slots=base.nproc))
        stages.append(export_stage(name, layout.run(name), layout.hf(name), f"train/{name}"))
        evaluate(name, f"export/{name}")
        runs[name] = {"part": "sft", "lr": lr, "steps": steps}
    for lr, beta in itertools.product(grid.lr, grid.beta):
        preference = dataclasses.replace(config.preference, lr=lr, min_lr=lr / 10, beta=beta)
        for loss in (INFIFPO, DPO):
            name = f"{loss}-lr{_tag(lr)}-b{_tag(beta)}"
            args = preference_args(base, layout, loss, layout.run(name), preference)
            stages.append(Stage(f"train/{name}", lambda a=args: torchrun_command(base.nproc, "train_infifpo.py", a), slots=base.nproc))
            stages.append(export_stage(name, layout.run(name), layout.hf(name), f"train/{name}"))
            evaluate(name, f"export/{name}")
            runs[name] = {"part": "preference", "loss": loss, "lr": lr, "beta": beta, "steps": preference.steps}
    # A finished run (its evaluation exists) is not run again: the sweep resumes.
    pending = {name for name in runs if not (eval_root / name / "summary.json").is_file()}
    stages = [s for s in stages if s.name.split("/", 1)[1] in pending]
    started = time.perf_counter()
    run_stages(stages, slots=base.parallel_jobs, log_dir=output_dir / "logs", timeout_s=base.stage_timeout_s, clock_start=started)

    skills = list(config.world.skills)
    def table(evaluation_dir: Path) -> dict[str, Any]:
        return accuracy_table(json.loads((evaluation_dir / "summary.json").read_text()), skills, "validation")

    results = {"base": table(layout.evaluation)}
    for name in runs:
        results[name] = table(eval_root / name)[name]
    table = _write_tables(config, grid, runs, results, output_dir, skills)
    log.info("sweep table: %s (%.0f s)", table, time.perf_counter() - started)
    return table


def _mean(per_skill: dict[str, dict[str, float]], skills: Sequence[str]) -> float:
    return sum(per_skill[s]["exact_match"] for s in skills) / len(skills)


def _cell(per_skill: dict[str, dict[str, float]], skill: str) -> str:
    e = per_skill[skill]
    return f"{100 * e['exact_match']:.1f} ± {100 * e['stderr']:.1f}"


def _write_tables(config: DemoConfig, grid: SweepGrid, runs: dict[str, Any], results: dict[str, Any], output_dir: Path, skills: list[str]) -> Path:
    base = results["base"]
    pivot = config.pivot.name
    lines = [
        "# Demo settings sweep (validation prompts)\n",
        f"`recipes/demo_sweep.py` on `configs/demo.yaml` (seed {config.seed}); greedy exact match (%) ± standard error on the "
        f"{config.world.prompts_validation_per_skill} validation prompts per skill, which never occur in any training "
        "data and are disjoint from the held-out prompts the demo reports. Chosen per block: the highest mean over skills.\n",
        "## Reference points (the base run)\n",
        "| model | " + " | ".join(skills) + " | mean |",
        "|---|" + "---|" * (len(skills) + 1),
    ]
    for name, text in ((pivot, "pivot before fusion"), (P0, f"SFT (p0): lr {config.sft.lr}, {config.sft.steps} steps")):
        lines.append(f"| {text} | " + " | ".join(_cell(base[name], s) for s in skills) + f" | {100 * _mean(base[name], skills):.1f} |")
    sft = [n for n, r in runs.items() if r["part"] == "sft"]
    if sft and not any(runs[n]["lr"] == config.sft.lr and runs[n]["steps"] == config.sft.steps for n in sft):
        # The configured setting competes too: its run is the base's p0.
        runs["base-p0"] = {"part": "sft", "lr": config.sft.lr, "steps": config.sft.steps}
        results["base-p0"] = base[P0]
        sft.insert(0, "base-p0")
    best_sft = max(sft, key=lambda n: _mean(results[n], skills)) if sft else None
    if sft:
        lines += ["", "## Stage-1 SFT from the pivot before fusion\n", "| lr | steps | " + " | ".join(skills) + " | mean |", "|---|---|" + "---|" * (len(skills) + 1)]
        for n in sft:
            r = runs[n]
            mark = " **(best)**" if n == best_sft else ""
            lines.append(f"| {r['lr']:g} | {r['steps']} | " + " | ".join(_cell(results[n], s) for s in skills) + f" | {100 * _mean(results[n], skills):.1f}{mark} |")
    pref = [n for n, r in runs.items() if r["part"] == "preference"]
    best: dict[str, str] = {}
    if pref:
        best = {loss: max((n for n in pref if runs[n]["loss"] == loss), key=lambda n: _mean(results[n], skills)) for loss in (INFIFPO, DPO)}
        steps = config.preference.steps
        lines += [
            "", f"## InfiFPO and DPO from p0 ({steps} steps of {config.preference.global_batch_size} pairs)\n",
            "| lr | β | " + " | ".join(f"InfiFPO {s}" for s in skills) + " | InfiFPO mean | " + " | ".join(f"DPO {s}" for s in skills) + " | DPO mean |",
            "|---|---|" + "---|" * (2 * len(skills) + 2),
        ]
        for lr, beta in itertools.product(grid.lr, grid.beta):
            i, d = f"{INFIFPO}-lr{_tag(lr)}-b{_tag(beta)}", f"{DPO}-lr{_tag(lr)}-b{_tag(beta)}"
            cells = [_cell(results[i], s) for s in skills] + [f"{100 * _mean(results[i], skills):.1f}" + (" **(best)**" if i == best[INFIFPO] else "")]
            cells += [_cell(results[d], s) for s in skills] + [f"{100 * _mean(results[d], skills):.1f}" + (" **(best)**" if d == best[DPO] else "")]
            lines.append(f"| {lr:g} | {beta:g} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"p0 on the same prompts: mean {100 * _mean(base[P0], skills):.1f}. The demo uses one setting for both objectives "
            f"(the same budget): the one InfiFPO prefers, lr {runs[best[INFIFPO]]['lr']:g}, β {runs[best[INFIFPO]]['beta']:g}; "
            f"DPO's own best here is lr {runs[best[DPO]]['lr']:g}, β {runs[best[DPO]]['beta']:g}.",
        ]
    lines.append("")
    path = output_dir / "sweep.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    (output_dir / "sweep.json").write_text(json.dumps({"runs": runs, "results": results, "best_sft": best_sft, "best": best}, indent=2, sort_keys=True) + "\n")
    return path
