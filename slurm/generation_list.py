"""Write the generation list (generate.tsv) and the judge line of the pipeline's start from
prompts, from the same INFIFPO_PIVOT / INFIFPO_SOURCES as the models list (slurm/models_list.py,
whose resolution of names and paths is reused, so both lists name the models alike).

    python slurm/generation_list.py --pivot PATH --sources SPEC [--models-dir DIR] [--backend B] > generate.tsv
    python slurm/generation_list.py --sources SPEC [--models-dir DIR] --judge [SPEC]          > judge.tsv

Generation settings come from the sources YAML: a top-level ``generation`` mapping (defaults for
every model: ``backend``, ``temperature``, ``top_p``, ``max_new_tokens``, ``seed``,
``pivot_samples``, ``source_samples``) and an optional ``generation`` mapping per model
(``samples``, ``backend``, ``tensor_model_parallel_size``, ``overrides``: extra
recipes/generate.py overrides, and any of the defaults). Without a YAML: the paper's values
(pivot 8 samples, sources 4, temperature 0.8). ``--backend`` (INFIFPO_GENERATE_BACKEND) wins
over every model's back end. Output, tab-separated, one line per model (pivot first)::

    #index  name  path  backend  tp  samples  temperature  top_p  max_new_tokens  seed  overrides

``--judge``: one line ``type<TAB>target<TAB>overrides`` from the YAML's ``judge`` mapping
(``type`` reward_model with ``path``, or function with ``function``; ``overrides``), or from
SPEC (INFIFPO_JUDGE): ``function:package.module:name``, or a reward model directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models_list import SpecError, build, resolve  # noqa: E402  (a sibling script, not a package)

# The paper's data construction (InfiFPO, section 4.1): 8 samples from the pivot, 4 from each
# source, temperature 0.8.
DEFAULTS: dict[str, Any] = {
    "backend": "vllm", "temperature": 0.8, "top_p": 1.0, "max_new_tokens": 3072, "seed": 0,
    "pivot_samples": 8, "source_samples": 4,
}
BACKENDS = {"vllm", "hf"}


def _yaml(spec: str) -> dict[str, Any] | None:
    spec = spec.strip()
    if not (spec.endswith((".yaml", ".yml")) and "," not in spec):
        return None
    import yaml

    doc = yaml.safe_load(Path(spec).read_text()) or {}
    if not isinstance(doc, dict):
        raise SpecError(f"{spec}: expected a mapping")
    return doc


def _overrides(value: Any, where: str) -> str:
    items = value.split() if isinstance(value, str) else [str(v) for v in (value or [])]
    if any(any(c.isspace() for c in item) for item in items):
        raise SpecError(f"{where}: overrides must not contain whitespace: {items}")
    return " ".join(items)


def generation_entries(pivot: str | None, sources: str, models_dir: str | None, backend: str | None) -> list[dict[str, Any]]:
    entries = build(pivot, sources, models_dir)
    doc = _yaml(sources) or {}
    defaults = {**DEFAULTS, **(doc.get("generation") or {})}
    per_model = [(doc.get("pivot") or {}).get("generation") or {}]
    per_model += [(s.get("generation") or {}) if isinstance(s, dict) else {} for s in doc.get("sources") or []]
    out = []
    for index, entry in enumerate(entries):
        own = per_model[index] if index < len(per_model) else {}
        settings = {**defaults, **own}
        samples = settings.get("samples", defaults["pivot_samples"] if index == 0 else defaults["source_samples"])
        chosen_backend = backend or str(settings["backend"])
        if chosen_backend not in BACKENDS:
            raise SpecError(f"{entry['name']}: generation backend must be vllm or hf, got {chosen_backend!r}")
        tp = int(settings.get("tensor_model_parallel_size") or 1)
        if chosen_backend == "hf":
            tp = 1
        if int(samples) < 1 or tp < 1:
            raise SpecError(f"{entry['name']}: generation samples and tensor_model_parallel_size must be >= 1")
        out.append({
            "name": entry["name"], "path": entry["path"], "backend": chosen_backend, "tp": tp, "samples": int(samples),
            "temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
            "max_new_tokens": int(settings["max_new_tokens"]), "seed": int(settings["seed"]),
            "overrides": _overrides(own.get("overrides"), entry["name"]),
        })
    return out


def judge_line(spec: str | None, sources: str, models_dir: str | None) -> tuple[str, str, str]:
    if spec:
        if spec.startswith("function:"):
            return "function", spec[len("function:"):], ""
        return "reward_model", str(resolve(spec, Path.cwd())), ""
    doc = _yaml(sources) or {}
    judge = doc.get("judge")
    if not isinstance(judge, dict):
        raise SpecError("no judge: set INFIFPO_JUDGE (a reward model directory, or function:package.module:name) "
                        "or a 'judge' mapping in the sources YAML")
    kind = str(judge.get("type") or "reward_model")
    overrides = _overrides(judge.get("overrides"), "judge")
    if kind == "function":
        if not judge.get("function"):
            raise SpecError("judge: type function needs 'function: package.module:name'")
        return kind, str(judge["function"]), overrides
    if kind != "reward_model":
        raise SpecError(f"judge: type must be reward_model or function, got {kind!r}")
    path = judge.get("path") or str(judge.get("hf_id") or "").split("/")[-1]
    if not path:
        raise SpecError("judge: a reward_model needs 'path' (or 'hf_id')")
    base_text = models_dir or doc.get("models_dir")
    base = resolve(str(base_text), Path.cwd()) if base_text else Path(sources).resolve().parent
    return kind, str(resolve(str(path), base)), overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pivot", default="")
    parser.add_argument("--sources", required=True)
    parser.add_argument("--models-dir", default="")
    parser.add_argument("--backend", default="")
    parser.add_argument("--judge", nargs="?", const="", default=None)
    args = parser.parse_args(argv)
    try:
        if args.judge is not None:
            print("\t".join(judge_line(args.judge or None, args.sources, args.models_dir or None)))
            return 0
        entries = generation_entries(args.pivot or None, args.sources, args.models_dir or None, args.backend or None)
    except (SpecError, OSError, ValueError, TypeError) as error:
        print(f"generation_list: {error}", file=sys.stderr)
        return 2
    print("#index\tname\tpath\tbackend\ttp\tsamples\ttemperature\ttop_p\tmax_new_tokens\tseed\toverrides")
    for index, e in enumerate(entries):
        print(f"{index}\t{e['name']}\t{e['path']}\t{e['backend']}\t{e['tp']}\t{e['samples']}\t{e['temperature']}"
              f"\t{e['top_p']}\t{e['max_new_tokens']}\t{e['seed']}\t{e['overrides']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
