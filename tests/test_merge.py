"""Merging scoring outputs into the training set: the report, and every refusal with its message.

Scoring outputs are synthesised here with the real shard/manifest writers (no models), so each
test controls the numbers exactly. The success case uses the test vector of METHOD.md.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nemo_infifpo.data.rows import PreferenceRow, rows_from_records
from nemo_infifpo.data.scored_set import ModelScores, read_scored_set
from nemo_infifpo.data.templates import ExcludedRow
from nemo_infifpo.scoring.manifest import ScoringIdentity, check_or_create_manifest, dataset_fingerprint
from nemo_infifpo.scoring.merge import MergeError, merge_scores, report_path_for
from nemo_infifpo.scoring.shards import ShardScores, refresh_manifest, shard_name, split_rows, write_shard

RECORDS = [
    {"id": f"row{i}", "prompt": f"Question {i}?", "chosen": f"Good answer {i}.", "rejected": f"Bad {i}."}
    for i in range(6)
]
ROWS = rows_from_records(RECORDS)

# METHOD.md's test vector (length-normalised scores) for row0; T = 10 tokens everywhere.
P0 = (-0.06974949687719345, -0.13944919407367706)
SOURCES = {
    "a": (-0.2378779649734497, -0.25559499859809875),
    "b": (-0.2621479332447052, -0.2677876949310303),
    "c": (-0.3679310381412506, -0.3368484675884247),
}
T = 10


def _identity(rows: list[PreferenceRow], **changes) -> ScoringIdentity:
    identity = ScoringIdentity(
        model_fingerprint="m" * 64,
        tokenizer_fingerprint="t" * 64,
        dataset_fingerprint=dataset_fingerprint(rows),
        max_length=4096,
        dtype="bfloat16",
        backend="megatron",
        shard_count=2,
    )
    return replace(identity, **changes)


def make_scores(
    directory: Path,
    means: dict[str, tuple[float, float]],
    *,
    rows: list[PreferenceRow] = ROWS,
    excluded: tuple[str, ...] = (),
    shard_count: int = 2,
    **identity_changes,
) -> Path:
    """A complete scoring output: ``means[id] = (chosen mean, rejected mean)``, T tokens each.
    Rows not in ``means`` and not ``excluded`` are simply absent."""
    identity = _identity(rows, shard_count=shard_count, **identity_changes)
    check_or_create_manifest(directory, identity, {"model_path": f"/models/{directory.name}"}, create=True)
    for index, shard_rows in enumerate(split_rows(rows, shard_count)):
        ids = [r.id for r in shard_rows if r.id in means and r.id not in excluded]
        scores = ShardScores(
            ids=ids,
            scores=ModelScores(
                chosen_logps=np.array([means[i][0] * T for i in ids], dtype=np.float64),
                rejected_logps=np.array([means[i][1] * T for i in ids], dtype=np.float64),
                chosen_tokens=np.full(len(ids), T, dtype=np.int64),
                rejected_tokens=np.full(len(ids), T, dtype=np.int64),
            ),
        )
        gone = [
            ExcludedRow(r.id, "longer than max_length=4096 tokens", 5000, 10, 4096)
            for r in shard_rows
            if r.id in excluded
        ]
        write_shard(directory, index, shard_count, identity, scores, gone, len(shard_rows))
    refresh_manifest(directory)
    return directory


def _default_means(pivot: bool = False, source: str = "a") -> dict[str, tuple[float, float]]:
    means = {r.id: (-0.5 - 0.01 * i, -0.9 - 0.01 * i) for i, r in enumerate(ROWS)}
    means["row0"] = P0 if pivot else SOURCES[source]
    return means


@pytest.fixture()
def setup(tmp_path: Path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    pivot = make_scores(tmp_path / "pivot", _default_means(pivot=True))
    sources = [
        make_scores(tmp_path / name, _default_means(source=name), excluded=("row3",) if name == "b" else ())
        for name in SOURCES
    ]
    return tmp_path, data, pivot, sources


def test_merge_writes_training_set_and_report(setup) -> None:
    tmp_path, data, pivot, sources = setup
    out = tmp_path / "train.parquet"
    report = merge_scores(data, pivot, sources, out)

    scored = read_scored_set(out)
    assert scored.source_names == ("a", "b", "c")  # default: directory names, in order
    assert scored.ids == ["row0", "row1", "row2", "row4", "row5"]  # data order; row3 excluded
    assert [r.id for r in scored.rows()] == scored.ids
    assert scored.rows()[0] == ROWS[0]
    means = scored.scores(length_norm=True)
    np.testing.assert_allclose(means["ref_chosen"][0].item(), P0[0], rtol=1e-12)
    np.testing.assert_allclose(
        means["source_rejected"][0].numpy(), [v[1] for v in SOURCES.values()], rtol=1e-12
    )
    sums = scored.scores(length_norm=False)
    np.testing.assert_allclose(sums["ref_chosen"][0].item(), P0[0] * T, rtol=1e-12)
    assert scored.metadata["dataset_fingerprint"] == dataset_fingerprint(ROWS)
    assert scored.metadata["pivot"]["model_path"] == "/models/pivot"
    assert [s["name"] for s in scored.metadata["sources"]] == ["a", "b", "c"]

    assert json.loads(report_path_for(out).read_text()) == json.loads(json.dumps(report))
    assert (report["rows_in"], report["rows_out"], report["rows_excluded"]) == (6, 5, 1)
    assert report["excluded"] == [
        {"id": "row3", "excluded_by": {"b": "max_length"}, "details": {"b": "longer than max_length=4096 tokens"}}
    ]
    assert report["excluded_by_model"] == {"pivot": {}, "a": {}, "b": {"max_length": 1}, "c": {}}
    assert report["rows_invalid"] == 0 and report["read_excluded"] == []
    preview = report["length_normalised"]
    assert preview["mean_score"]["a"]["chosen"] == pytest.approx(float(means["source_chosen"][:, 0].mean()))
    # Other rows: sources and pivot share the scores, so nothing is clipped and max_margin's
    # tie goes to the first source; row0 is METHOD.md's vector: source c wins, and clipping
    # raises all three chosen scores (3 of 6 of that row's source scores).
    assert preview["max_margin_selection"]["counts"] == {"a": 4, "b": 0, "c": 1, "pivot": 0}
    assert preview["clipped_fraction"]["overall"] == pytest.approx(0.5 / 5)
    assert preview["clipped_fraction"]["per_source"] == pytest.approx({"a": 0.1, "b": 0.1, "c": 0.1})
    assert set(report["sums"]) == {"mean_score", "clipped_fraction", "max_margin_selection"}


def test_shard_files_keep_their_documented_columns(setup) -> None:
    """The shard Parquet layout is a public contract (scoring/shards.py, README)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp_path, data, pivot, sources = setup
    schema = pq.read_schema(pivot / f"{shard_name(0, 2)}.parquet")
    assert [(f.name, f.type) for f in schema] == [
        ("id", pa.string()),
        ("chosen_logps", pa.float64()),
        ("rejected_logps", pa.float64()),
        ("chosen_tokens", pa.int64()),
        ("rejected_tokens", pa.int64()),
    ]


def test_merge_is_deterministic(setup) -> None:
    tmp_path, data, pivot, sources = setup
    merge_scores(data, pivot, sources, tmp_path / "one.parquet", source_names=["x", "y", "z"])
    merge_scores(data, pivot, sources, tmp_path / "two.parquet", source_names=["x", "y", "z"])
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert read_scored_set(tmp_path / "one.parquet").source_names == ("x", "y", "z")


def _fails(data: Path, pivot: Path, sources: list[Path], out: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(MergeError) as info:
        merge_scores(data, pivot, sources, out, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert not out.exists()
    return message


def test_missing_shard(setup) -> None:
    tmp_path, data, pivot, sources = setup
    name = shard_name(1, 2)
    (sources[1] / f"{name}.json").unlink()
    (sources[1] / f"{name}.parquet").unlink()
    _fails(
        data,
        pivot,
        sources,
        tmp_path / "o.parquet",
        "b (",
        str(sources[1]),
        "incomplete",
        f"{name}: not computed yet",
        "rerun",
    )


def test_shard_parquet_changed_after_scoring(setup) -> None:
    tmp_path, data, pivot, sources = setup
    name = shard_name(0, 2)
    make_scores(tmp_path / "other", _default_means(source="c"))
    (pivot / f"{name}.parquet").write_bytes((tmp_path / "other" / f"{name}.parquet").read_bytes())
    _fails(
        data, pivot, sources, tmp_path / "o.parquet", "pivot (", f"{name}.parquet does not match the checksum"
    )


def test_shards_of_one_model_with_different_fingerprints(setup) -> None:
    tmp_path, data, pivot, sources = setup
    other = make_scores(tmp_path / "other", _default_means(source="a"), model_fingerprint="f" * 64)
    name = shard_name(1, 2)
    for suffix in (".json", ".parquet"):
        (sources[0] / f"{name}{suffix}").write_bytes((other / f"{name}{suffix}").read_bytes())
    _fails(
        data,
        pivot,
        sources,
        tmp_path / "o.parquet",
        "a (",
        f"{name}.json was computed from other inputs",
        "model_fingerprint",
        "mixes two scoring runs",
    )


def test_stray_shards_of_another_shard_count(setup) -> None:
    tmp_path, data, pivot, sources = setup
    other = make_scores(tmp_path / "other", _default_means(source="c"), shard_count=3)
    for file in other.glob("shard-00000-of-00003.*"):
        (sources[2] / file.name).write_bytes(file.read_bytes())
    _fails(
        data,
        pivot,
        sources,
        tmp_path / "o.parquet",
        "c (",
        "shard-00000-of-00003.json",
        "another shard count",
    )


def test_id_missing_from_a_source(setup) -> None:
    tmp_path, data, pivot, sources = setup
    means = _default_means(source="b")
    del means["row4"]
    broken = make_scores(tmp_path / "b2", means)
    _fails(data, pivot, [sources[0], broken], tmp_path / "o.parquet", "b2 (", "id 'row4'", "has no score")


def test_id_scored_twice(setup) -> None:
    tmp_path, data, pivot, sources = setup
    first, second = split_rows(ROWS, 2)
    # Shard 1 also scores the first id of shard 0.
    twice = make_scores(tmp_path / "twice", _default_means(), rows=ROWS)
    identity = _identity(ROWS)
    ids = [first[0].id] + [r.id for r in second]
    write_shard(
        twice,
        1,
        2,
        identity,
        ShardScores(
            ids, ModelScores(np.full(len(ids), -5.0), np.full(len(ids), -6.0), np.full(len(ids), 3), np.full(len(ids), 4))
        ),
        [],
        len(second),
    )
    _fails(
        data,
        pivot,
        [twice],
        tmp_path / "o.parquet",
        "twice (",
        f"id {first[0].id!r} scored twice",
        "shard-00001-of-00002.parquet",
        "shard-00000-of-00002.parquet",
    )


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_score(setup, value: float) -> None:
    tmp_path, data, pivot, sources = setup
    means = _default_means(source="c")
    means["row2"] = (means["row2"][0], value)
    broken = make_scores(tmp_path / "nan", means)
    _fails(
        data, pivot, [broken], tmp_path / "o.parquet", "nan (", "id 'row2'", "'rejected_logps'", "non-finite"
    )


def test_zero_token_count(setup) -> None:
    tmp_path, data, pivot, sources = setup
    zero = make_scores(tmp_path / "zero", _default_means())
    identity = _identity(ROWS)
    shard = split_rows(ROWS, 2)[0]
    ids = [r.id for r in shard]
    write_shard(
        zero,
        0,
        2,
        identity,
        ShardScores(
            ids,
            ModelScores(
                np.full(len(ids), -5.0),
                np.full(len(ids), -6.0),
                np.array([3] * (len(ids) - 1) + [0]),
                np.full(len(ids), 4),
            ),
        ),
        [],
        len(shard),
    )
    _fails(
        data,
        pivot,
        [zero],
        tmp_path / "o.parquet",
        "zero (",
        f"id {ids[-1]!r}",
        "'chosen_tokens'",
        "token count 0",
    )


def test_source_scored_on_a_different_dataset(setup) -> None:
    tmp_path, data, pivot, sources = setup
    other_rows = rows_from_records(RECORDS[:-1] + [{**RECORDS[-1], "chosen": "Something else."}])
    means = {r.id: (-1.0, -2.0) for r in other_rows}
    elsewhere = make_scores(tmp_path / "elsewhere", means, rows=other_rows)
    _fails(
        data,
        pivot,
        [sources[0], elsewhere],
        tmp_path / "o.parquet",
        "elsewhere (",
        "scored on a different dataset",
        "dataset fingerprint",
    )


def test_missing_directory_and_manifest(setup) -> None:
    tmp_path, data, pivot, sources = setup
    _fails(data, pivot, [tmp_path / "nowhere"], tmp_path / "o.parquet", "nowhere", "not found")
    (tmp_path / "empty").mkdir()
    _fails(data, pivot, [tmp_path / "empty"], tmp_path / "o.parquet", "empty", "no manifest.json")


def test_bad_source_names(setup) -> None:
    tmp_path, data, pivot, sources = setup
    _fails(data, pivot, sources[:2], tmp_path / "o.parquet", "unique", source_names=["x", "x"])
    _fails(data, pivot, sources[:2], tmp_path / "o.parquet", "2 source_dirs", source_names=["x"])
    _fails(data, pivot, sources[:1], tmp_path / "o.parquet", "reserved", source_names=["pivot"])
