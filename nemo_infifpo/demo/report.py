"""The demo's report: ``report.md``, ``summary.json`` and PNG plots, from what the stages wrote.

Inputs: the evaluation stage's ``eval/summary.json`` and per-sample records (lm-eval), the
pairs stage's ``report.json`` and rows, the scored training set, each training run's
``metrics.jsonl``, and the stage runtimes. The text only states what was measured; where two
numbers are compared it gives the standard error of the difference (from lm-eval's standard
errors), so that noise on a few hundred held-out prompts is not read as a result.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

from nemo_infifpo.demo.config import DemoConfig

__all__ = ["accuracy_table", "checks", "fusion_by_skill", "label_map", "read_metrics", "write_report"]

_LABELS = {"p0": "SFT (p0)", "dpo": "SFT + DPO", "infifpo": "SFT + InfiFPO"}
_RUNS = {"sft": "SFT (stage 1)", "dpo": "DPO", "infifpo": "InfiFPO"}
_METRIC = "exact_match,none"


def label(name: str, config: DemoConfig) -> str:
    return _label(name, config.pivot.name)


def _label(name: str, pivot: str) -> str:
    if name == pivot:
        return "pivot before fusion"
    return _LABELS.get(name, f"source `{name}`")


def label_map(summary: dict[str, Any]) -> dict[str, str]:
    """Display names of the evaluated models of a demo's summary.json."""
    pivot = summary["config"]["pivot"]["name"]
    return {name: _label(name, pivot) for name in summary["evaluation"]["exact_match"]}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def accuracy_table(evaluation_summary: dict[str, Any], skills: Sequence[str], split: str) -> dict[str, dict[str, dict[str, float]]]:
    """model -> skill -> {exact_match, stderr}: the evaluation stage's numbers on the tasks of
    ``split``, by skill."""
    from nemo_infifpo.demo.world import task_name

    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    rows = {(r["task"], r["metric"]): r for r in evaluation_summary["rows"]}
    for skill in skills:
        row = rows[(task_name(skill, split), _METRIC)]
        for model, value in row["values"].items():
            out[model][skill] = {"exact_match": float(value), "stderr": float(row["stderr"][model])}
    return dict(out)


def _difference(table: dict[str, Any], a: str, b: str, skill: str) -> dict[str, float]:
    """``a - b`` on ``skill`` with the standard error of the difference (independent-samples
    approximation: both are measured on the same prompts, so this is conservative)."""
    x, y = table[a][skill], table[b][skill]
    diff = x["exact_match"] - y["exact_match"]
    se = math.sqrt(x["stderr"] ** 2 + y["stderr"] ** 2)
    return {"difference": diff, "stderr": se, "z": diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))}


def checks(table: dict[str, Any], config: DemoConfig) -> dict[str, Any]:
    """What the demo is meant to show, measured: a source *masters* a skill when it beats the
    pivot before fusion there by more than two standard errors; the fused pivot should then
    beat the pivot before fusion by more than two standard errors on those skills, and be no
    worse than p0 (its starting point) beyond two standard errors on any skill."""
    pivot = config.pivot.name
    skills = list(config.world.skills)
    mastered = {
        skill: [s.name for s in config.sources if _difference(table, s.name, pivot, skill)["z"] > 2]
        for skill in skills
    }
    out: dict[str, Any] = {"mastered_by": mastered, "skills": {}}
    for skill in skills:
        vs_pivot = _difference(table, "infifpo", pivot, skill)
        vs_p0 = _difference(table, "infifpo", "p0", skill)
        vs_dpo = _difference(table, "infifpo", "dpo", skill)
        out["skills"][skill] = {
            "infifpo_minus_pivot": vs_pivot,
            "infifpo_minus_p0": vs_p0,
            "infifpo_minus_dpo": vs_dpo,
            "p0_minus_pivot": _difference(table, "p0", pivot, skill),
            "dpo_minus_p0": _difference(table, "dpo", "p0", skill),
            "not_worse_than_p0": vs_p0["z"] >= -2,
            "better_than_pivot": vs_pivot["z"] > 2 if mastered[skill] else None,
        }
    s = out["skills"].values()
    out["infifpo_not_worse_than_p0"] = all(v["not_worse_than_p0"] for v in s)
    out["infifpo_better_than_pivot_where_mastered"] = all(v["better_than_pivot"] for v in s if v["better_than_pivot"] is not None)
    return out


def pair_sources(pairs_dir: Path, models: Sequence[str]) -> dict[str, Any]:
    """Per part (sft, preference) and skill: how often each model's sample was chosen and rejected."""
    from nemo_infifpo.demo.world import read_jsonl

    out: dict[str, Any] = {}
    for part, file in (("sft", "sft.jsonl"), ("preference", "pairs.jsonl")):
        by_skill: dict[str, Any] = {}
        for record in read_jsonl(pairs_dir / file):
            entry = by_skill.setdefault(record["skill"], {"pairs": 0, "chosen": Counter(), "rejected": Counter(), "correct": Counter()})
            entry["pairs"] += 1
            entry["chosen"][record["chosen_model"]] += 1
            entry["rejected"][record["rejected_model"]] += 1
            # Against the reference, not the judge: with a noisy judge the two differ.
            for side in ("chosen", "rejected"):
                entry["correct"][side] += record[side].strip() == record["reference"]
        out[part] = {
            skill: {"pairs": e["pairs"], "chosen": {m: e["chosen"][m] for m in models}, "rejected": {m: e["rejected"][m] for m in models},
                    "chosen_correct": e["correct"]["chosen"], "rejected_correct": e["correct"]["rejected"]}
            for skill, e in sorted(by_skill.items())
        }
    return out


def sample_generations(eval_dir: Path, models: Sequence[str], tasks: dict[str, str], count: int) -> dict[str, list[dict[str, Any]]]:
    """skill -> the first ``count`` evaluation prompts with the reference and each model's answer."""
    from nemo_infifpo.demo.world import read_jsonl

    out: dict[str, list[dict[str, Any]]] = {}
    for skill, task in tasks.items():
        per_model = {m: read_jsonl(eval_dir / m / f"samples_{task}.jsonl") for m in models}
        first = sorted(per_model[models[0]], key=lambda r: r["doc_id"])[:count]
        rows = []
        for record in first:
            outputs = {}
            for m in models:
                match = next(r for r in per_model[m] if r["doc_id"] == record["doc_id"])
                outputs[m] = {"answer": match["filtered_resps"][0], "exact_match": match["exact_match"]}
            rows.append({"prompt": record["doc"]["prompt"], "reference": record["target"], "outputs": outputs})
        out[skill] = rows
    return out


def fusion_by_skill(scored_path: Path, config: DemoConfig) -> dict[str, Any]:
    """How the configured fusion treats each skill's training rows at step 0 (policy = p0).

    Computed with ``nemo_infifpo.loss.infifpo_loss`` itself: the mean fusion weight of each
    candidate (for max_margin, the fraction of rows that select it), the fraction of source
    scores clipping changed, the step-0 InfiFPO loss, and each model's own preference
    accuracy on the training pairs (mean log-prob of chosen > rejected).
    """
    import torch

    from nemo_infifpo.data.scored_set import read_scored_set
    from nemo_infifpo.demo.world import skill_of
    from nemo_infifpo.loss import infifpo_loss

    p = config.preference
    scored = read_scored_set(scored_path)
    scores = scored.scores(p.length_norm)
    losses, metrics = infifpo_loss(
        scores["ref_chosen"], scores["ref_rejected"], scores["ref_chosen"], scores["ref_rejected"],
        scores["source_chosen"], scores["source_rejected"], beta=p.beta, fusion=p.fusion, clip=p.clip,
        include_pivot=p.include_pivot,
    )
    weights = metrics["weights"].double()
    if weights.dim() == 3:  # confidence fusion: chosen and rejected weighed separately
        weights = weights.mean(dim=1)
    candidates = list(scored.source_names) + (["p0"] if p.include_pivot else [])
    # Unclipped per-model preference on the training pairs (in the configured normalisation).
    model_names = list(scored.source_names) + ["p0"]
    prefers = torch.cat([scores["source_chosen"] > scores["source_rejected"], (scores["ref_chosen"] > scores["ref_rejected"])[:, None]], dim=1)
    skills = [skill_of(i) for i in scored.ids]
    out: dict[str, Any] = {}
    for skill in sorted(set(skills)):
        rows = torch.tensor([s == skill for s in skills])
        out[skill] = {
            "rows": int(rows.sum()),
            "weight": {c: float(weights[rows, k].mean()) for k, c in enumerate(candidates)},
            "clipped_fraction": float(metrics["clipped_fraction"][rows].double().mean()),
            "step0_loss": float(losses[rows].double().mean()),
            # h = beta * (pivot margin - fused margin); sigmoid(-h) is the row's gradient weight.
            "step0_h_median": float(metrics["margin"][rows].double().median()),
            # Per-row gradient weight sigma(-h) at step 0 (DPO: 0.5 on every row). With the same
            # beta and normalisation, an InfiFPO row's gradient is DPO's times weight / 0.5.
            "step0_weight": _quantiles(torch.sigmoid(-metrics["margin"][rows].double())),
            "train_pair_accuracy": {m: float(prefers[rows, k].double().mean()) for k, m in enumerate(model_names)},
        }
    return out


def _quantiles(values: Any) -> dict[str, float]:
    import torch

    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=values.dtype)).tolist()
    return {"mean": float(values.mean()), "p10": q[0], "median": q[1], "p90": q[2]}


# --------------------------------------------------------------------------- plots


def _plot_training(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = [("loss", "loss"), ("accuracy", "reward accuracy (training batch)"), ("margin", "reward margin (β-scaled)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, keys):
        for name, records in runs.items():
            steps = [r["step"] for r in records if key in r]
            values = [r[key] for r in records if key in r]
            if not values:
                continue
            (line,) = ax.plot(steps, values, alpha=0.3, linewidth=1)
            ax.plot(steps, _moving_average(values, 5), color=line.get_color(), linewidth=2, label=_RUNS.get(name, name))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("InfiFPO vs DPO from the same p0 (thin: per step, thick: 5-step moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_supervised(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, records in runs.items():
        ax.plot([r["step"] for r in records], _moving_average([r["loss"] for r in records], 10), label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("SFT loss (token mean, 10-step moving average)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_accuracy(table: dict[str, Any], order: list[str], skills: list[str], config: DemoConfig, path: Path) -> None:
    split = "held-out" if config.evaluation.split == "heldout" else config.evaluation.split
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(order)
    sources = {s.name for s in config.sources}
    for j, name in enumerate(order):
        values = [table[name][s]["exact_match"] for s in skills]
        errors = [2 * table[name][s]["stderr"] for s in skills]
        xs = [i + (j - (len(order) - 1) / 2) * width for i in range(len(skills))]
        hatch = "//" if name in sources else None
        bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=label(name, config).replace("`", ""), hatch=hatch, alpha=0.6 if hatch else 1.0)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.set_xticks(range(len(skills)), skills)
    ax.set_ylim(0, 1.15)
    ax.set_title(f"greedy exact match on {split} prompts (lm-eval; bars: ±2 standard errors)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=len(order), fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_timeline(stages: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 0.28 * len(stages) + 1.2))
    for i, stage in enumerate(stages):
        ax.barh(i, max(stage["seconds"], 0.5), left=stage["started_s"], color="tab:blue" if stage["status"] == "ok" else "tab:red")
    ax.set_yticks(range(len(stages)), [s["name"] for s in stages], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the demo started")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --------------------------------------------------------------------------- text


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _code(text: str) -> str:
    """A model's output as inline code that cannot break a Markdown table."""
    shown = json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|").replace("`", "'")
    return f"`{shown}`" if shown else "(empty)"


def _signed(d: dict[str, float]) -> str:
    verdict = "within noise" if abs(d["z"]) <= 2 else ("higher" if d["difference"] > 0 else "lower")
    return f"{100 * d['difference']:+.1f} points (±{100 * d['stderr']:.1f} s.e.; {verdict})"


def _training_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    tail = records[-max(1, len(records) // 5) :]  # last fifth: per-batch numbers are noisy
    out: dict[str, Any] = {"steps": len(records), "first": {}, "last_fifth_mean": {}}
    for key in ("loss", "accuracy", "margin", "reward_chosen", "reward_rejected", "grad_norm"):
        if key in records[0]:
            out["first"][key] = records[0][key]
            out["last_fifth_mean"][key] = sum(r[key] for r in tail) / len(tail)
    if "step0_parity_max_abs_diff" in records[0]:
        out["step0_parity_max_abs_diff"] = records[0]["step0_parity_max_abs_diff"]
    out["train_seconds"] = sum(r.get("step_time_s", 0.0) for r in records)
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)




def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the report


def write_report(config: DemoConfig, *, config_name: str, layout: Any, world: Any, results: list[Any], started: float) -> Path:
    """Write report.md, summary.json and plots/ under the demo's output directory."""
    from omegaconf import OmegaConf

    from nemo_infifpo.demo.pipeline import evaluated_models
    from nemo_infifpo.demo.world import task_name
    from nemo_infifpo.scoring.merge import report_path_for

    root: Path = layout.root
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    skills = list(config.world.skills)
    order = evaluated_models(config)
    evaluation = json.loads((layout.evaluation / "summary.json").read_text())
    table = accuracy_table(evaluation, skills, config.evaluation.split)
    missing = [m for m in order if m not in table]
    if missing:
        raise ValueError(f"{layout.evaluation / 'summary.json'} lacks models {missing}")
    supervised = {spec.name: read_metrics(layout.origin_run(spec.name)) for spec in [config.pivot, *config.sources]}
    runs = {name: read_metrics(layout.run(name)) for name in ("sft", "infifpo", "dpo")}
    pairs_report = json.loads((layout.pairs / "report.json").read_text())
    models = [config.pivot.name, *(s.name for s in config.sources)]
    fusion = fusion_by_skill(layout.scored_set, config)
    merge_report = json.loads(report_path_for(layout.scored_set).read_text())
    tasks = {skill: task_name(skill, config.evaluation.split) for skill in skills}

    total = time.perf_counter() - started
    stages = [
        {"name": r.name, "status": r.status, "seconds": r.seconds, "started_s": r.started_s, "command": r.command,
         "log": os.path.relpath(r.log, root) if r.log else None}
        for r in results
    ]
    _plot_accuracy(table, order, skills, config, plots / "accuracy_by_skill.png")
    _plot_training({name: runs[name] for name in ("infifpo", "dpo")}, plots / "training_curves.png")
    _plot_supervised({**{f"origin {n}": r for n, r in supervised.items()}, "SFT (stage 1) -> p0": runs["sft"]}, plots / "sft_loss.png")
    _plot_timeline(stages, plots / "timeline.png")

    summary: dict[str, Any] = {
        "config_name": config_name,
        "seed": config.seed,
        "config": OmegaConf.to_container(OmegaConf.structured(config)),
        # The load average tells a reader whether the runtimes were measured on a busy machine.
        "machine": {
            "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        },
        "runtime_s": {"total": round(total, 1), "stages": {r.name: r.seconds for r in results}},
        "stages": stages,
        "world": world.description,
        "evaluation": {"split": config.evaluation.split, "tasks": tasks, "exact_match": table},
        "checks": checks(table, config),
        "pairs": {"report": {k: pairs_report[k] for k in ("models", "prompts", "candidates") if k in pairs_report},
                  "by_skill": pair_sources(layout.pairs, models)},
        "fusion": {"by_skill": fusion, "merge_report": merge_report},
        "training": {name: _training_summary(records) for name, records in runs.items()},
        "origin": {name: {"steps": len(r), "first_loss": r[0]["loss"], "last_loss": r[-1]["loss"]} for name, r in supervised.items()},
        "samples": sample_generations(layout.evaluation, order, tasks, config.evaluation.examples_per_skill),
        "plots": sorted(str(p.relative_to(root)) for p in plots.glob("*.png")),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    report = root / "report.md"
    report.write_text(_markdown(config, config_name, summary, order, skills), encoding="utf-8")
    return report


def _markdown(config: DemoConfig, config_name: str, summary: dict[str, Any], order: list[str], skills: list[str]) -> str:
    p = config.preference
    sources = [s.name for s in config.sources]
    pivot = config.pivot.name
    models = summary["world"]["models"]
    table = summary["evaluation"]["exact_match"]
    check = summary["checks"]
    split = config.evaluation.split
    n_eval = config.world.prompts_heldout_per_skill if split == "heldout" else config.world.prompts_validation_per_skill
    out: list[str] = []
    add = out.append
    add("# InfiFPO demo: the paper's recipe in a tiny world, on CPU\n")
    add(
        f"Configuration `{config_name}`, seed {config.seed}; total runtime {summary['runtime_s']['total']:.0f} s on "
        f"{summary['machine']['cpus']} CPU(s). Every stage is the entry point a cluster runs (`recipes/*.py`; "
        "training under torchrun), launched as a subprocess; commands and logs are in `summary.json` and `logs/`. "
        "Tiny random models learn toy skills here: the numbers show that the recipe works end to end and how "
        "the objectives behave on this toy, nothing about real LLMs.\n"
    )

    add("## The world and its models\n")
    skill_lines = [f"`{d['example']['prompt']}` → `{d['example']['answer']}`" for d in summary["world"]["skills"].values()]
    counts = summary["world"]["prompts"]
    add(
        f"Skills: {', '.join(skill_lines)} (inputs of {config.world.min_digits}–{config.world.max_digits} digits). "
        f"Prompts: {counts['train']} for training (answered, judged, split into SFT and preference halves), "
        f"{counts['validation']} for choosing settings, {counts['heldout']} held out for the evaluation; validation "
        "and held-out inputs never occur in any training data. Each model of the world is made by supervised "
        "training on correct answers of its own skill mix (its *origin*: the stand-in for the pre-training that "
        "made Phi-4 or Qwen what they are):\n"
    )
    rows = []
    for name, m in models.items():
        mix = ", ".join(f"{s} {c}" for s, c in m["origin_rows"].items() if c)
        probe = m["probe"]
        rows.append([
            f"`{name}`", m["role"], m["architecture"], f"`{m['tokenizer']}` ({m['vocab_size']} tokens)", f"{m['parameters']:,}",
            mix, str(m["samples"]), f"{probe['prompt_tokens']} + {probe['response_tokens']}",
        ])
    add(_table(["model", "role", "architecture", "tokenizer / template", "parameters", "origin rows per skill", "samples per prompt", "tokens: prompt + response"], rows))
    probe_model = next(iter(models.values()))["probe"]
    add(
        f"\nThe last column is the same answer (`{probe_model['prompt']}` → `{probe_model['chosen']}`) in each model's "
        "own tokenization and chat template: InfiFPO compares these models' length-normalised scores, each over its own tokens.\n"
    )
    for name, m in models.items():
        add(f"- `{name}` renders it as `{json.dumps(m['probe']['rendered'])[1:-1]}`")
    add("")

    add(f"## Results ({'held-out' if split == 'heldout' else 'validation'} prompts, lm-eval)\n")
    add(
        f"Greedy exact match of every exported Hugging Face checkpoint, measured by `recipes/evaluate.py` "
        f"(lm-evaluation-harness, tasks {', '.join(f'`{t}`' for t in summary['evaluation']['tasks'].values())}, "
        f"{n_eval} prompts per skill, the model's own chat template); ± is lm-eval's standard error.\n"
    )
    header = ["model"] + [f"{s}: exact match" for s in skills] + [f"{s}: Δ to pivot before" for s in skills]
    rows = []
    for name in order:
        e = table[name]
        rows.append(
            [label(name, config)] + [f"{_pct(e[s]['exact_match'])} ± {100 * e[s]['stderr']:.1f}" for s in skills]
            + ["" if name == pivot else f"{100 * (e[s]['exact_match'] - table[pivot][s]['exact_match']):+.1f}" for s in skills]
        )
    add(_table(header, rows))
    add("\n![accuracy by skill](plots/accuracy_by_skill.png)\n")

    add("### What was observed\n")
    for skill in skills:
        c = check["skills"][skill]
        masters = check["mastered_by"][skill]
        add(
            f"- **{skill}** ({'mastered by ' + ', '.join(f'`{m}`' for m in masters) if masters else 'no source masters it'}): "
            f"SFT (p0) − pivot before {_signed(c['p0_minus_pivot'])}; InfiFPO − pivot before {_signed(c['infifpo_minus_pivot'])}; "
            f"InfiFPO − p0 {_signed(c['infifpo_minus_p0'])}; DPO − p0 {_signed(c['dpo_minus_p0'])}; "
            f"InfiFPO − DPO {_signed(c['infifpo_minus_dpo'])}."
        )
    yes = {True: "yes", False: "**no**"}
    add(
        f"- The fused pivot is no worse than p0 beyond two standard errors on every skill: "
        f"{yes[check['infifpo_not_worse_than_p0']]}. It beats the pivot before fusion by more than two standard "
        f"errors on every skill a source masters: {yes[check['infifpo_better_than_pivot_where_mastered']]}."
    )
    fusion = summary["fusion"]["by_skill"]
    spreads = ", ".join(
        f"{skill} {fusion[skill]['step0_weight']['p10']:.2f}–{fusion[skill]['step0_weight']['p90']:.2f}" for skill in skills if skill in fusion
    )
    add(
        "- InfiFPO vs DPO: both start from p0 with the same data, steps and optimiser; InfiFPO's gradient on a row is "
        "DPO's times σ(−h)/0.5, so the two differ only through how unevenly InfiFPO weighs the rows. At step 0 its row "
        f"weights σ(−h) span (10th–90th percentile) {spreads}, against 0.5 on every row for DPO; Adam cancels a common "
        "scale, and with a learning rate as small as the validation sweep chose, neither moves p0's greedy answers much. "
        "A world where the re-weighting matters more is a noisy judge (`world.judge_noise`, see the README)."
    )
    add(
        "- One seed; standard errors are over prompts, not over seeds. `make demo-seeds` repeats the demo over "
        "three seeds and tabulates the spread (the README quotes it).\n"
    )

    add("## How the pairs were made\n")
    report = summary["pairs"]["report"]
    rows = []
    for name in [pivot, *sources]:
        m = report["models"][name]
        excluded = ", ".join(f"{k} {v}" for k, v in sorted(m.get("excluded", {}).items()) if v) or "none"
        rows.append([f"`{name}`", str(m["answers"]), f"{m['score'].get('mean', float('nan')):.3f}", str(m["usable"]), excluded,
                     str(m["chosen"]), str(m["rejected"])])
    add(
        f"`recipes/generate.py` sampled answers at temperature {config.generation.temperature}; `recipes/judge.py` scored "
        "each with the world's checker (`nemo_infifpo.demo.world:check_answer`: the share of right digits, 1 only "
        "for the exact answer); `recipes/build_pairs.py` took the best answer of a prompt as chosen and the worst as "
        f"rejected, and sent {config.pairs.sft_fraction:.0%} of the prompts to SFT, the rest to preference training."
        + (f" **The judge is noisy**: it flips {config.world.judge_noise:.0%} of its verdicts (`world.judge_noise`), so some "
           "chosen answers are wrong and some rejected ones right (last two columns below)." if config.world.judge_noise else "")
        + "\n"
    )
    add(_table(["model", "answers", "mean checker score", "usable", "left out", "chosen", "rejected"], rows))
    prompts = report.get("prompts", {})
    if prompts:
        add(f"\nPrompts: {json.dumps(prompts, sort_keys=True)}.\n")
    header = (["part", "skill", "pairs"] + [f"chosen from `{m}`" for m in [pivot, *sources]]
              + [f"rejected from `{m}`" for m in [pivot, *sources]] + ["chosen is correct", "rejected is correct"])
    rows = []
    for part, by_skill in summary["pairs"]["by_skill"].items():
        for skill, e in by_skill.items():
            n = max(e["pairs"], 1)
            rows.append([part, skill, str(e["pairs"])] + [_pct(e["chosen"][m] / n) for m in [pivot, *sources]]
                        + [_pct(e["rejected"][m] / n) for m in [pivot, *sources]]
                        + [_pct(e["chosen_correct"] / n), _pct(e["rejected_correct"] / n)])
    add(_table(header, rows))
    add(
        "\nThe SFT half is where the sources' knowledge reaches the pivot most directly: on the skills a source "
        "masters, most chosen answers are the source's.\n"
    )

    add("## Fusion on the preference pairs (step 0, computed offline from the scored set)\n")
    candidates = sources + (["p0"] if p.include_pivot else [])
    weight_title = "selected by max_margin" if p.fusion == "max_margin" else f"mean {p.fusion} weight"
    header = (
        ["skill", "rows"] + [f"{weight_title}: {c}" for c in candidates]
        + ["clipped scores", "step-0 InfiFPO loss", "step-0 h (median)", "row weight σ(−h): p10 / median / p90"]
        + [f"pairs preferred by {m}" for m in sources + ["p0"]]
    )
    rows = []
    for skill in skills:
        f = fusion.get(skill)
        if f is None:
            continue
        rows.append(
            [skill, str(f["rows"])] + [_pct(f["weight"][c]) for c in candidates]
            + [_pct(f["clipped_fraction"]), f"{f['step0_loss']:.3f}", f"{f['step0_h_median']:.3f}",
               " / ".join(f"{f['step0_weight'][k]:.2f}" for k in ("p10", "median", "p90"))]
            + [_pct(f["train_pair_accuracy"][m]) for m in sources + ["p0"]]
        )
    add(_table(header, rows))
    add(
        f"\nStep-0 loss of DPO is ln 2 = {math.log(2):.3f} on every row (reference = p0). InfiFPO's reference is the fused, "
        "clipped source score; clipping raises a source's chosen score and lowers its rejected score to p0's where "
        "the source is worse, so a candidate's clipped margin is never below p0's (and with max_margin a source "
        "wins every tie against p0). h = β·(pivot margin − fused margin) sets each row's gradient weight σ(−h). "
        "With the same β and normalisation, each row's InfiFPO gradient is exactly its DPO gradient times "
        "σ(−h)/σ(−h_DPO) (DPO starts at 0.5 on every row): InfiFPO re-weights DPO's rows toward those where the "
        "sources separate chosen from rejected better than p0. Since Adam largely cancels a common scale, the two "
        "runs differ mainly through how much these weights vary between rows: when they are all near one value "
        "(the p10–p90 range above), InfiFPO and DPO take nearly the same steps. The paper's test vector has h ≈ −0.5.\n"
    )

    add("## Training\n")
    add(
        f"Stage 1 (SFT of the pivot on the SFT half): {config.sft.steps} steps of {config.sft.global_batch_size} rows, "
        f"lr {config.sft.lr}. InfiFPO and DPO from the same p0, `recipes/train_infifpo.py` under torchrun, "
        f"TP={p.tensor_model_parallel_size}, PP={p.pipeline_model_parallel_size}, {config.nproc} ranks (gloo, CPU); "
        f"{p.steps} steps of {p.global_batch_size} pairs, lr {p.lr} (cosine to {p.min_lr}), β={p.beta}, "
        f"length_norm={str(p.length_norm).lower()}; InfiFPO with fusion={p.fusion}, clip={str(p.clip).lower()}, "
        f"include_pivot={str(p.include_pivot).lower()}." + (f" DPO-only overrides: `{' '.join(p.dpo_overrides)}`." if p.dpo_overrides else "")
        + " These settings were chosen on the validation prompts (`recipes/demo_sweep.py`, `docs/DEMO_SWEEP.md`).\n"
    )
    rows = []
    for name in ("infifpo", "dpo"):
        t = summary["training"][name]
        parity = t.get("step0_parity_max_abs_diff")
        rows.append([
            _RUNS[name], str(t["steps"]), f"{t['first']['loss']:.4f}", f"{t['last_fifth_mean']['loss']:.4f}",
            f"{t['last_fifth_mean'].get('accuracy', float('nan')):.3f}", f"{t['last_fifth_mean'].get('margin', float('nan')):.3f}",
            "n/a" if parity is None else f"{parity:.2e}",
        ])
    add(_table(["run", "steps", "loss at step 1", "loss (last 20% of steps)", "reward accuracy (last 20%)", "margin (last 20%)", "step-0 parity max abs diff"], rows))
    add(
        "\nRewards are measured against each run's own reference (DPO: p0; InfiFPO: the fused sources), so their "
        "margins are not on a common scale; compare the evaluation above instead.\n"
    )
    add("![training curves](plots/training_curves.png)\n")
    add("The world's models (origin) and stage-1 SFT, `loss.type=sft`:\n")
    add("![SFT loss](plots/sft_loss.png)\n")

    add("## Sample generations\n")
    rows = []
    for skill in skills:
        for example in summary["samples"][skill]:
            rows.append([_code(example["prompt"]), _code(example["reference"])]
                        + [_code(example["outputs"][n]["answer"]) + (" ✓" if example["outputs"][n]["exact_match"] else "") for n in order])
    add(_table(["prompt", "answer", *[label(n, config) for n in order]], rows))
    add("")

    add("## Stages and runtimes\n")
    add("![timeline](plots/timeline.png)\n")
    rows = [[f"`{s['name']}`", f"{s['seconds']:.1f}", f"{s['started_s']:.1f}"] for s in summary["stages"]]
    add(_table(["stage", "seconds", "started at (s)"], rows))
    load = summary["machine"]["loadavg_at_end"]
    load_text = f" (1/5/15-minute load average at the end: {', '.join(f'{x:.1f}' for x in load)})" if load else ""
    add(
        f"\nTotal {summary['runtime_s']['total']:.0f} s{load_text}. Independent single-process stages run "
        f"{config.parallel_jobs} at a time; most of a stage's time on CPU is interpreter and library start-up, "
        "not compute.\n"
    )
    return "\n".join(out) + "\n"
