"""The build-pairs job: prompts + generation outputs + judge scores -> ``sft.jsonl``,
``pairs.jsonl`` and ``report.json`` (rules and split: :mod:`nemo_infifpo.generation.pairs`).

It streams: every generation output and the judge output are read shard after shard in
prompt-id order and joined one prompt at a time, and the rows are written as they are made,
so memory holds the prompts and one prompt's candidates, whatever the number of answers.

Both files hold preference rows in the format every later stage reads (``id``, ``prompt`` as
messages, ``chosen``, ``rejected`` as strings), with ``chosen_model``, ``chosen_index``,
``chosen_score``, ``rejected_model``, ``rejected_index``, ``rejected_score``, and the prompt's
extra columns. ``sft.jsonl`` is the SFT part (stage 1 trains on prompt + chosen), ``pairs.jsonl``
the preference part (scored by p0 and the sources, then InfiFPO). Every file is written to a
temporary name and renamed; ``report.json`` is written last and records the inputs, so a rerun
with the same inputs finds the work done, and with other inputs replaces it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.atomic import atomic_path, write_json_atomic
from nemo_infifpo.data.errors import InputError
from nemo_infifpo.data.policy import RowPolicy
from nemo_infifpo.data.scored_set import canonical_json, package_version
from nemo_infifpo.generation import outputs
from nemo_infifpo.generation.judging import generation_sources
from nemo_infifpo.generation.options import Options
from nemo_infifpo.generation.pairs import (
    CANDIDATE_REASONS,
    PROMPT_REASONS,
    Candidate,
    PairRules,
    ScoreStats,
    select_pair,
    split_part,
)
from nemo_infifpo.generation.prompts import prompts_fingerprint, read_prompt_rows

__all__ = ["BuildPairsConfig", "build_pairs"]

log = logging.getLogger(__name__)

REPORT_NAME = "report.json"
SFT_NAME = "sft.jsonl"
PAIRS_NAME = "pairs.jsonl"
FORMAT_VERSION = 1


@dataclass
class BuildPairsConfig:
    """The options of ``recipes/build_pairs.py`` (see ``configs/build_pairs.yaml``)."""

    data_path: str
    generation_dirs: list[str]
    judge_dir: str
    output_dir: str
    rules: PairRules
    data_split: str | None = None
    policy: RowPolicy = RowPolicy()

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> BuildPairsConfig:
        o = Options(cfg)
        o.required("data.path", "judge_dir", "output_dir")
        rules = PairRules(
            allow_truncated=o.boolean("pairs.allow_truncated", False),
            min_gap=o.number("pairs.min_gap", 0.0),  # type: ignore[arg-type]
            sft_fraction=o.number("split.sft_fraction", 0.5),  # type: ignore[arg-type]
            salt=str(o.get("split.salt", "infifpo")),
        )
        return cls(data_path=str(o.get("data.path")), data_split=o.string("data.split"),
                   generation_dirs=o.paths("generation_dirs"), judge_dir=str(o.get("judge_dir")),
                   output_dir=str(o.get("output_dir")), rules=rules, policy=RowPolicy.from_mapping(o.mapping("data")))


def _grouped(batches: Iterator[dict[str, list[Any]]]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(prompt id, its records) from column batches sorted by prompt id."""
    current: str | None = None
    group: list[dict[str, Any]] = []
    for batch in batches:
        names = list(batch)
        for values in zip(*(batch[n] for n in names), strict=True):
            record = dict(zip(names, values, strict=True))
            if record["prompt_id"] != current:
                if current is not None:
                    yield current, group
                current, group = record["prompt_id"], []
            group.append(record)
    if current is not None:
        yield current, group


class _Cursor:
    """Hands out one prompt's records from a grouped stream, given ids in increasing order."""

    def __init__(self, stream: Iterator[tuple[str, list[dict[str, Any]]]], where: str) -> None:
        self.stream = stream
        self.where = where
        self.head: tuple[str, list[dict[str, Any]]] | None = next(stream, None)

    def take(self, prompt_id: str) -> list[dict[str, Any]]:
        if self.head is not None and self.head[0] < prompt_id:
            raise InputError(f"{self.where}: holds records of prompt {self.head[0]!r}, which is not among the prompts "
                             "(outputs of other prompts: rerun the stage on this data.path)")
        if self.head is None or self.head[0] != prompt_id:
            return []
        records = self.head[1]
        self.head = next(self.stream, None)
        return records


def _inputs_digest(config: BuildPairsConfig, judge_identity: outputs.StageIdentity) -> str:
    record = {"format": FORMAT_VERSION, "judge": judge_identity.digest(), "rules": config.rules.to_dict()}
    return hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()


def build_pairs(config: BuildPairsConfig) -> dict[str, Any]:
    """Write ``sft.jsonl``, ``pairs.jsonl`` and ``report.json``; returns the report."""
    from nemo_infifpo.locking import OutputLock
    from nemo_infifpo.scoring.job import check_output_dir

    started = time.perf_counter()
    output_dir = check_output_dir(config.output_dir)
    read = read_prompt_rows(config.data_path, split=config.data_split, policy=config.policy, stage="build_pairs")
    sources = generation_sources(config.generation_dirs)
    judge_manifest, judge_identity = outputs.complete_manifest(config.judge_dir, stage="judge", role="judge_dir")
    recorded = judge_identity.fields.get("generations")
    current = [[s.name, s.identity.digest()] for s in sources]
    if recorded != current:
        raise InputError(f"judge_dir {config.judge_dir} scored other generation outputs ({recorded}) than "
                         f"generation_dirs ({current}); rerun the judge on these, or pass the ones it scored")
    if judge_identity.fields.get("prompts_fingerprint") != prompts_fingerprint(read.rows, with_extra=True):
        raise InputError(f"judge_dir {config.judge_dir} was computed from other prompts than data.path={config.data_path}")

    digest = _inputs_digest(config, judge_identity)
    report_path = output_dir / REPORT_NAME
    with OutputLock(output_dir / ".build_pairs.lock", stage="build_pairs", output=output_dir):
        if report_path.is_file():
            previous = json.loads(report_path.read_text(encoding="utf-8"))
            if previous.get("inputs_digest") == digest and all((output_dir / n).is_file() for n in (SFT_NAME, PAIRS_NAME)):
                log.info("%s: already built from these inputs, skipping", output_dir)
                return previous
        report = _build(config, read, sources, judge_identity, output_dir)
        report.update(inputs_digest=digest, seconds=round(time.perf_counter() - started, 3),
                      package_version=package_version(),
                      judge_excluded=_judge_exclusions(Path(config.judge_dir), judge_identity),
                      inputs={"data_path": str(Path(config.data_path).resolve()),
                              "generation_dirs": [str(s.directory.resolve()) for s in sources],
                              "judge_dir": str(Path(config.judge_dir).resolve()),
                              "judge": judge_manifest["identity"]["fields"].get("judge")})
        write_json_atomic(report_path, report)
    return report


def _judge_exclusions(judge_dir: Path, identity: outputs.StageIdentity) -> dict[str, Any]:
    """What the judge left out, by reason, with the first few answers."""
    counts: Counter[str] = Counter()
    first: list[dict[str, Any]] = []
    for index in range(identity.shard_count):
        sidecar = outputs.read_sidecar(judge_dir, index, identity.shard_count) or {}
        for entry in sidecar.get("excluded", []):
            counts[entry.get("reason", "?")] += 1
            if len(first) < 5:
                first.append(entry)
    return {"by_reason": dict(counts), "first": first}


def _build(config: BuildPairsConfig, read: Any, sources: list[Any], judge_identity: outputs.StageIdentity,
           output_dir: Path) -> dict[str, Any]:
    generation_columns = ["prompt_id", "sample_index", "text", "finish_reason"]
    cursors = [
        _Cursor(_grouped(outputs.iter_record_batches(s.directory, s.identity, generation_columns)), str(s.directory))
        for s in sources
    ]
    judge_cursor = _Cursor(
        _grouped(outputs.iter_record_batches(config.judge_dir, judge_identity, ["prompt_id", "model", "sample_index", "score"])),
        config.judge_dir,
    )
    prompts_by_reason: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    by_model = {s.name: {"answers": 0, "usable": 0, "chosen": 0, "rejected": 0, "excluded": Counter(), "score": ScoreStats()}
                for s in sources}
    gaps = ScoreStats()
    with atomic_path(output_dir / SFT_NAME) as sft_tmp, atomic_path(output_dir / PAIRS_NAME) as pairs_tmp, \
            sft_tmp.open("w", encoding="utf-8") as sft_file, pairs_tmp.open("w", encoding="utf-8") as pairs_file:
        for row in read.rows:  # sorted by id
            scores = {(r["model"], r["sample_index"]): r["score"] for r in judge_cursor.take(row.id)}
            candidates = []
            for source, cursor in zip(sources, cursors, strict=True):
                for record in sorted(cursor.take(row.id), key=lambda r: r["sample_index"]):
                    key = (source.name, record["sample_index"])
                    candidates.append(Candidate(source.name, int(record["sample_index"]), record["text"],
                                                record["finish_reason"], scores.get(key)))
            selection = select_pair(candidates, config.rules)
            for candidate in candidates:
                stats = by_model[candidate.model]
                stats["answers"] += 1
                if candidate.score is not None:
                    stats["score"].add(candidate.score)
            for candidate in selection.usable:
                by_model[candidate.model]["usable"] += 1
            for candidate, reason in selection.excluded:
                by_model[candidate.model]["excluded"][reason] += 1
            if selection.chosen is None or selection.rejected is None:
                prompts_by_reason[str(selection.prompt_reason)] += 1
                continue
            chosen, rejected = selection.chosen, selection.rejected
            by_model[chosen.model]["chosen"] += 1
            by_model[rejected.model]["rejected"] += 1
            gaps.add(chosen.score - rejected.score)  # type: ignore[operator]
            part = split_part(row.id, config.rules)
            parts[part] += 1
            record = {
                **row.to_record(),
                "chosen": chosen.text,
                "rejected": rejected.text,
                "chosen_model": chosen.model,
                "chosen_index": chosen.sample_index,
                "chosen_score": chosen.score,
                "rejected_model": rejected.model,
                "rejected_index": rejected.sample_index,
                "rejected_score": rejected.score,
            }
            (sft_file if part == "sft" else pairs_file).write(json.dumps(record, ensure_ascii=False) + "\n")
    candidate_reasons: Counter[str] = Counter()
    for stats in by_model.values():
        candidate_reasons.update(stats["excluded"])
    log.info("%d prompts: %d SFT rows, %d preference rows, %d without a pair %s", len(read.rows), parts["sft"],
             parts["preference"], sum(prompts_by_reason.values()), dict(prompts_by_reason))
    return {
        "format_version": FORMAT_VERSION,
        "rules": config.rules.to_dict(),
        "prompts": {
            "read_total": read.total,
            "read_excluded": len(read.excluded),
            "total": len(read.rows),
            "sft": parts["sft"],
            "preference": parts["preference"],
            "excluded": {reason: prompts_by_reason.get(reason, 0) for reason in PROMPT_REASONS},
        },
        "candidates": {
            "total": sum(s["answers"] for s in by_model.values()),
            "usable": sum(s["usable"] for s in by_model.values()),
            "excluded": {reason: candidate_reasons.get(reason, 0) for reason in CANDIDATE_REASONS},
        },
        "models": {
            name: {**{k: v for k, v in s.items() if k not in ("excluded", "score")},
                   "excluded": dict(s["excluded"]), "score": s["score"].to_dict()}
            for name, s in by_model.items()
        },
        "score_gap": gaps.to_dict(),
        "files": {"sft": str(output_dir / SFT_NAME), "pairs": str(output_dir / PAIRS_NAME)},
    }
