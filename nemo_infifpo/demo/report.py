"""The demo's report: ``report.md``, ``summary.json`` and PNG plots, from what the stages wrote.

Inputs: ``eval/<model>.json`` (nemo_infifpo.demo.evaluate), each training run's
``metrics.jsonl``, the scored training set and its merge report, and the stage runtimes.
The text only states what was measured; where two numbers are compared it gives the
binomial standard error of the difference, so that noise on a few hundred held-out prompts is
not read as a result.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from nemo_infifpo.demo.config import DemoConfig

__all__ = ["fusion_by_skill", "read_metrics", "write_report"]

# Display order and labels of the evaluated models (sources are inserted after p0).
_PIVOTS = ("p0", "dpo", "infifpo")
_LABELS = {"p0": "pivot p0 (before)", "dpo": "pivot after DPO", "infifpo": "pivot after InfiFPO"}
_RUNS = {"dpo": "DPO", "infifpo": "InfiFPO"}


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


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


def _plot_sft(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
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


def _plot_accuracy(evaluations: dict[str, dict[str, Any]], order: list[str], skills: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(order)
    for ax, (metric, title) in zip(axes, [("exact_match", "greedy exact match (held-out)"), ("preference_accuracy", "preference accuracy (held-out)")]):
        for j, name in enumerate(order):
            values = [evaluations[name]["skills"][s][metric] for s in skills]
            xs = [i + (j - (len(order) - 1) / 2) * width for i in range(len(skills))]
            hatch = "//" if name not in _PIVOTS else None
            bars = ax.bar(xs, values, width, label=_LABELS.get(name, f"source {name}"), hatch=hatch, alpha=0.6 if hatch else 1.0)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        ax.set_xticks(range(len(skills)), skills)
        ax.set_ylim(0, 1.1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(order), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
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


def _diff_text(a: float, b: float, n: int) -> str:
    """``a - b`` in points with the binomial standard error of the difference (independent
    samples approximation; both are measured on the same n prompts, so this is conservative)."""
    se = math.sqrt(max(a * (1 - a) + b * (1 - b), 1e-12) / n)
    diff = a - b
    verdict = "within noise" if abs(diff) < 2 * se else ("higher" if diff > 0 else "lower")
    return f"{100 * diff:+.1f} points (±{100 * se:.1f} s.e.; {verdict})"


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


def write_report(config: DemoConfig, *, config_name: str, layout: Any, world: Any, results: list[Any], started: float) -> Path:
    """Write report.md, summary.json and plots/ under the demo's output directory."""
    from omegaconf import OmegaConf

    from nemo_infifpo.scoring.merge import report_path_for

    root: Path = layout.root
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    skills = list(config.world.skills)
    sources = [s.name for s in config.sources]
    order = ["p0", *sources, "dpo", "infifpo"]
    evaluations = {name: json.loads(layout.evaluation(name).read_text()) for name in order}
    pref_runs = {name: read_metrics(layout.pref_run(name)) for name in ("dpo", "infifpo")}
    sft_runs = {spec.name: read_metrics(layout.sft_run(spec.name)) for spec in [config.pivot, *config.sources]}
    fusion = fusion_by_skill(layout.scored_set, config)
    merge_report = json.loads(report_path_for(layout.scored_set).read_text())
    pairs_stats = json.loads(layout.pairs_stats.read_text()) if config.world.rejected == "pivot" else None

    _plot_training(pref_runs, plots / "training_curves.png")
    _plot_accuracy(evaluations, order, skills, plots / "accuracy_by_skill.png")
    _plot_sft(sft_runs, plots / "sft_loss.png")

    total = time.perf_counter() - started
    stages = [
        {"name": r.name, "status": r.status, "seconds": r.seconds, "started_s": r.started_s, "command": r.command,
         "log": os.path.relpath(r.log, root) if r.log else None}
        for r in results
    ]
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
        "evaluation": {
            name: {"skills": {s: {k: v for k, v in e["skills"][s].items() if k != "examples"} for s in skills}, "overall": e["overall"]}
            for name, e in evaluations.items()
        },
        "training": {name: _training_summary(records) for name, records in pref_runs.items()},
        "sft": {name: {"steps": len(r), "first_loss": r[0]["loss"], "last_loss": r[-1]["loss"]} for name, r in sft_runs.items()},
        "fusion": {"by_skill": fusion, "merge_report": merge_report},
        "pairs": pairs_stats,
        "plots": sorted(str(p.relative_to(root)) for p in plots.glob("*.png")),
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    report = root / "report.md"
    report.write_text(
        _markdown(config, config_name, summary, evaluations, order, skills, sources, fusion, world, pairs_stats), encoding="utf-8"
    )
    return report


def _markdown(
    config: DemoConfig,
    config_name: str,
    summary: dict[str, Any],
    evaluations: dict[str, Any],
    order: list[str],
    skills: list[str],
    sources: list[str],
    fusion: dict[str, Any],
    world: Any,
    pairs_stats: dict[str, Any] | None,
) -> str:
    p = config.preference
    models = world.description["models"]
    n_eval = config.world.pairs_heldout_per_skill
    out: list[str] = []
    add = out.append
    add("# InfiFPO demo: a tiny fusion world on CPU\n")
    add(
        f"Configuration `{config_name}`, seed {config.seed}; total runtime "
        f"{summary['runtime_s']['total']:.0f} s on {summary['machine']['cpus']} CPU(s). SFT, export, scoring, merge and "
        "InfiFPO/DPO training are the entry points a cluster runs (`recipes/*.py`, training under torchrun), each "
        "launched as a subprocess; building the pairs and evaluating are the demo's own modules "
        "(`nemo_infifpo.demo.pairs`, `.evaluate`). Commands and logs are in `summary.json` and `logs/`. Tiny random "
        "models learn toy skills here: the numbers show that the pipeline works end to end and how the two "
        "objectives behave on this toy, nothing about real LLMs.\n"
    )

    add("## The world\n")
    skill_lines = [f"`{d['example']['prompt']}` → `{d['example']['answer']}`" for d in world.description["skills"].values()]
    add(
        f"Skills: {', '.join(skill_lines)} (inputs of {config.world.min_digits}–{config.world.max_digits} digits). "
        f"Preference pairs: the correct answer (chosen) vs a wrong one (rejected); {config.world.pairs_train_per_skill} "
        f"training and {n_eval} held-out pairs per skill. Held-out inputs never occur in any training data.\n"
    )
    near_misses = ", ".join(k.replace("_", " ") for k in world.description["corruptions"])
    if pairs_stats is None:
        add(f"The rejected answer is a synthetic near miss ({near_misses}).\n")
    else:
        add(
            "The rejected answer is the initial pivot p0's own greedy answer wherever that is wrong (the paper draws "
            f"y_l from the pivot's samples), otherwise a synthetic near miss ({near_misses}). Rows per skill whose "
            "rejected answer is p0's own:\n"
        )
        rows = []
        for split, stats in pairs_stats.items():
            for skill in skills:
                st = stats[skill]
                rows.append([split.removesuffix(".jsonl"), skill, str(st["rows"]), _pct(st["on_policy"] / st["rows"]), _pct(st["pivot_correct"] / st["rows"])])
        add(_table(["file", "skill", "pairs", "rejected = p0's answer", "p0 answered correctly"], rows))
        add(
            "\nSo p0's held-out preference accuracy is low by construction (its own greedy answer is usually its most "
            "likely one); what matters is how far training moves the pivot away from those answers.\n"
        )
    rows = []
    for name, m in models.items():
        mix = ", ".join(f"{s} {c}" for s, c in m["sft_rows"].items() if c)
        probe = m["probe"]
        rows.append([
            name, m["role"], f"{m['architecture']}", f"`{m['tokenizer']}` ({m['vocab_size']} tokens)",
            f"{m['parameters']:,}", mix, f"{probe['prompt_tokens']} + {probe['response_tokens']}",
        ])
    add(_table(["model", "role", "architecture", "tokenizer / template", "parameters", "SFT rows per skill", "tokens: prompt + response"], rows))
    probe_model = next(iter(models.values()))["probe"]
    add(
        f"\nThe last column is the same row (`{probe_model['prompt']}` → `{probe_model['chosen']}`) in each model's own "
        "tokenization and chat template: InfiFPO compares these models' length-normalised scores, each over its own tokens.\n"
    )
    for name, m in models.items():
        add(f"- `{name}` renders it as `{json.dumps(m['probe']['rendered'])[1:-1]}`")
    add("")

    add("## Results on the held-out pairs\n")
    add(
        "Greedy exact match (decode until end of turn; must equal the answer) and preference accuracy (chosen "
        "response has the higher mean token log-prob), per skill, computed with transformers on the exported "
        f"Hugging Face checkpoints ({n_eval} prompts per skill).\n"
    )
    header = ["model"] + [f"{s}: exact" for s in skills] + [f"{s}: pref. acc." for s in skills]
    rows = []
    for name in order:
        e = evaluations[name]["skills"]
        label = _LABELS.get(name, f"source `{name}`")
        rows.append([label] + [_pct(e[s]["exact_match"]) for s in skills] + [_pct(e[s]["preference_accuracy"]) for s in skills])
    add(_table(header, rows))
    add("\n![accuracy by skill](plots/accuracy_by_skill.png)\n")

    add("### What was observed\n")
    for skill in skills:
        values = {name: evaluations[name]["skills"][skill] for name in order}
        for metric, title in (("exact_match", "exact match"), ("preference_accuracy", "preference accuracy")):
            p0, dpo, infifpo = (values[n][metric] for n in ("p0", "dpo", "infifpo"))
            add(
                f"- **{skill}**, {title}: p0 {_pct(p0)}, DPO {_pct(dpo)}, InfiFPO {_pct(infifpo)}. "
                f"DPO − p0: {_diff_text(dpo, p0, n_eval)}; InfiFPO − p0: {_diff_text(infifpo, p0, n_eval)}; "
                f"InfiFPO − DPO: {_diff_text(infifpo, dpo, n_eval)}."
            )
    for name in sources:
        e = evaluations[name]["skills"]
        ranked = sorted(skills, key=lambda s: -e[s]["exact_match"])
        best = ranked[0] if e[ranked[0]]["exact_match"] > (e[ranked[1]]["exact_match"] if len(ranked) > 1 else 0.0) else None
        verdict = f"a {best} specialist" if best else "no skill stands out"
        add(f"- Source `{name}`: exact match " + ", ".join(f"{s} {_pct(e[s]['exact_match'])}" for s in skills) + f" ({verdict}).")
    add(
        f"- Differences are over {n_eval} prompts per skill and one seed; 'within noise' means under two standard "
        "errors. Rerun with another `seed=` before reading anything into a small gap.\n"
    )

    add("## Fusion on the training pairs (step 0, computed offline from the scored set)\n")
    candidates = sources + (["p0"] if p.include_pivot else [])
    weight_title = "selected by max_margin" if p.fusion == "max_margin" else f"mean {p.fusion} weight"
    header = (
        ["skill"] + [f"{weight_title}: {c}" for c in candidates]
        + ["clipped scores", "step-0 InfiFPO loss", "step-0 h (median)", "row weight σ(−h): p10 / median / p90"]
        + [f"pairs preferred by {m}" for m in sources + ["p0"]]
    )
    rows = []
    for skill in skills:
        f = fusion[skill]
        rows.append(
            [skill] + [_pct(f["weight"][c]) for c in candidates]
            + [_pct(f["clipped_fraction"]), f"{f['step0_loss']:.3f}", f"{f['step0_h_median']:.3f}",
               " / ".join(f"{f['step0_weight'][k]:.2f}" for k in ("p10", "median", "p90"))]
            + [_pct(f["train_pair_accuracy"][m]) for m in sources + ["p0"]]
        )
    add(_table(header, rows))
    add(
        f"\nStep-0 loss of DPO is ln 2 = {math.log(2):.3f} on every row (reference = p0). InfiFPO's reference is the fused, "
        "clipped source score; clipping raises a source's chosen score and lowers its rejected score to p0's where "
        "the source is worse, so a candidate's clipped margin is never below p0's (and with max_margin a source "
        "wins every tie against p0). h = β·(pivot margin − fused margin) sets each row's gradient weight σ(−h): "
        "rows where the sources separate chosen from rejected much better than p0 get the most weight. With the "
        "same β and normalisation, each row's InfiFPO gradient is exactly its DPO gradient times σ(−h)/σ(−h_DPO) "
        "(DPO starts at 0.5 on every row): InfiFPO re-weights DPO's rows, and since Adam largely cancels a common "
        "scale, the two runs differ mainly through how much these weights vary between rows. (When h is very "
        "negative on every row, all weights are ≈ 1 and the runs nearly coincide.) The paper's test vector has "
        "h ≈ −0.5.\n"
    )

    add("## Training (InfiFPO and DPO, same p0, data, steps and optimiser)\n")
    layout = f"TP={p.tensor_model_parallel_size}, PP={p.pipeline_model_parallel_size}, {config.nproc} ranks (gloo, CPU)"
    add(
        f"`recipes/train_infifpo.py` under torchrun, {layout}; {p.steps} steps of {p.global_batch_size} pairs, lr {p.lr} "
        f"(cosine to {p.min_lr}, {p.warmup_fraction:.0%} warm-up), β={p.beta}, length_norm={str(p.length_norm).lower()}; "
        f"InfiFPO with fusion={p.fusion}, clip={str(p.clip).lower()}, include_pivot={str(p.include_pivot).lower()}."
        + (f" DPO-only overrides: `{' '.join(p.dpo_overrides)}`." if p.dpo_overrides else "") + "\n"
    )
    rows = []
    for name in ("dpo", "infifpo"):
        t = summary["training"][name]
        parity = t.get("step0_parity_max_abs_diff")
        rows.append([
            _LABELS[name], str(t["steps"]), f"{t['first']['loss']:.4f}", f"{t['last_fifth_mean']['loss']:.4f}",
            f"{t['last_fifth_mean']['accuracy']:.3f}", f"{t['last_fifth_mean']['margin']:.3f}",
            "n/a" if parity is None else f"{parity:.2e}",
        ])
    add(_table(["run", "steps", "loss at step 1", "loss (last 20% of steps)", "reward accuracy (last 20%)", "margin (last 20%)", "step-0 parity max abs diff"], rows))
    add(
        "\nRewards are measured against each run's own reference (DPO: p0; InfiFPO: the fused sources), so their "
        "margins are not on a common scale; compare the held-out numbers above instead.\n"
    )
    add("![training curves](plots/training_curves.png)\n")
    add("SFT (stage 1) of the pivot and the sources, `loss.type=sft`:\n")
    add("![SFT loss](plots/sft_loss.png)\n")

    add("## Sample generations (held-out)\n")
    rows = []
    for skill in skills:
        examples = evaluations["p0"]["skills"][skill]["examples"]
        for i, example in enumerate(examples):
            outputs = [_code(evaluations[n]["skills"][skill]["examples"][i]["output"]) for n in order]
            rows.append([_code(example["prompt"]), _code(example["answer"]), *outputs])
    add(_table(["prompt", "answer", *[_LABELS.get(n, n) for n in order]], rows))
    add("")

    add("## Stages and runtimes\n")
    rows = [[f"`{s['name']}`", f"{s['seconds']:.1f}", f"{s['started_s']:.1f}"] for s in summary["stages"]]
    add(_table(["stage", "seconds", "started at (s)"], rows))
    load = summary["machine"]["loadavg_at_end"]
    load_text = f" (1/5/15-minute load average at the end: {', '.join(f'{x:.1f}' for x in load)})" if load else ""
    add(
        f"\nTotal {summary['runtime_s']['total']:.0f} s{load_text}. Independent single-process stages run "
        f"{config.parallel_jobs} at a time; most of a stage's time on CPU is interpreter and megatron-core start-up, "
        "not compute.\n"
    )
    return "\n".join(out) + "\n"
