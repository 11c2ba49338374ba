"""Preference rows: every accepted format normalises to the same rows; bad input is named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from nemo_infifpo.data.rows import (
    PreferenceDataError,
    PreferenceRow,
    content_hash_id,
    load_preference_rows,
    normalize_record,
    rows_from_records,
)

USER = {"role": "user", "content": "What is 2+2?"}
CHOSEN = {"role": "assistant", "content": "4"}
REJECTED = {"role": "assistant", "content": "5"}

SINGLE_TURN = PreferenceRow(
    id=content_hash_id([USER], [CHOSEN], [REJECTED]),
    prompt=[USER],
    chosen=[CHOSEN],
    rejected=[REJECTED],
)

SINGLE_TURN_FORMS: dict[str, dict[str, Any]] = {
    "trl_string_prompt": {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"},
    "trl_message_prompt": {"prompt": [USER], "chosen": [CHOSEN], "rejected": [REJECTED]},
    "string_prompt_message_responses": {
        "prompt": "What is 2+2?",
        "chosen": [CHOSEN],
        "rejected": [REJECTED],
    },
    "message_prompt_string_responses": {"prompt": [USER], "chosen": "4", "rejected": "5"},
    "conversation_with_prompt": {
        "prompt": "What is 2+2?",
        "chosen": [USER, CHOSEN],
        "rejected": [USER, REJECTED],
    },
    "conversation_without_prompt": {"chosen": [USER, CHOSEN], "rejected": [USER, REJECTED]},
    "conversation_with_message_prompt": {
        "prompt": [USER],
        "chosen": [USER, CHOSEN],
        "rejected": [USER, REJECTED],
    },
    "other_key_order_and_extras": {
        "score_chosen": 9.5,
        "rejected": [{"content": "5", "role": "assistant", "name": "bot"}],
        "chosen": [{"content": "4", "role": "assistant"}],
        "prompt": "What is 2+2?",
    },
}

SYSTEM = {"role": "system", "content": "Answer with a number."}
EARLIER_ANSWER = {"role": "assistant", "content": "2"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
MULTI_TURN_PROMPT = [SYSTEM, {"role": "user", "content": "What is 1+1?"}, EARLIER_ANSWER, FOLLOW_UP]
MULTI_CHOSEN = {"role": "assistant", "content": "6"}
MULTI_REJECTED = {"role": "assistant", "content": "Seven"}

MULTI_TURN = PreferenceRow(
    id=content_hash_id(MULTI_TURN_PROMPT, [MULTI_CHOSEN], [MULTI_REJECTED]),
    prompt=MULTI_TURN_PROMPT,
    chosen=[MULTI_CHOSEN],
    rejected=[MULTI_REJECTED],
)

MULTI_TURN_FORMS: dict[str, dict[str, Any]] = {
    "trl_message_prompt": {"prompt": MULTI_TURN_PROMPT, "chosen": "6", "rejected": "Seven"},
    "conversation_without_prompt": {
        "chosen": [*MULTI_TURN_PROMPT, MULTI_CHOSEN],
        "rejected": [*MULTI_TURN_PROMPT, MULTI_REJECTED],
    },
    "conversation_with_last_user_prompt": {
        "prompt": "And 3+3?",
        "chosen": [*MULTI_TURN_PROMPT, MULTI_CHOSEN],
        "rejected": [*MULTI_TURN_PROMPT, MULTI_REJECTED],
    },
}


@pytest.mark.parametrize("form", sorted(SINGLE_TURN_FORMS))
def test_single_turn_forms_normalise_to_the_same_row(form: str) -> None:
    assert normalize_record(SINGLE_TURN_FORMS[form]) == SINGLE_TURN


@pytest.mark.parametrize("form", sorted(MULTI_TURN_FORMS))
def test_multi_turn_forms_with_system_message_normalise_to_the_same_row(form: str) -> None:
    assert normalize_record(MULTI_TURN_FORMS[form]) == MULTI_TURN


def test_response_may_be_several_assistant_messages() -> None:
    second = {"role": "assistant", "content": "Four, that is."}
    row = normalize_record({"chosen": [USER, CHOSEN, second], "rejected": [USER, REJECTED]})
    assert row.prompt == [USER]
    assert row.chosen == [CHOSEN, second]
    assert row.rejected == [REJECTED]


def test_hash_id_is_sha256_of_canonical_json() -> None:
    canonical = json.dumps(
        {"prompt": [USER], "chosen": [CHOSEN], "rejected": [REJECTED]},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    assert SINGLE_TURN.id == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_hash_id_depends_on_content() -> None:
    other = normalize_record({"prompt": "What is 2+2?", "chosen": "4", "rejected": "22"})
    assert other.id != SINGLE_TURN.id
    assert len(other.id) == 16


@pytest.mark.parametrize(("given", "expected"), [("row-7", "row-7"), (7, "7")])
def test_id_column_is_used_as_a_string(given: Any, expected: str) -> None:
    row = normalize_record({"id": given, **SINGLE_TURN_FORMS["trl_string_prompt"]})
    assert row.id == expected
    assert row.prompt == SINGLE_TURN.prompt


def test_to_record_round_trips() -> None:
    assert normalize_record(MULTI_TURN.to_record()) == MULTI_TURN


# --------------------------------------------------------------------------- files

FILE_RECORDS = [
    SINGLE_TURN_FORMS["conversation_with_prompt"],
    {
        "prompt": "And 3+3?",
        "chosen": [*MULTI_TURN_PROMPT, MULTI_CHOSEN],
        "rejected": [*MULTI_TURN_PROMPT, MULTI_REJECTED],
    },
]
EXPECTED_FILE_ROWS = [SINGLE_TURN, MULTI_TURN]


def _write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def test_jsonl_loads_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(
        "\n".join(["", json.dumps(FILE_RECORDS[0]), "   ", json.dumps(FILE_RECORDS[1]), ""])
    )
    assert load_preference_rows(path) == EXPECTED_FILE_ROWS


def test_json_loads(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(FILE_RECORDS, indent=2))
    assert load_preference_rows(path) == EXPECTED_FILE_ROWS


def test_parquet_loads(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(FILE_RECORDS), path)
    assert load_preference_rows(path) == EXPECTED_FILE_ROWS


def test_datasets_saved_dataset_and_dataset_dict_load(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list(FILE_RECORDS).save_to_disk(str(tmp_path / "single"))
    assert load_preference_rows(tmp_path / "single") == EXPECTED_FILE_ROWS

    splits = datasets.DatasetDict(
        {
            "train_prefs": datasets.Dataset.from_list(FILE_RECORDS),
            "test_prefs": datasets.Dataset.from_list(FILE_RECORDS[:1]),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_preference_rows(tmp_path / "splits", split="test_prefs") == EXPECTED_FILE_ROWS[:1]
    with pytest.raises(
        PreferenceDataError, match=r"splits: this is a DatasetDict: pass split="
    ) as caught:
        load_preference_rows(tmp_path / "splits")
    assert "'train_prefs'" in str(caught.value) and "'test_prefs'" in str(caught.value)
    with pytest.raises(PreferenceDataError, match=r"no split 'validation' \(available: "):
        load_preference_rows(tmp_path / "splits", split="validation")
    with pytest.raises(PreferenceDataError, match=r"single.*without splits"):
        load_preference_rows(tmp_path / "single", split="train")


def test_ids_are_the_same_across_formats_and_key_orders(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    reordered = [{key: record[key] for key in reversed(list(record))} for record in FILE_RECORDS]
    _write_jsonl(tmp_path / "a.jsonl", reordered)
    (tmp_path / "b.json").write_text(json.dumps(FILE_RECORDS))
    pq.write_table(pa.Table.from_pylist(FILE_RECORDS), tmp_path / "c.parquet")
    trl_style = [{"prompt": [USER], "chosen": "4", "rejected": "5"}]

    ids = [
        [row.id for row in load_preference_rows(tmp_path / name)]
        for name in ("a.jsonl", "b.json", "c.parquet")
    ]
    assert ids[0] == ids[1] == ids[2] == [SINGLE_TURN.id, MULTI_TURN.id]
    assert rows_from_records(trl_style)[0].id == SINGLE_TURN.id


# --------------------------------------------------------------------------- errors

GOOD = {"id": "ok", "prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}

# (record, pattern for "field ...: problem")
BAD_RECORDS: dict[str, tuple[dict[str, Any], str]] = {
    "missing_chosen": ({"prompt": "Hi?", "rejected": "No."}, r"field 'chosen': missing"),
    "missing_prompt": ({"chosen": "Yes.", "rejected": "No."}, r"field 'prompt': missing"),
    "chosen_is_a_number": (
        {"prompt": "Hi?", "chosen": 3, "rejected": "No."},
        r"field 'chosen': expected a string or a list of assistant messages, got int",
    ),
    "empty_chosen": (
        {"prompt": "Hi?", "chosen": "  ", "rejected": "No."},
        r"field 'chosen': empty content",
    ),
    "empty_prompt": (
        {"prompt": "", "chosen": "Yes.", "rejected": "No."},
        r"field 'prompt': empty content",
    ),
    "non_string_content": (
        {"prompt": "Hi?", "chosen": [{"role": "assistant", "content": ["Yes"]}], "rejected": "No."},
        r"field 'chosen\[0\]\.content': expected a string, got list",
    ),
    "missing_content": (
        {"prompt": "Hi?", "chosen": "Yes.", "rejected": [{"role": "assistant"}]},
        r"field 'rejected\[0\]\.content': missing",
    ),
    "message_not_an_object": (
        {"prompt": ["Hi?"], "chosen": "Yes.", "rejected": "No."},
        r"field 'prompt\[0\]': expected a message with 'role' and 'content', got str",
    ),
    "empty_message_list": (
        {"prompt": [], "chosen": "Yes.", "rejected": "No."},
        r"field 'prompt': empty list of messages",
    ),
    "unknown_role": (
        {"prompt": [{"role": "human", "content": "Hi?"}], "chosen": "Yes.", "rejected": "No."},
        r"field 'prompt\[0\]\.role': unknown role 'human'",
    ),
    "prompt_wrong_type": (
        {"prompt": {"text": "Hi?"}, "chosen": "Yes.", "rejected": "No."},
        r"field 'prompt': expected a string or a list of messages, got dict",
    ),
    "chosen_identical_to_rejected": (
        {
            "prompt": "Hi?",
            "chosen": "Same.",
            "rejected": [{"role": "assistant", "content": "Same."}],
        },
        r"field 'rejected': identical to 'chosen'",
    ),
    "prompt_parts_differ": (
        {
            "chosen": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Yes."},
            ],
            "rejected": [
                {"role": "user", "content": "Hello?"},
                {"role": "assistant", "content": "No."},
            ],
        },
        r"field 'rejected': the prompt part of the conversation differs from the one in 'chosen'",
    ),
    "prompt_string_differs_from_conversation": (
        {
            "prompt": "Something else?",
            "chosen": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Yes."},
            ],
            "rejected": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "No."},
            ],
        },
        r"field 'prompt': differs from the last user message",
    ),
    "conversation_without_answer": (
        {"chosen": [{"role": "user", "content": "Hi?"}], "rejected": "No.", "prompt": "Hi?"},
        r"field 'chosen': does not end with an assistant message",
    ),
    "prompt_ends_with_assistant": (
        {
            "prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hm."}],
            "chosen": "Yes.",
            "rejected": "No.",
        },
        r"field 'prompt': the prompt must end with a user message",
    ),
    "id_wrong_type": (
        {**GOOD, "id": 1.5},
        r"field 'id': expected a string or an integer, got float",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_rows_name_file_line_and_field(tmp_path: Path, case: str) -> None:
    record, problem = BAD_RECORDS[case]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl, line 3: " + problem):
        load_preference_rows(path)


@pytest.mark.parametrize("case", ["chosen_is_a_number", "unknown_role", "prompt_parts_differ"])
def test_bad_rows_in_json_name_row_and_id(tmp_path: Path, case: str) -> None:
    record, problem = BAD_RECORDS[case]
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, {"id": "abc", **record}]))
    with pytest.raises(
        PreferenceDataError, match=r"data\.json, row 2 \(id 'abc'\): " + problem
    ) as caught:
        load_preference_rows(path)
    assert caught.value.number == 2
    assert caught.value.row_id == "abc"


def test_error_example_from_the_docs() -> None:
    with pytest.raises(PreferenceDataError) as caught:
        normalize_record(
            {"id": "abc", "prompt": "Hi?", "chosen": 1, "rejected": "No."},
            source="data.jsonl",
            number=7,
            location="line",
        )
    assert str(caught.value) == (
        "data.jsonl, line 7 (id 'abc'): field 'chosen': "
        "expected a string or a list of assistant messages, got int"
    )


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl, line 2: invalid JSON"):
        load_preference_rows(path)


def test_jsonl_line_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n[1, 2]\n")
    with pytest.raises(
        PreferenceDataError, match=r"data\.jsonl, line 2: expected an object .* got list"
    ):
        load_preference_rows(path)


def test_json_file_must_hold_a_list(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"rows": [GOOD]}))
    with pytest.raises(
        PreferenceDataError, match=r"data\.json: expected a JSON list of row objects, got dict"
    ):
        load_preference_rows(path)


def test_duplicate_ids_name_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    other = {**GOOD, "chosen": "Hello there."}
    _write_jsonl(path, [GOOD, {**GOOD, "id": "x"}, other])
    with pytest.raises(
        PreferenceDataError,
        match=r"data\.jsonl, line 3 \(id 'ok'\): field 'id': duplicate id, also at line 1",
    ):
        load_preference_rows(path)


def test_duplicate_content_without_ids_is_a_duplicate_id(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    record = {"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}
    path.write_text(
        json.dumps([record, {"prompt": "Other?", "chosen": "Yes.", "rejected": "No."}, record])
    )
    with pytest.raises(
        PreferenceDataError,
        match=r"data\.json, row 3 \(id '[0-9a-f]{16}'\): field 'id': duplicate id, also at row 1",
    ):
        load_preference_rows(path)


def test_unsupported_file_type_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(PreferenceDataError, match=r"data\.csv: unsupported file type"):
        load_preference_rows(path)
    with pytest.raises(FileNotFoundError, match=r"nothing\.jsonl"):
        load_preference_rows(tmp_path / "nothing.jsonl")


def test_split_only_applies_to_datasets_directories(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "data.jsonl", [GOOD])
    with pytest.raises(PreferenceDataError, match=r"data\.jsonl: split='train' only applies"):
        load_preference_rows(path, split="train")


# --------------------------------------------------------------------------- the row policy

from nemo_infifpo.data.policy import RowPolicy, TooManyExcludedRows  # noqa: E402
from nemo_infifpo.data.rows import read_preference_rows  # noqa: E402


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _good(i: int) -> str:
    return json.dumps({"id": f"g{i}", "prompt": f"Q{i}?", "chosen": f"A{i}.", "rejected": f"B{i}."})


def test_policy_exclude_keeps_reading_past_bad_rows_and_records_each(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "data.jsonl",
        [
            _good(0),
            '{"id": "broken", "prompt": ',
            json.dumps({"id": "same", "prompt": "Q?", "chosen": "A.", "rejected": "A."}),
            json.dumps({"id": "blank", "prompt": "Q?", "chosen": "  ", "rejected": "B."}),
            _good(1),
            json.dumps({"id": "g1", "prompt": "Other?", "chosen": "C.", "rejected": "D."}),
            _good(2),
        ],
    )
    read = read_preference_rows(path, policy=RowPolicy(max_excluded_fraction=1.0))
    assert [row.id for row in read.rows] == ["g0", "g2"]  # both rows with id g1 are ambiguous
    assert read.total == 7
    reasons = [(e.id, e.reason, e.location) for e in read.excluded]
    assert reasons == [
        (None, "invalid_json", f"{path}, line 2"),
        ("same", "identical_responses", f"{path}, line 3"),
        ("blank", "empty_content", f"{path}, line 4"),
        ("g1", "duplicate_id", f"{path}, line 5"),
        ("g1", "duplicate_id", f"{path}, line 6"),
    ]
    assert all(e.stage == "read" for e in read.excluded)
    assert "also at line 6" in read.excluded[3].detail


def test_policy_fail_stops_at_the_first_bad_row(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "data.jsonl", [_good(0), '{"id": 1,', _good(1)])
    with pytest.raises(PreferenceDataError, match=r"data.jsonl, line 2: invalid JSON") as caught:
        read_preference_rows(path, policy=RowPolicy(on_invalid_row="fail"))
    assert caught.value.reason == "invalid_json"


def test_policy_fraction_counts_only_invalid_rows_and_summarises(tmp_path: Path) -> None:
    lines = [_good(i) for i in range(99)] + ['{"id": "bad"']
    assert len(read_preference_rows(_write_lines(tmp_path / "ok.jsonl", lines)).rows) == 99
    lines = [_good(i) for i in range(98)] + ['{"id": "bad"', json.dumps({"id": "x", "chosen": "a", "rejected": "b"})]
    with pytest.raises(TooManyExcludedRows) as caught:
        read_preference_rows(_write_lines(tmp_path / "two.jsonl", lines))
    message = str(caught.value)
    assert "2 of 100 rows are invalid (stage read; 2.00%)" in message
    assert "By reason: invalid_json 1, invalid_row 1." in message
    assert "line 99" in message and "'x'" in message
    assert "\n" not in message  # one paragraph


def test_policy_options_are_validated() -> None:
    from nemo_infifpo.data.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.on_invalid_row must be one of exclude, fail, got 'skip'"):
        RowPolicy.from_mapping({"on_invalid_row": "skip"})
    with pytest.raises(ConfigError, match=r"data.max_excluded_fraction must be a number in \[0, 1\], got 1.5"):
        RowPolicy.from_mapping({"max_excluded_fraction": 1.5})
    assert RowPolicy.from_mapping({"max_excluded_fraction": "0.05"}).max_excluded_fraction == 0.05
