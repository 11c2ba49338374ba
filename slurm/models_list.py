"""Write the pipeline's models list (models.tsv) from INFIFPO_PIVOT / INFIFPO_SOURCES.

Called by slurm/common.sh; standard library only (plus PyYAML for a sources YAML), so it runs
with whatever Python the cluster's login/batch node has, or inside the stage container.

    python slurm/models_list.py --pivot PATH --sources SPEC [--models-dir DIR] > models.tsv

SPEC is either a sources YAML (configs/sources/*.yaml: ``models_dir``, ``pivot``, ``sources``)
or a comma-separated list of entries ``PATH[:BACKEND[:TP[:PP]]]``. ``--pivot`` (same entry syntax)
wins over the YAML's pivot. Output: one line per scoring array task, tab-separated, with a header line::

    #index  name  path  backend  tp  pp  overrides

Task 0 is the pivot (name ``pivot``); then the sources in the given order. A backend of
``auto`` (the default) is ``megatron`` for the architectures megatron serves in this package
and ``hf`` for anything else, read from the model's config.json. ``score_overrides`` (a YAML list
or string of Hydra overrides for recipes/score.py, e.g. ``tokenizer.chat_template=plain`` for
a base model without a chat template) lands in the last column, space-separated.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

# Mirrors nemo_infifpo.models.registry.SUPPORTED_ARCHITECTURES (kept import-free: this script
# must not need torch).
MEGATRON_ARCHITECTURES = {"Phi3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
MEGATRON_MODEL_TYPES = {"phi3", "llama", "mistral", "qwen2"}
BACKENDS = {"megatron", "hf", "auto"}


class SpecError(ValueError):
    pass


def detect_backend(path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        # Not readable (yet): megatron is the default back end of recipes/score.py.
        return "megatron"
    architectures = set(config.get("architectures") or [])
    if architectures:
        return "megatron" if architectures & MEGATRON_ARCHITECTURES else "hf"
    if config.get("model_type"):
        return "megatron" if config["model_type"] in MEGATRON_MODEL_TYPES else "hf"
    return "megatron"


def sanitize(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return name or "model"


def resolve(path: str, base: Path | None) -> Path:
    p = Path(os.path.expanduser(path))
    if not p.is_absolute() and base is not None:
        p = base / p
    return Path(os.path.abspath(p))


def make_entry(raw: dict[str, Any], base: Path | None, default_name: str | None) -> dict[str, Any]:
    path = raw.get("path")
    if not path and raw.get("hf_id"):
        path = str(raw["hf_id"]).split("/")[-1]
    if not path:
        raise SpecError(f"model entry without path or hf_id: {raw}")
    resolved = resolve(str(path), base)
    backend = str(raw.get("backend") or "auto")
    if backend not in BACKENDS:
        raise SpecError(f"{path}: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = detect_backend(resolved)
    tp = int(raw.get("tensor_model_parallel_size") or raw.get("tp") or 1)
    pp = int(raw.get("pipeline_model_parallel_size") or raw.get("pp") or 1)
    if tp < 1 or pp < 1:
        raise SpecError(f"{path}: parallel sizes must be >= 1")
    if backend == "hf" and (tp, pp) != (1, 1):
        raise SpecError(f"{path}: the hf back end is data-parallel only (TP=PP=1), got TP={tp} PP={pp}")
    name = default_name or sanitize(str(raw.get("name") or resolved.name))
    overrides = raw.get("score_overrides") or []
    if isinstance(overrides, str):
        overrides = overrides.split()
    overrides = [str(o) for o in overrides]
    if any(any(c.isspace() for c in o) for o in overrides):
        raise SpecError(f"{path}: score_overrides must not contain whitespace: {overrides}")
    return {"name": name, "path": str(resolved), "backend": backend, "tp": tp, "pp": pp, "overrides": " ".join(overrides)}


def parse_list_entry(text: str) -> dict[str, Any]:
    parts = text.split(":")
    raw: dict[str, Any] = {"path": parts[0]}
    if len(parts) > 1 and parts[1]:
        raw["backend"] = parts[1]
    if len(parts) > 2 and parts[2]:
        raw["tp"] = parts[2]
    if len(parts) > 3 and parts[3]:
        raw["pp"] = parts[3]
    if len(parts) > 4:
        raise SpecError(f"source entry {text!r}: expected PATH[:BACKEND[:TP[:PP]]]")
    return raw


def build(pivot: str | None, sources: str, models_dir: str | None) -> list[dict[str, Any]]:
    pivot_raw: dict[str, Any] | None = None
    source_raws: list[dict[str, Any]] = []
    base: Path | None = None
    spec = sources.strip()
    if spec.endswith((".yaml", ".yml")) and "," not in spec:
        import yaml  # only needed for a sources YAML

        doc = yaml.safe_load(Path(spec).read_text()) or {}
        if not isinstance(doc, dict) or not isinstance(doc.get("sources"), list):
            raise SpecError(f"{spec}: expected a mapping with a 'sources' list")
        base_text = models_dir or doc.get("models_dir")
        base = resolve(str(base_text), Path.cwd()) if base_text else Path(spec).resolve().parent
        pivot_raw = doc.get("pivot")
        source_raws = [s if isinstance(s, dict) else {"path": str(s)} for s in doc["sources"]]
    elif spec:
        base = resolve(models_dir, Path.cwd()) if models_dir else None
        source_raws = [parse_list_entry(e.strip()) for e in spec.split(",") if e.strip()]
    if pivot:
        # INFIFPO_PIVOT wins over the YAML's pivot; same PATH[:BACKEND[:TP[:PP]]] syntax.
        pivot_raw = parse_list_entry(pivot)
        pivot_raw["path"] = str(resolve(pivot_raw["path"], Path.cwd()))
    if not pivot_raw:
        raise SpecError("no pivot: set INFIFPO_PIVOT (or a 'pivot' entry in the sources YAML)")
    if not source_raws:
        raise SpecError("no sources: set INFIFPO_SOURCES to model paths or a sources YAML")
    entries = [make_entry(pivot_raw, base, "pivot")]
    taken = {"pivot"}
    for raw in source_raws:
        entry = make_entry(raw, base, None)
        name, k = entry["name"], 2
        while entry["name"] in taken:  # two sources with the same directory name
            entry["name"] = f"{name}-{k}"
            k += 1
        taken.add(entry["name"])
        entries.append(entry)
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pivot", default="")
    parser.add_argument("--sources", required=True)
    parser.add_argument("--models-dir", default="")
    args = parser.parse_args(argv)
    try:
        entries = build(args.pivot or None, args.sources, args.models_dir or None)
    except (SpecError, OSError) as error:
        print(f"models_list: {error}", file=sys.stderr)
        return 2
    for entry in entries:
        if "\t" in entry["path"] or "\n" in entry["path"]:
            print(f"models_list: path with a tab or newline: {entry['path']!r}", file=sys.stderr)
            return 2
    print("#index\tname\tpath\tbackend\ttp\tpp\toverrides")
    for index, e in enumerate(entries):
        print(f"{index}\t{e['name']}\t{e['path']}\t{e['backend']}\t{e['tp']}\t{e['pp']}\t{e['overrides']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
