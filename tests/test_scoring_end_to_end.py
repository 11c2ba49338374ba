"""Scoring a pivot and two sources with different tokenizers and chat templates, end to end.

The reference is an independent plain-transformers computation (tests/workers/scoring_common.py:
apply_chat_template, model forward, log_softmax, gather, sum). Checked here:

- the hf back end reproduces it for all three models (float32, <= 1e-4 abs);
- the megatron back end, run through ``python recipes/score.py``, reproduces it and agrees with
  the hf back end on the same model;
- a 3-shard run and a 2-rank run (megatron data-parallel + hf data-parallel) give the same
  training set as single runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from torchrun import run_torchrun
from workers.scoring_common import (
    PIVOT_MAX_LENGTH,
    REPO,
    ROWS,
    SOURCE_MAX_LENGTH,
    build_models,
    reference_scores,
    run_score_recipe,
    score_args,
    write_data,
)

from nemo_infifpo.data.scored_set import read_scored_set
from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
from nemo_infifpo.scoring.merge import load_score_dir, merge_scores

TOLERANCE = 1e-4
MAX_LENGTH = {"pivot": PIVOT_MAX_LENGTH, "qwen": SOURCE_MAX_LENGTH, "llama": SOURCE_MAX_LENGTH}
# Small batches, so every run has several batches of different padded lengths.
MAX_TOKENS = 400


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("scoring_e2e")
    dirs = build_models(root / "models")
    data = write_data(root / "data.jsonl")
    references = {name: reference_scores(path, ROWS, MAX_LENGTH[name]) for name, path in dirs.items()}
    return SimpleNamespace(root=root, dirs=dirs, data=data, references=references)


def _config(assets: SimpleNamespace, name: str, output: Path, **overrides) -> ScoreConfig:
    fields = dict(
        model_path=str(assets.dirs[name]),
        data_path=str(assets.data),
        output_dir=str(output),
        backend="hf",
        dtype="float32",
        max_length=MAX_LENGTH[name],
        max_tokens=MAX_TOKENS,
        progress=False,
    )
    fields.update(overrides)
    return ScoreConfig(**fields)


@pytest.fixture(scope="module")
def hf_runs(assets: SimpleNamespace) -> dict[str, Path]:
    """Single-process hf runs of all three models (in this process: no process group needed)."""
    outputs = {}
    for name in assets.dirs:
        outputs[name] = assets.root / "single" / f"{name}_hf"
        run_scoring(_config(assets, name, outputs[name]))
    return outputs


def _by_id(directory: Path) -> tuple[dict, dict]:
    loaded = load_score_dir(directory, directory.name)
    return {row_id: loaded.pair(row_id) for row_id in loaded.positions}, loaded.excluded


def _assert_matches_reference(directory: Path, reference: dict) -> float:
    scores, excluded = _by_id(directory)
    worst = 0.0
    for row_id, expected in reference.items():
        if expected is None:
            assert row_id in excluded and excluded[row_id].reason == "max_length", row_id
            continue
        got = scores[row_id]
        assert got[2:] == expected[2:], (row_id, got, expected)  # token counts, exactly
        worst = max(worst, abs(got[0] - expected[0]), abs(got[1] - expected[1]))
    assert set(scores) | set(excluded) == set(reference)
    assert worst <= TOLERANCE, worst
    return worst


def test_hf_backend_matches_plain_transformers(assets: SimpleNamespace, hf_runs: dict[str, Path]) -> None:
    errors = {name: _assert_matches_reference(hf_runs[name], assets.references[name]) for name in hf_runs}
    print("max abs error vs transformers (hf back end):", errors)
    # The three tokenizers really differ: the same response has different token counts.
    counts = {name: _by_id(path)[0]["capital"][2] for name, path in hf_runs.items()}
    assert len(set(counts.values())) > 1, counts
    # The long row is excluded by the sources' max_length only, and the sidecar says why.
    sidecar = json.loads((hf_runs["qwen"] / "shard-00000-of-00001.json").read_text())
    assert [e["id"] for e in sidecar["excluded"]] == ["long"]
    assert sidecar["excluded"][0]["max_length"] == SOURCE_MAX_LENGTH
    assert "long" not in _by_id(hf_runs["pivot"])[1]


def _score_pivot_with_megatron(assets: SimpleNamespace, output: Path, **options) -> Path:
    """``python recipes/score.py`` on the pivot with the megatron back end."""
    run_score_recipe(
        score_args(
            assets.dirs["pivot"],
            assets.data,
            output,
            model__backend="megatron",
            data__max_length=PIVOT_MAX_LENGTH,
            batch__max_tokens=MAX_TOKENS,
            **options,
        )
    )
    return output


@pytest.mark.slow
def test_megatron_recipe_matches_transformers_and_hf(
    assets: SimpleNamespace, hf_runs: dict[str, Path]
) -> None:
    output = _score_pivot_with_megatron(assets, assets.root / "single" / "pivot_megatron")
    error = _assert_matches_reference(output, assets.references["pivot"])
    print("max abs error vs transformers (megatron back end):", error)
    megatron, _ = _by_id(output)
    hf, _ = _by_id(hf_runs["pivot"])
    assert megatron.keys() == hf.keys()
    gap = max(abs(megatron[i][k] - hf[i][k]) for i in hf for k in (0, 1))
    print("max abs megatron vs hf:", gap)
    assert gap <= TOLERANCE
    assert all(megatron[i][2:] == hf[i][2:] for i in hf)

    # batch.packing=true: the same scores from packed micro-batches.
    packed_output = _score_pivot_with_megatron(
        assets, assets.root / "single" / "pivot_megatron_packed", batch__packing="true"
    )
    packed, _ = _by_id(packed_output)
    assert packed.keys() == megatron.keys()
    assert all(packed[i][2:] == megatron[i][2:] for i in megatron)
    assert max(abs(packed[i][k] - megatron[i][k]) for i in megatron for k in (0, 1)) <= TOLERANCE
    assert json.loads((packed_output / "shard-00000-of-00001.json").read_text())["run"]["packing"] is True


def _merge(assets: SimpleNamespace, pivot: Path, qwen: Path, llama: Path, out: Path):
    merge_scores(assets.data, pivot, [qwen, llama], out, source_names=["qwen", "llama"])
    return read_scored_set(out)


def _assert_same_training_set(a, b) -> None:
    assert a.ids == b.ids
    assert a.source_names == b.source_names
    assert a.rows() == b.rows()
    for length_norm in (False, True):
        sa, sb = a.scores(length_norm), b.scores(length_norm)
        for key in sa:
            np.testing.assert_allclose(sa[key].numpy(), sb[key].numpy(), rtol=0, atol=TOLERANCE)
    ta, tb = a.token_counts(), b.token_counts()
    for key in ta:
        assert ta[key].tolist() == tb[key].tolist(), key


@pytest.mark.slow
def test_sharded_and_two_rank_runs_give_the_same_training_set(
    assets: SimpleNamespace, hf_runs: dict[str, Path]
) -> None:
    single_pivot = assets.root / "single" / "pivot_megatron"
    if not (single_pivot / "manifest.json").exists():  # when run on its own
        _score_pivot_with_megatron(assets, single_pivot)
    single = _merge(assets, single_pivot, hf_runs["qwen"], hf_runs["llama"], assets.root / "single.parquet")
    assert "long" not in single.ids and len(single) == len(ROWS) - 1

    # Three shards, each computed by its own job (as Slurm array tasks would), in one process.
    sharded_dirs = {name: assets.root / "sharded" / name for name in assets.dirs}
    jobs = [
        vars(
            _config(
                assets,
                name,
                sharded_dirs[name],
                backend="megatron" if name == "pivot" else "hf",
                shard_count=3,
                shard_index=index,
            )
        )
        for name in assets.dirs
        for index in range(3)
    ]
    jobs_file = assets.root / "sharded_jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    run_score_recipe([str(jobs_file)], script=REPO / "tests" / "workers" / "scoring_jobs.py")
    assert len(list(sharded_dirs["pivot"].glob("shard-*-of-00003.parquet"))) == 3
    sharded = _merge(assets, *sharded_dirs.values(), assets.root / "sharded.parquet")
    _assert_same_training_set(single, sharded)

    # Two ranks: megatron data-parallel for the pivot, hf data-parallel for the sources; then
    # the pivot again over a 2-stage pipeline (micro-batches, last-stage broadcast).
    rank_dirs = {name: assets.root / "two_ranks" / name for name in assets.dirs}
    jobs = [
        vars(_config(assets, name, rank_dirs[name], backend="megatron" if name == "pivot" else "hf"))
        for name in assets.dirs
    ]
    pipeline_dir = assets.root / "two_ranks" / "pivot_pp2"
    jobs.append(
        vars(_config(assets, "pivot", pipeline_dir, backend="megatron", pipeline_model_parallel_size=2))
    )
    jobs_file = assets.root / "rank_jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    run_torchrun("scoring_jobs.py", str(jobs_file), nproc=2, timeout=400)
    for name, directory in rank_dirs.items():
        run = json.loads((directory / "shard-00000-of-00001.json").read_text())["run"]
        assert (run["world_size"], run["data_parallel_size"]) == (2, 2), (name, run)
        assert run["batches"] >= 2, (name, run)  # both ranks had work
    two_ranks = _merge(assets, *rank_dirs.values(), assets.root / "two_ranks.parquet")
    _assert_same_training_set(single, two_ranks)
    run = json.loads((pipeline_dir / "shard-00000-of-00001.json").read_text())["run"]
    assert (run["data_parallel_size"], run["pipeline_model_parallel_size"]) == (1, 2), run
    pipeline = _merge(
        assets, pipeline_dir, rank_dirs["qwen"], rank_dirs["llama"], assets.root / "pp2.parquet"
    )
    _assert_same_training_set(single, pipeline)
