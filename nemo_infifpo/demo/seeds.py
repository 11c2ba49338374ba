"""The demo over several seeds: one full run per seed, then one table with the spread over seeds.

    python recipes/demo_seeds.py --seeds 0 1 2          # = make demo-seeds -> demo-output-seeds/seeds.md

A single run's standard errors are over prompts; they say nothing about how much the result
moves with the seed (other random models, other samples, other batches). Here every number is
a mean over seeds with its standard error over seeds, and the differences that matter
(InfiFPO − DPO, InfiFPO − p0, InfiFPO − pivot before fusion) are taken per seed first.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["aggregate", "render_markdown"]

# (label, minuend, subtrahend); "pivot" stands for the pivot before fusion, whatever its name.
DIFFERENCES = (
    ("InfiFPO − DPO", "infifpo", "dpo"),
    ("InfiFPO − p0", "infifpo", "p0"),
    ("DPO − p0", "dpo", "p0"),
    ("InfiFPO − pivot before", "infifpo", "pivot"),
    ("p0 − pivot before", "p0", "pivot"),
)


def _mean_se(values: Sequence[float]) -> dict[str, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return {"mean": mean, "se": se, "n": len(values), "values": list(values)}


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard error over seeds of every model's exact match per skill, and of the
    per-seed differences in :data:`DIFFERENCES`."""
    if not summaries:
        raise ValueError("no demo summaries to aggregate")
    first = summaries[0]
    pivot = first["config"]["pivot"]["name"]
    skills = list(first["config"]["world"]["skills"])
    # Display order of the demo's table: the pivot before fusion, p0, the fused pivots, the sources.
    present = first["evaluation"]["exact_match"]
    order = [pivot, "p0", "dpo", "infifpo", *(s["name"] for s in first["config"]["sources"])]
    models = [m for m in order if m in present] + sorted(m for m in present if m not in order)
    for s in summaries:
        if sorted(s["evaluation"]["exact_match"]) != sorted(models) or list(s["config"]["world"]["skills"]) != skills:
            raise ValueError(f"seed {s['seed']}: other models or skills than seed {first['seed']}")
    em = [s["evaluation"]["exact_match"] for s in summaries]
    out: dict[str, Any] = {
        "seeds": [s["seed"] for s in summaries],
        "split": first["evaluation"]["split"],
        "pivot": pivot,
        "skills": skills,
        "models": {m: {k: _mean_se([e[m][k]["exact_match"] for e in em]) for k in skills} for m in models},
        "differences": {},
        "checks": {
            "infifpo_not_worse_than_p0": [s["checks"]["infifpo_not_worse_than_p0"] for s in summaries],
            "infifpo_better_than_pivot_where_mastered": [s["checks"]["infifpo_better_than_pivot_where_mastered"] for s in summaries],
        },
        "runtime_s": [s["runtime_s"]["total"] for s in summaries],
    }
    for label, a, b in DIFFERENCES:
        a, b = (pivot if x == "pivot" else x for x in (a, b))
        out["differences"][label] = {k: _mean_se([e[a][k]["exact_match"] - e[b][k]["exact_match"] for e in em]) for k in skills}
    return out


def _cell(stat: dict[str, float], signed: bool = False) -> str:
    value = round(100 * stat["mean"], 1) + 0.0  # + 0.0: no "-0.0"
    mean = f"{value:+.1f}" if signed else f"{value:.1f}%"
    return f"{mean} ± {100 * stat['se']:.1f}" if math.isfinite(stat["se"]) else mean


def render_markdown(result: dict[str, Any], labels: dict[str, str]) -> str:
    skills = result["skills"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        f"# The demo over seeds {seeds}\n",
        f"Greedy exact match on the {'held-out' if result['split'] == 'heldout' else result['split']} prompts (lm-eval), mean ± standard error over "
        f"{len(result['seeds'])} seeds; each seed is a full `make demo` run (its own world models, samples, "
        "pairs and training).\n",
        "| model | " + " | ".join(skills) + " |",
        "|---|" + "---|" * len(skills),
    ]
    for model, per_skill in result["models"].items():
        lines.append(f"| {labels.get(model, model)} | " + " | ".join(_cell(per_skill[k]) for k in skills) + " |")
    lines += ["", "Differences, taken per seed (points):", "", "| difference | " + " | ".join(skills) + " |", "|---|" + "---|" * len(skills)]
    for label, per_skill in result["differences"].items():
        lines.append(f"| {label} | " + " | ".join(_cell(per_skill[k], signed=True) for k in skills) + " |")
    checks = result["checks"]
    lines += [
        "",
        f"Per seed, InfiFPO no worse than p0 beyond two standard errors on every skill: {checks['infifpo_not_worse_than_p0']}; "
        f"better than the pivot before fusion by more than two standard errors where a source masters the skill: "
        f"{checks['infifpo_better_than_pivot_where_mastered']}. Runtimes (s): {', '.join(f'{t:.0f}' for t in result['runtime_s'])}.",
        "",
    ]
    return "\n".join(lines)


def write_seed_table(summary_paths: Sequence[Path], output_dir: Path, labels: dict[str, str]) -> Path:
    summaries = [json.loads(Path(p).read_text()) for p in summary_paths]
    result = aggregate(summaries)
    (output_dir / "seeds.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    table = output_dir / "seeds.md"
    table.write_text(render_markdown(result, labels), encoding="utf-8")
    return table
