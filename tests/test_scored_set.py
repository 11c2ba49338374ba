"""The scored training set: writing/reading the native Parquet format, the paper's row format,
and validation errors that name the file, row, id and column."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nemo_infifpo.data.rows import rows_from_records
from nemo_infifpo.data.scored_set import (
    METADATA_KEY,
    ModelScores,
    ScoredSetError,
    read_scored_set,
    write_scored_set,
)
from nemo_infifpo.loss import infifpo_loss

ROWS = rows_from_records(
    [
        {"id": "a", "prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {
            "id": "b",
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
            "chosen": "Hello.",
            "rejected": "Go away.",
        },
        {"id": "c", "prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
    ]
)
REF = ModelScores.from_lists([-3.0, -6.0, -1.5], [-8.0, -9.0, -7.5], [3, 4, 5], [2, 6, 3])
SOURCES = [
    ModelScores.from_lists([-4.0, -5.0, -2.0], [-6.0, -12.0, -9.0], [4, 5, 2], [3, 6, 4]),
    ModelScores.from_lists([-2.5, -7.0, -3.3], [-9.5, -8.0, -6.6], [5, 7, 3], [5, 5, 3]),
]


def _write(path: Path, **kwargs) -> Path:
    return write_scored_set(
        path,
        ROWS,
        REF,
        SOURCES,
        source_names=["qwen", "gemma"],
        pivot_fingerprints={"model_fingerprint": "p"},
        source_fingerprints=[{"model_fingerprint": "q"}, {"model_fingerprint": "g"}],
        dataset_fingerprint="d",
        **kwargs,
    )


def test_native_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.parquet")
    scored = read_scored_set(path)
    assert scored.format == "native"
    assert scored.source_names == ("qwen", "gemma")
    assert scored.ids == ["a", "b", "c"]
    assert scored.rows() == ROWS
    assert scored.rows([2, 0]) == [ROWS[2], ROWS[0]]
    meta = scored.metadata
    assert meta["format_version"] == 1 and meta["dataset_fingerprint"] == "d"
    assert meta["pivot"] == {"model_fingerprint": "p"}
    assert [s["name"] for s in meta["sources"]] == ["qwen", "gemma"]
    assert meta["package_version"]

    sums = scored.scores(length_norm=False)
    assert sums["ref_chosen"].dtype == torch.float64
    assert sums["ref_chosen"].tolist() == REF.chosen_logps.tolist()
    assert sums["source_rejected"].shape == (3, 2)
    assert sums["source_rejected"][:, 1].tolist() == SOURCES[1].rejected_logps.tolist()
    # Means: each model divides by ITS OWN token count.
    means = scored.scores(length_norm=True, indices=torch.tensor([1]))
    assert means["ref_chosen"].tolist() == [-6.0 / 4]
    assert means["source_chosen"].tolist() == [[-5.0 / 5, -7.0 / 7]]
    assert scored.scores(True, dtype=torch.float32)["ref_rejected"].dtype == torch.float32
    counts = scored.token_counts([0, 2])
    assert counts["source_rejected"].tolist() == [[3, 5], [4, 3]]
    # Ready for the loss as is.
    s = scored.scores(length_norm=True)
    losses, _ = infifpo_loss(
        s["ref_chosen"],
        s["ref_rejected"],
        s["ref_chosen"],
        s["ref_rejected"],
        s["source_chosen"],
        s["source_rejected"],
        beta=0.1,
    )
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def test_schema_and_deterministic_bytes(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.parquet")
    two = _write(tmp_path / "two.parquet")
    assert one.read_bytes() == two.read_bytes()
    schema = pq.read_schema(one)
    message = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert schema.field("prompt").type == message and schema.field("chosen").type == message
    assert schema.field("ref_chosen_logps").type == pa.float64()
    assert schema.field("ref_chosen_tokens").type == pa.int64()
    assert schema.field("source_chosen_logps").type == pa.list_(pa.float64())
    assert schema.field("source_rejected_tokens").type == pa.list_(pa.int64())
    assert json.loads(schema.metadata[METADATA_KEY])["source_names"] == ["qwen", "gemma"]
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind


def test_no_sources(tmp_path: Path) -> None:
    path = write_scored_set(tmp_path / "dpo.parquet", ROWS, REF, [], source_names=[])
    scored = read_scored_set(path)
    assert scored.scores(True)["source_chosen"].shape == (3, 0)


def test_write_validates(tmp_path: Path) -> None:
    bad = ModelScores.from_lists([-4.0, math.nan, -2.0], [-6.0, -12.0, -9.0], [4, 5, 2], [3, 6, 4])
    with pytest.raises(ScoredSetError, match=r"row 2 \(id 'b'\), column 'source_chosen_logps\[1\]'.*finite"):
        write_scored_set(tmp_path / "x.parquet", ROWS, REF, [SOURCES[0], bad], source_names=["q", "g"])
    with pytest.raises(ScoredSetError, match="2 source score sets but 1 source_names"):
        write_scored_set(tmp_path / "x.parquet", ROWS, REF, SOURCES, source_names=["q"])
    assert not (tmp_path / "x.parquet").exists()


# --------------------------------------------------------------------------- corrupt native files


def _rewrite(path: Path, column: str, values: list, type_=None) -> Path:
    table = pq.read_table(path)
    index = table.column_names.index(column)
    field = table.schema.field(index)
    table = table.set_column(index, field, pa.array(values, type=type_ or field.type))
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    ("column", "values", "expected"),
    [
        (
            "ref_chosen_logps",
            [-1.0, float("nan"), -2.0],
            r"row 2 \(id 'b'\), column 'ref_chosen_logps'.*finite, got nan",
        ),
        (
            "ref_rejected_logps",
            [-1.0, -2.0, float("-inf")],
            r"row 3 \(id 'c'\), column 'ref_rejected_logps'.*-inf",
        ),
        ("ref_chosen_tokens", [3, 0, 5], r"row 2 \(id 'b'\), column 'ref_chosen_tokens'.*>= 1, got 0"),
        (
            "source_rejected_tokens",
            [[3, 5], [6, -1], [4, 3]],
            r"row 2 \(id 'b'\), column 'source_rejected_tokens\[1\]'.*got -1",
        ),
        (
            "source_chosen_logps",
            [[-1.0, -2.0], [-1.0], [-1.0, -2.0]],
            r"row 2 \(id 'b'\), column 'source_chosen_logps': 1 entries, but there are 2 sources",
        ),
        (
            "source_chosen_logps",
            [[-1.0, -2.0], None, [-1.0, -2.0]],
            r"row 2 \(id 'b'\), column 'source_chosen_logps': expected a list",
        ),
        ("id", ["a", "b", "a"], r"row 3: duplicate id 'a' \(also at row 1\)"),
    ],
)
def test_native_validation_errors(tmp_path: Path, column: str, values: list, expected: str) -> None:
    path = _rewrite(_write(tmp_path / "t.parquet"), column, values)
    with pytest.raises(ScoredSetError, match=expected) as info:
        read_scored_set(path)
    assert str(path) in str(info.value)


def test_native_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "t.parquet")
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["ref_rejected_tokens"]), path)
    with pytest.raises(ScoredSetError, match=r"t.parquet: missing column\(s\) 'ref_rejected_tokens'"):
        read_scored_set(path)


def test_not_a_scored_set(tmp_path: Path) -> None:
    # Training falls back to plain preference rows (SFT) on ScoredSetError: every readable
    # non-scored input must raise exactly that.
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n")
    with pytest.raises(ScoredSetError, match="not a scored set"):
        read_scored_set(path)
    with pytest.raises(ScoredSetError, match="a directory, but not a `datasets` saved directory"):
        read_scored_set(tmp_path)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ScoredSetError, match="invalid JSON"):
        read_scored_set(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        read_scored_set(tmp_path / "missing.parquet")


# --------------------------------------------------------------------------- the paper's format

# Full conversations as in UltraFeedback-binarized; sums and float32-rounded means.
PAPER_ROWS = [
    {
        "prompt": "What is 2+2?",
        "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}],
        "ref_chosen_logps": -1.3949899673461914,
        "ref_rejected_logps": -5.9963154792785645,
        "ref_mean_chosen_logps": -0.06974949687719345,
        "ref_mean_rejected_logps": -0.13944919407367706,
        "fuse_chosen_logps": [-5.709071159362793, -4.194366931915283, -8.830345153808594],
        "fuse_rejected_logps": [-11.246179580688477, -12.586021423339844, -14.147635459899902],
        "fuse_mean_chosen_logps": [-0.2378779649734497, -0.2621479332447052, -0.3679310381412506],
        "fuse_mean_rejected_logps": [-0.25559499859809875, -0.2677876949310303, -0.3368484675884247],
    },
    {
        "prompt": "Say hi.",
        "chosen": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
        "rejected": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "No."}],
        "ref_chosen_logps": -3.0,
        "ref_rejected_logps": -7.0,
        "ref_mean_chosen_logps": -0.75,
        "ref_mean_rejected_logps": -3.5,
        "fuse_chosen_logps": [-2.0, -6.0, -1.0],
        "fuse_rejected_logps": [-9.0, -4.0, -5.0],
        "fuse_mean_chosen_logps": [-1.0, -1.2, -0.5],
        "fuse_mean_rejected_logps": [-3.0, -1.0, -2.5],
    },
]
# The token counts behind the sums and means (float32 products, as a float32 scorer writes).
EXPECTED_TOKENS = {
    "ref_chosen": [20, 4],
    "ref_rejected": [43, 2],
    "source_chosen": [[24, 16, 24], [2, 5, 2]],
    "source_rejected": [[44, 47, 42], [3, 4, 2]],
}


def _paper_file(tmp_path: Path, rows: list[dict], suffix: str) -> Path:
    path = tmp_path / f"paper{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:  # a `datasets` directory; "dict" as a DatasetDict with the rows under "train_prefs"
        import datasets

        dataset = datasets.Dataset.from_list(rows)
        (datasets.DatasetDict({"train_prefs": dataset}) if suffix == "dict" else dataset).save_to_disk(str(path))
    return path


def _read_paper(path: Path, suffix: str, **kwargs):
    return read_scored_set(path, split="train_prefs" if suffix == "dict" else None, **kwargs)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", "dataset", "dict"])
def test_paper_format(tmp_path: Path, suffix: str) -> None:
    scored = _read_paper(_paper_file(tmp_path, PAPER_ROWS, suffix), suffix)
    assert scored.format == "paper"
    assert scored.source_names == ("source_0", "source_1", "source_2")
    assert [r.rejected for r in scored.rows()] == [
        [{"role": "assistant", "content": "5"}],
        [{"role": "assistant", "content": "No."}],
    ]
    assert {k: v.tolist() for k, v in scored.token_counts().items()} == EXPECTED_TOKENS
    sums = scored.scores(length_norm=False)
    assert sums["ref_rejected"].tolist() == [r["ref_rejected_logps"] for r in PAPER_ROWS]
    assert sums["source_chosen"].tolist() == [r["fuse_chosen_logps"] for r in PAPER_ROWS]
    # length_norm=True gives back the paper's own means (up to its float32 rounding).
    means = scored.scores(length_norm=True)
    for key, column in [
        ("ref_chosen", "ref_mean_chosen_logps"),
        ("ref_rejected", "ref_mean_rejected_logps"),
        ("source_chosen", "fuse_mean_chosen_logps"),
        ("source_rejected", "fuse_mean_rejected_logps"),
    ]:
        np.testing.assert_allclose(means[key].numpy(), [r[column] for r in PAPER_ROWS], rtol=2e-7)
    # ... so the loss reproduces METHOD.md's test vector on row 0 (max_margin: loss 0.97003484).
    losses, metrics = infifpo_loss(
        means["ref_chosen"],
        means["ref_rejected"],
        means["ref_chosen"],
        means["ref_rejected"],
        means["source_chosen"],
        means["source_rejected"],
        beta=2.5,
    )
    assert losses[0].item() == pytest.approx(0.97003484, abs=1e-6)
    assert metrics["selected"][0].item() == 2
    named = _read_paper(
        _paper_file(tmp_path, PAPER_ROWS, suffix), suffix, source_names=["qwen", "mistral", "gemma"]
    )
    assert named.source_names == ("qwen", "mistral", "gemma")


def test_paper_format_dataset_dict_needs_a_split(tmp_path: Path) -> None:
    path = _paper_file(tmp_path, PAPER_ROWS, "dict")
    with pytest.raises(ScoredSetError, match=r"DatasetDict: pass split= \(available: 'train_prefs'\)"):
        read_scored_set(path)
    with pytest.raises(ScoredSetError, match=r"no split 'test'"):
        read_scored_set(path, split="test")


def _broken(row: int, **changes) -> list[dict]:
    rows = [dict(r) for r in PAPER_ROWS]
    rows[row].update(changes)
    return rows


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            _broken(1, ref_mean_chosen_logps=-0.7),
            r"row 2 \(id '[0-9a-f]+'\), column 'ref_mean_chosen_logps'.*-3.0 / -0.7.*not a positive whole number",
        ),
        (
            _broken(1, fuse_mean_rejected_logps=[-3.0, 0.0, -2.5]),
            r"row 2 .*column 'fuse_mean_rejected_logps', source 'source_1'.*not a positive whole number",
        ),
        (_broken(0, ref_chosen_logps=float("nan")), r"row 1 .*column 'ref_chosen_logps': log-prob must be finite, got nan"),
        (
            _broken(1, fuse_chosen_logps=[-2.0, -6.0]),
            r"row 2 .*column 'fuse_chosen_logps': 2 entries, but there are 3 sources",
        ),
        (
            _broken(1, ref_mean_rejected_logps=3.5),
            r"row 2 .*column 'ref_mean_rejected_logps'.*not a positive whole number",
        ),
        (
            _broken(1, fuse_chosen_logps=[-2.0, "x", -1.0]),
            r"row 2 .*column 'fuse_chosen_logps\[1\]': expected a number, got str",
        ),
    ],
)
def test_paper_format_validation(tmp_path: Path, rows: list[dict], expected: str) -> None:
    path = _paper_file(tmp_path, rows, ".jsonl")
    with pytest.raises(ScoredSetError, match=expected) as info:
        read_scored_set(path)
    assert str(path) in str(info.value)


def test_paper_format_missing_column_and_duplicates(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "fuse_mean_rejected_logps"} for r in PAPER_ROWS]
    with pytest.raises(ScoredSetError, match=r"missing column\(s\) 'fuse_mean_rejected_logps'"):
        read_scored_set(_paper_file(tmp_path, rows, ".jsonl"))
    with pytest.raises(ScoredSetError, match=r"row 2: duplicate id"):
        read_scored_set(_paper_file(tmp_path, [PAPER_ROWS[0], PAPER_ROWS[0]], ".jsonl"))
    with pytest.raises(ScoredSetError, match="3 entries, but there are 2 sources"):
        read_scored_set(_paper_file(tmp_path, PAPER_ROWS, ".jsonl"), source_names=["a", "b"])
