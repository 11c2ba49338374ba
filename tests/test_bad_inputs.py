"""Every row of docs/BAD_INPUTS.md whose stage is read, score or merge, reproduced: the input is
built, the stage runs the way its recipe runs it (inside ``exit_on_input_error``), and what the
user sees must contain the table's excerpt ("…" stands for elided text). Error cases must end
in exactly one line on stderr with exit status 1 and no traceback; recorded cases return the
record a user reads (manifest, sidecar, merge report).

Rows of other stages (training) are tested next to their stage.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from workers.scoring_common import REPO, subprocess_env

from nemo_infifpo.data.errors import exit_on_input_error
from nemo_infifpo.data.policy import RowPolicy
from nemo_infifpo.data.rows import read_preference_rows
from nemo_infifpo.data.scored_set import read_scored_set
from nemo_infifpo.scoring.job import ScoreConfig, run_scoring
from nemo_infifpo.scoring.manifest import ScoringMismatchError
from nemo_infifpo.scoring.merge import merge_scores
from nemo_infifpo.testing import chatml_tokenizer, save_tokenizer
from nemo_infifpo.testing.chat_templates import DATED, R1_STYLE, SYSTEM_IF_LAST_USER, TRIMMING

TABLE = REPO / "docs" / "BAD_INPUTS.md"
OUR_STAGES = ("read", "score", "merge")


def _table_rows() -> list[dict[str, str]]:
    rows = []
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        case, _input, stage, _happens, sees = cells
        rows.append({"case": case.strip("`"), "stage": stage, "sees": sees[1:-1]})
    return rows


def _pattern(excerpt: str) -> str:
    return ".*".join(re.escape(part) for part in excerpt.split("…"))


GOOD = [
    {"id": f"g{i}", "prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(8)
]


def _jsonl(path: Path, records: list, extra_lines: list[str] = ()) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "".join(l + "\n" for l in extra_lines))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    from nemo_infifpo.testing.models import save_tiny_hf_model

    root = tmp_path_factory.mktemp("bad_inputs")
    return SimpleNamespace(
        root=root,
        model=save_tiny_hf_model("qwen2", root / "qwen", seed=2),
        # Every merge learnt, so "\n\n" is one token as in Qwen's vocabulary.
        big_vocab=save_tiny_hf_model("qwen2", root / "qwen_big", seed=2, vocab_size=1000),
    )


def _config(world: SimpleNamespace, tmp: Path, data: Path, **options) -> ScoreConfig:
    fields = dict(
        model_path=str(world.model),
        data_path=str(data),
        output_dir=str(tmp / "out"),
        backend="hf",
        dtype="float32",
        max_length=None,
        progress=False,
    )
    fields.update(options)
    return ScoreConfig(**fields)


def _fails(stage: str, action: Callable[[], object], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as caught:
        with exit_on_input_error(ScoringMismatchError, stage=stage):
            action()
    assert caught.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {stage}: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- read


def case_malformed_json_line(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD, ['{"id": "x", "prompt": '])
    excluded = read_preference_rows(data, policy=RowPolicy(max_excluded_fraction=0.5)).excluded
    assert [e.reason for e in excluded] == ["invalid_json"]
    return _fails("score", lambda: read_preference_rows(data, policy=RowPolicy("fail")), capsys)


def case_wrong_type(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", [{"id": "t", "prompt": "Q?", "chosen": 5, "rejected": "No."}])
    return _fails("score", lambda: read_preference_rows(data, policy=RowPolicy("fail")), capsys)


def case_empty_file(tmp, world, capsys):
    data = tmp / "data.jsonl"
    data.write_text("\n")
    return _fails("score", lambda: read_preference_rows(data), capsys)


def case_missing_file(tmp, world, capsys):
    return _fails("score", lambda: read_preference_rows(tmp / "nope.jsonl"), capsys)


def case_unsupported_file_type(tmp, world, capsys):
    data = tmp / "data.csv"
    data.write_text("prompt,chosen,rejected\n")
    return _fails("score", lambda: read_preference_rows(data), capsys)


def case_duplicate_ids(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD + [dict(GOOD[2], chosen="Other.")])
    read = read_preference_rows(data, policy=RowPolicy(max_excluded_fraction=0.5))
    assert "g2" not in {row.id for row in read.rows}
    return "; ".join(f"{e.location}: {e.detail}" for e in read.excluded)


def case_missing_column(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", [{"id": "m", "prompt": "Q?", "chosen": "A."}])
    return _fails("score", lambda: read_preference_rows(data, policy=RowPolicy("fail")), capsys)


def case_identical_responses(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", [{"id": "same", "prompt": "Q?", "chosen": "A.", "rejected": "A."}] + GOOD)
    read = read_preference_rows(data, policy=RowPolicy(max_excluded_fraction=0.5))
    assert [e.reason for e in read.excluded] == ["identical_responses"] and len(read.rows) == len(GOOD)
    return read.excluded[0].detail


def case_empty_content(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD + [{"id": "blank", "prompt": "Q?", "chosen": " ", "rejected": "No."}])
    read = read_preference_rows(data, policy=RowPolicy(max_excluded_fraction=0.5))
    assert [e.reason for e in read.excluded] == ["empty_content"]
    return read.excluded[0].detail


def case_prompt_not_ending_with_user(tmp, world, capsys):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    data = _jsonl(tmp / "data.jsonl", [{"id": "p", "prompt": prompt, "chosen": "A.", "rejected": "B."}])
    return _fails("score", lambda: read_preference_rows(data, policy=RowPolicy("fail")), capsys)


def case_dataset_dict_without_split(tmp, world, capsys):
    import datasets

    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(GOOD)}).save_to_disk(str(tmp / "ds"))
    return _fails("score", lambda: read_preference_rows(tmp / "ds"), capsys)


def case_too_many_invalid_rows(tmp, world, capsys):
    bad = [{"id": f"b{i}", "prompt": "Q?", "chosen": "Same.", "rejected": "Same."} for i in range(3)]
    data = _jsonl(tmp / "data.jsonl", GOOD + bad)
    return _fails("score", lambda: read_preference_rows(data), capsys)


# --------------------------------------------------------------------------- score


def case_not_prefix_stable_row(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", [{"id": "nl", "prompt": "Hi?", "chosen": "\nHello.", "rejected": "No."}])
    config = _config(world, tmp, data, model_path=str(world.big_vocab), on_invalid_row="fail")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_dropped_system_message(tmp, world, capsys):
    row = {"id": "sys", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
           "chosen": "Hello.", "rejected": "No."}
    data = _jsonl(tmp / "data.jsonl", [row])
    config = _config(world, tmp, data, chat_template=SYSTEM_IF_LAST_USER, on_invalid_row="fail")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_think_in_generation_prompt(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD[:1])
    config = _config(world, tmp, data, chat_template=R1_STYLE, on_invalid_row="fail")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_reasoning_stripped_from_earlier_turn(tmp, world, capsys):
    keeps_last = (
        "{% set ns = namespace(last=-1) %}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 != ns.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    prompt = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "<think>\nA greeting.\n</think>\nHello."},
              {"role": "user", "content": "And?"}]
    data = _jsonl(tmp / "data.jsonl", [{"id": "r", "prompt": prompt, "chosen": "Bye.", "rejected": "No."}])
    config = _config(world, tmp, data, chat_template=keeps_last, on_invalid_row="fail")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_multi_message_response_generation(tmp, world, capsys):
    two = [{"role": "assistant", "content": "A."}, {"role": "assistant", "content": "B."}]
    data = _jsonl(tmp / "data.jsonl", [{"id": "two", "prompt": "Hi?", "chosen": two, "rejected": "No."}])
    config = _config(world, tmp, data, chat_template=R1_STYLE, boundary="generation", on_invalid_row="fail")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_whitespace_trimmed(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", [dict(GOOD[0], chosen="  Padded answer. ")] + GOOD[1:])
    run_scoring(_config(world, tmp, data, chat_template=TRIMMING))
    sidecar = json.loads((tmp / "out" / "shard-00000-of-00001.json").read_text())
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    assert manifest["info"]["template"]["trims_content"] is True
    return "text_changes: " + json.dumps(sidecar["text_changes"])


def case_time_dependent_template(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    run_scoring(_config(world, tmp, data, chat_template=DATED))
    template = json.loads((tmp / "out" / "manifest.json").read_text())["info"]["template"]
    return f"clock_dependent: {json.dumps(template['clock_dependent'])}, template_date: {template['template_date']}"


def case_rerun_with_other_template_inputs(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    run_scoring(_config(world, tmp, data, chat_template=DATED))
    config = _config(world, tmp, data, chat_template=DATED, template_date="2025-06-30")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_unknown_template_name(tmp, world, capsys):
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), chat_template="chatml3")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_model_without_config(tmp, world, capsys):
    model = tmp / "model"
    save_tokenizer(chatml_tokenizer(), model)
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), model_path=str(model))
    return _fails("score", lambda: run_scoring(config), capsys)


def _edited_model(world, tmp, **changes) -> Path:
    model = tmp / "model"
    shutil.copytree(world.model, model)
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    return model


def case_unsupported_architecture(tmp, world, capsys):
    model = _edited_model(world, tmp, architectures=["FancyNewForCausalLM"])
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), model_path=str(model), backend="megatron")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_vocabulary_mismatch(tmp, world, capsys):
    other = save_tokenizer(chatml_tokenizer(vocab_size=1000), tmp / "big_tokenizer")
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), tokenizer_path=str(other))
    return _fails("score", lambda: run_scoring(config), capsys)


def case_tp_not_dividing_kv_heads(tmp, world, capsys):
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), backend="megatron", tensor_model_parallel_size=3)
    return _fails("score", lambda: run_scoring(config), capsys)


def case_output_dir_is_a_file(tmp, world, capsys):
    (tmp / "out").write_text("not a directory")
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD))
    message = _fails("score", lambda: run_scoring(config), capsys)
    assert (tmp / "out").read_text() == "not a directory"  # untouched
    return message


def case_read_only_output_dir(tmp, world, capsys):
    import os

    if os.geteuid() == 0:
        target = Path("/sys/nemo-infifpo-read-only")  # refused even to root
    else:
        (tmp / "locked").mkdir()
        (tmp / "locked").chmod(0o500)
        target = tmp / "locked" / "out"
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), output_dir=str(target))
    return _fails("score", lambda: run_scoring(config), capsys)


def _score_config_from(mapping: dict) -> Callable[[], object]:
    base = {"model": {"path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o"}
    for key, value in mapping.items():
        section, _, name = key.partition(".")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[section] = value
    return lambda: ScoreConfig.from_mapping(base).validate()


def case_invalid_enum_value(tmp, world, capsys):
    return _fails("score", _score_config_from({"data.on_invalid_row": "skip"}), capsys)


def case_fraction_out_of_range(tmp, world, capsys):
    return _fails("score", _score_config_from({"data.max_excluded_fraction": 2}), capsys)


def case_template_kwargs_not_a_mapping(tmp, world, capsys):
    return _fails("score", _score_config_from({"tokenizer.chat_template_kwargs": "enable_thinking=false"}), capsys)


def case_bad_template_date(tmp, world, capsys):
    config = _config(world, tmp, _jsonl(tmp / "data.jsonl", GOOD), template_date="yesterday")
    return _fails("score", lambda: run_scoring(config), capsys)


def case_bad_boundary_mode(tmp, world, capsys):
    return _fails("score", _score_config_from({"tokenizer.boundary": "prefix"}), capsys)


def case_hf_backend_with_model_parallelism(tmp, world, capsys):
    return _fails("score", _score_config_from({"model.backend": "hf", "model.tensor_model_parallel_size": 2}), capsys)


def case_not_an_integer(tmp, world, capsys):
    return _fails("score", _score_config_from({"data.max_length": "lots"}), capsys)


def _recipe(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "recipes" / script), *args],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )


def case_unknown_config_key(tmp, world, capsys):
    proc = _recipe("merge_scores.py", "data.path=x.jsonl", "pivot_dir=p", "output_path=o.parquet", "data.on_invalid_rows=fail")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    return " ".join(proc.stderr.split())


def case_recipe_one_line_error(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    proc = _recipe("score.py", f"model.path={world.model}", f"data.path={data}", f"output_dir={tmp / 'out'}",
                   "data.on_invalid_row=skip")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    return lines[0]


# --------------------------------------------------------------------------- merge


def _scored_dir(tmp: Path, name: str, data: Path, world, **options) -> Path:
    config = _config(world, tmp, data, output_dir=str(tmp / name), **options)
    run_scoring(config)
    return tmp / name


def case_nan_scores(tmp, world, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _jsonl(tmp / "data.jsonl", GOOD)
    pivot = _scored_dir(tmp, "pivot", data, world)
    shard = pivot / "shard-00000-of-00001.parquet"
    table = pq.read_table(shard)
    values = table.column("chosen_logps").to_numpy().copy()
    values[1] = np.nan
    pq.write_table(table.set_column(1, "chosen_logps", pa.array(values)), shard)
    sidecar = pivot / "shard-00000-of-00001.json"
    meta = json.loads(sidecar.read_text())
    import hashlib

    meta["parquet_sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()  # a consistent, wrong file
    sidecar.write_text(json.dumps(meta))
    return _fails("merge", lambda: merge_scores(data, pivot, [], tmp / "train.parquet"), capsys)


def case_infinite_score_in_scored_set(tmp, world, capsys):
    rows = [
        {"prompt": "Q?", "chosen": "A.", "rejected": "B.", "ref_chosen_logps": -1.0, "ref_rejected_logps": float("-inf"),
         "ref_mean_chosen_logps": -0.5, "ref_mean_rejected_logps": -0.5, "fuse_chosen_logps": [-1.0],
         "fuse_rejected_logps": [-2.0], "fuse_mean_chosen_logps": [-0.5], "fuse_mean_rejected_logps": [-1.0]}
    ]
    path = tmp / "paper.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    return _fails("merge", lambda: read_scored_set(path), capsys)


def case_wrong_number_of_sources(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    pivot = _scored_dir(tmp, "pivot", data, world)
    return _fails(
        "merge", lambda: merge_scores(data, pivot, [pivot, pivot], tmp / "t.parquet", source_names=["a"]), capsys
    )


def case_scores_from_another_data_file(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    other = _jsonl(tmp / "other.jsonl", GOOD[:-1])
    pivot = _scored_dir(tmp, "pivot", other, world)
    return _fails("merge", lambda: merge_scores(data, pivot, [], tmp / "t.parquet"), capsys)


def case_incomplete_scoring_output(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    pivot = _scored_dir(tmp, "pivot", data, world, shard_count=2, shard_index=0)
    return _fails("merge", lambda: merge_scores(data, pivot, [], tmp / "t.parquet"), capsys)


def case_merge_output_is_a_directory(tmp, world, capsys):
    data = _jsonl(tmp / "data.jsonl", GOOD)
    pivot = _scored_dir(tmp, "pivot", data, world)
    (tmp / "t.parquet").mkdir()
    return _fails("merge", lambda: merge_scores(data, pivot, [], tmp / "t.parquet"), capsys)


def case_invalid_row_under_fail_at_merge(tmp, world, capsys):
    row = {"id": "sys", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
           "chosen": "Hello.", "rejected": "No."}
    # 1 invalid row in 105: within the default 1%, so the default merge succeeds.
    many = [dict(g, id=f"{g['id']}_{k}") for k in range(13) for g in GOOD]
    data = _jsonl(tmp / "data.jsonl", many + [row])
    pivot = _scored_dir(tmp, "pivot", data, world)
    source = _scored_dir(tmp, "source", data, world, chat_template=SYSTEM_IF_LAST_USER)
    report = merge_scores(data, pivot, [source], tmp / "ok.parquet")
    assert report["excluded"][0]["excluded_by"] == {"source": "not_prefix_stable"}
    policy = RowPolicy("fail")
    return _fails("merge", lambda: merge_scores(data, pivot, [source], tmp / "t.parquet", policy=policy), capsys)


CASES: dict[str, Callable] = {name[len("case_"):]: value for name, value in globals().items() if name.startswith("case_")}


def test_every_table_row_of_these_stages_has_a_case_and_every_case_a_row() -> None:
    ours = [row for row in _table_rows() if row["stage"] in OUR_STAGES]
    assert len(ours) >= 25
    assert sorted(row["case"] for row in ours) == sorted(CASES)


@pytest.mark.parametrize("row", [r for r in _table_rows() if r["stage"] in OUR_STAGES], ids=lambda r: r["case"])
def test_bad_input(row: dict[str, str], tmp_path: Path, world: SimpleNamespace, capsys) -> None:
    seen = CASES[row["case"]](tmp_path, world, capsys)
    assert re.search(_pattern(row["sees"]), seen), f"table says {row['sees']!r}, user sees {seen!r}"
