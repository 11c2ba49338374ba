"""Resuming a killed scoring job, and refusing to mix scores of different inputs.

- SIGKILL a 4-shard job once its first shard is on disk; the rerun computes only the missing
  shards (log, sidecar mtimes), and the merged training set is byte-identical to the one from
  an uninterrupted job.
- A rerun with any other input (data, max_length, tokenizer template, dtype, model weights)
  refuses with an error naming the field, and says how to start fresh.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from workers.scoring_common import (
    REPO,
    ROWS,
    run_score_recipe,
    score_args,
    subprocess_env,
    write_data,
)

from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
from nemo_infifpo.scoring.manifest import ScoringMismatchError
from nemo_infifpo.scoring.merge import merge_scores

SHARDS = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("scoring_resume")
    from nemo_infifpo.testing.models import save_tiny_hf_model

    model = save_tiny_hf_model("qwen2", root / "qwen", seed=2)
    data = write_data(root / "data.jsonl")
    return SimpleNamespace(root=root, model=model, data=data)


def _sidecars(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"shard-*-of-{SHARDS:05d}.json"))


@pytest.mark.slow
def test_killed_job_resumes_only_missing_shards_and_merges_identically(assets: SimpleNamespace) -> None:
    args = dict(model__backend="hf", shard__count=SHARDS, batch__max_tokens=150, data__max_length=200)
    killed = assets.root / "killed"
    # Every batch sleeps 0.7 s, so the job is still working on shard 1 when shard 0 lands.
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "workers" / "scoring_slow.py"),
            "0.7",
            *score_args(assets.model, assets.data, killed, **args),
        ],
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not _sidecars(killed):
            assert proc.poll() is None, f"job ended before its first shard:\n{proc.stderr.read()[-4000:]}"
            assert time.monotonic() < deadline, "no shard after 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    done_before = {p.name: p.stat().st_mtime_ns for p in _sidecars(killed)}
    parquet_before = {
        p.name: p.stat().st_mtime_ns
        for p in killed.glob("shard-*.parquet")
        if p.with_suffix(".json").exists()
    }
    assert 1 <= len(done_before) < SHARDS, done_before
    manifest = json.loads((killed / "manifest.json").read_text())
    # The kill may land between a shard's sidecar and the manifest's summary refresh: the
    # sidecars are authoritative, the summary only never claims completeness it lacks.
    assert manifest.get("complete") is not True

    resumed = run_score_recipe(score_args(assets.model, assets.data, killed, **args))
    for name in done_before:
        stem = name.removesuffix(".json")
        assert f"{stem}: complete, skipping" in resumed.stderr
    computed = [line for line in resumed.stderr.splitlines() if ": to compute" in line]
    assert len(computed) == SHARDS - len(done_before), computed
    # Finished shards were not rewritten.
    assert {p.name: p.stat().st_mtime_ns for p in _sidecars(killed) if p.name in done_before} == done_before
    assert {n: (killed / n).stat().st_mtime_ns for n in parquet_before} == parquet_before
    assert len(_sidecars(killed)) == SHARDS
    assert json.loads((killed / "manifest.json").read_text())["complete"] is True

    # A third run has nothing to do (and returns before loading the model).
    config = dict(shard_count=SHARDS, max_tokens=150)
    again = run_scoring(_config(assets, killed, **config))
    assert again.shards_skipped == list(range(SHARDS)) and again.shards_computed == []

    # The uninterrupted job, in this process with the subprocesses' single thread (bitwise
    # equality needs the same kernels and reduction order).
    clean = assets.root / "clean"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_scoring(_config(assets, clean, **config))
    finally:
        torch.set_num_threads(threads)
    merge_scores(assets.data, killed, [], assets.root / "resumed.parquet")
    merge_scores(assets.data, clean, [], assets.root / "clean.parquet")
    assert (assets.root / "resumed.parquet").read_bytes() == (assets.root / "clean.parquet").read_bytes()


def _config(assets: SimpleNamespace, output: Path, **overrides) -> ScoreConfig:
    fields = dict(
        model_path=str(assets.model),
        data_path=str(assets.data),
        output_dir=str(output),
        backend="hf",
        dtype="float32",
        max_length=200,
        progress=False,
    )
    fields.update(overrides)
    return ScoreConfig(**fields)


def test_rerun_with_other_inputs_is_refused(assets: SimpleNamespace) -> None:
    output = assets.root / "refuse"
    run_scoring(_config(assets, output, shard_count=2))

    def refused(config: ScoreConfig, *fields: str) -> str:
        with pytest.raises(ScoringMismatchError) as info:
            run_scoring(config)
        message = str(info.value)
        for field in fields:
            assert field in message, message
        assert "new output_dir" in message and "delete" in message
        return message

    refused(_config(assets, output, shard_count=2, max_length=150), "max_length: 200 vs 150")
    refused(_config(assets, output, shard_count=3), "shard_count: 2 vs 3")
    refused(_config(assets, output, shard_count=2, dtype="bfloat16"), "dtype")
    refused(_config(assets, output, shard_count=2, chat_template="plain"), "tokenizer_fingerprint")

    other_data = write_data(assets.root / "other.jsonl", ROWS[:-1])
    message = refused(
        _config(assets, output, shard_count=2, data_path=str(other_data)), "dataset_fingerprint"
    )
    assert "model_fingerprint" not in message  # only what differs is named

    # Different weights under the same path (the config is unchanged; the weights are not).
    moved = assets.root / "qwen_other"
    shutil.copytree(assets.model, moved)
    from nemo_infifpo.testing.models import save_tiny_hf_model

    save_tiny_hf_model("qwen2", moved, seed=5, max_shard_size="30KB")
    refused(_config(assets, output, shard_count=2, model_path=str(moved)), "model_fingerprint")

    # The same inputs resume (nothing left to compute).
    summary = run_scoring(_config(assets, output, shard_count=2))
    assert summary.shards_skipped == [0, 1] and summary.shards_computed == []


# --------------------------------------------------------------------------- locks and leftovers


def test_a_shard_another_job_is_computing_is_refused_and_stale_temporaries_go(assets: SimpleNamespace) -> None:
    """A duplicate array task must not compute a shard another live job holds; once that job
    is gone, the shard is computed and temporaries of killed writes are removed."""
    import os

    from nemo_infifpo.locking import OutputLock, OutputLockedError

    output = assets.root / "locked"
    output.mkdir()
    stale = output / ".shard-00001-of-00002.parquet.abc123.tmp"
    stale.write_bytes(b"half a parquet file")
    holder = OutputLock(output / ".lock.shard-00001-of-00002", stage="scoring").acquire()
    try:
        with pytest.raises(OutputLockedError, match=rf"shard-00001-of-00002.parquet is in use by the scoring run of process {os.getpid()}"):
            run_scoring(_config(assets, output, shard_count=2))
        assert not (output / "shard-00000-of-00002.json").exists()  # all or nothing: no shard computed
    finally:
        holder.release()
    summary = run_scoring(_config(assets, output, shard_count=2))
    assert summary.shards_computed == [0, 1] and not stale.exists()
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == []  # no lock or temporary left


_MANIFEST_RACE = r"""
import sys, time
from nemo_infifpo.scoring.manifest import ScoringIdentity, ScoringMismatchError, check_or_create_manifest
identity = ScoringIdentity("m", "t", sys.argv[3], 100, "float32", "hf", 2)
while time.time() < float(sys.argv[2]):
    pass
try:
    check_or_create_manifest(sys.argv[1], identity, {}, create=True)
    print("created-or-matched")
except ScoringMismatchError:
    print("refused")
"""


def test_jobs_with_different_inputs_starting_together_cannot_both_claim_a_directory(tmp_path: Path) -> None:
    start = str(time.time() + 3)
    procs = [
        subprocess.Popen([sys.executable, "-c", _MANIFEST_RACE, str(tmp_path), start, f"data-{i}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
        for i in range(4)
    ]
    outcomes = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert sorted(outcomes) == ["created-or-matched"] + ["refused"] * 3, outcomes


def test_a_second_merge_into_the_same_file_is_refused(tmp_path: Path) -> None:
    from nemo_infifpo.locking import OutputLock, OutputLockedError, sibling_lock_path

    output = tmp_path / "train.scored.parquet"
    with OutputLock(sibling_lock_path(output), stage="merge"):
        with pytest.raises(OutputLockedError, match="train.scored.parquet is in use by the merge run"):
            merge_scores(tmp_path / "data.jsonl", tmp_path / "pivot", [], output)
    assert not output.exists()
