"""generate and judge on tiny offline models (CPU, transformers back end), and their bad inputs.

Three tiny models with different chat templates (Phi-style, ChatML, Llama-3-style) answer a few
prompts; a tiny random reward model and function judges score the answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nemo_infifpo.data.policy import TooManyExcludedRows
from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer
from nemo_infifpo.generation import generate as generate_module
from nemo_infifpo.generation import outputs
from nemo_infifpo.generation.backends import Request, raw_samples_from_vllm, vllm_requests
from nemo_infifpo.generation.build import BuildPairsConfig, build_pairs
from nemo_infifpo.generation.generate import GenerateConfig, run_generation
from nemo_infifpo.generation.judging import JudgeConfig, run_judge
from nemo_infifpo.generation.outputs import OutputMismatchError
from nemo_infifpo.generation.pairs import PairRules
from nemo_infifpo.generation.sampling import GeneratedSample, RawSample, SamplingSettings, finish_sample, request_seed

REPO = Path(__file__).resolve().parents[1]
MODELS = {"phi3": 1, "qwen2": 2, "llama": 3}
MAX_NEW = 8
PROMPTS = [
    {"id": "a", "prompt": "Reverse 123", "reference": "3"},
    {"id": "b", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 312 please"}], "reference": "1"},
    {"id": "c", "prompt": "Add one and two, then explain the result in many words", "reference": "3"},
    {"id": 7, "prompt": "Hi", "reference": "0"},
    {"prompt": "A prompt without an id", "reference": "2"},
]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemo_infifpo.testing.models import save_tiny_hf_model
    from nemo_infifpo.testing.reward_models import save_tiny_reward_model

    root = tmp_path_factory.mktemp("generation")
    for family, seed in MODELS.items():
        save_tiny_hf_model(family, root / family, seed=seed)
    save_tiny_reward_model(root / "rm", family="qwen2", seed=4)
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


def gen_config(world: Path, model: str, out: Path, **changes: object) -> GenerateConfig:
    sampling = changes.pop("sampling", SamplingSettings(n=2, temperature=0.8, max_new_tokens=MAX_NEW, seed=11))
    return GenerateConfig(model_path=str(world / model), data_path=str(world / "prompts.jsonl"), output_dir=str(out),
                          sampling=sampling, dtype="float32", max_prompts=2, **changes)  # type: ignore[arg-type]


def prompt_messages(world: Path) -> dict[str, list[dict[str, str]]]:
    """prompt id -> messages, as the stages read them (ids of rows without one are hashes)."""
    from nemo_infifpo.generation.prompts import read_prompt_rows

    return {row.id: row.messages for row in read_prompt_rows(world / "prompts.jsonl").rows}


def records(directory: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for path in sorted(directory.glob("shard-*.parquet")) for r in pq.read_table(path).to_pylist()]


@pytest.fixture(scope="module")
def generated(world: Path) -> dict[str, Path]:
    dirs = {}
    for model in MODELS:
        dirs[model] = world / "gen" / model
        run_generation(gen_config(world, model, dirs[model], shard_count=2))
    return dirs


# ----------------------------------------------------------------------------- generate


def test_generate_three_models_each_with_its_own_template(world: Path, generated: dict[str, Path]) -> None:
    prompt_tokens = {}
    for model, directory in generated.items():
        rows = records(directory)
        ids = sorted({r["prompt_id"] for r in rows})
        assert len(ids) == 5 and "7" in ids and len(rows) == 10
        assert [(r["prompt_id"], r["sample_index"]) for r in rows] == sorted((i, s) for i in ids for s in range(2))
        renderer = ResponseTokenizer(load_tokenizer(world / model))
        messages = prompt_messages(world)
        for r in rows:
            assert r["model"] == model
            assert r["finish_reason"] in ("stop", "length")
            assert 1 <= r["num_tokens"] <= MAX_NEW
            assert r["finish_reason"] == "stop" or r["num_tokens"] == MAX_NEW
            assert r["prompt_tokens"] == len(renderer.render_ids(messages[r["prompt_id"]], add_generation_prompt=True))
        prompt_tokens[model] = [r["prompt_tokens"] for r in rows]
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["complete"] and manifest["identity"]["fields"]["sampling"]["seed"] == 11
    assert len({tuple(v) for v in prompt_tokens.values()}) == 3  # three different templates


def test_generate_is_seeded_and_resumes_after_a_kill(world: Path, generated: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tmp_path / "whole"
    run_generation(gen_config(world, "qwen2", reference, shard_count=3))
    original = generate_module._generate_shard
    calls = []

    def dies_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(generate_module, "_generate_shard", dies_after_one_shard)
    killed = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_generation(gen_config(world, "qwen2", killed, shard_count=3))
    assert sorted(p.name for p in killed.glob("shard-*.json")) == ["shard-00000-of-00003.json"]
    monkeypatch.setattr(generate_module, "_generate_shard", original)
    summary = run_generation(gen_config(world, "qwen2", killed, shard_count=3))
    assert (summary.shards_skipped, summary.shards_computed) == ([0], [1, 2])
    for name in ("shard-00000-of-00003.parquet", "shard-00001-of-00003.parquet", "shard-00002-of-00003.parquet"):
        assert (killed / name).read_bytes() == (reference / name).read_bytes()
    # The same records as with two shards (each prompt's batch is seeded by the prompt ids).
    again = run_generation(gen_config(world, "qwen2", killed, shard_count=3))
    assert again.shards_computed == [] and again.shards_skipped == [0, 1, 2]
    # Another seed samples other answers; into the same directory it is refused, naming the key.
    other = SamplingSettings(n=2, temperature=0.8, max_new_tokens=MAX_NEW, seed=12)
    with pytest.raises(OutputMismatchError, match="sampling"):
        run_generation(gen_config(world, "qwen2", killed, shard_count=3, sampling=other))
    run_generation(gen_config(world, "qwen2", tmp_path / "seed12", shard_count=3, sampling=other))
    assert [r["text"] for r in records(tmp_path / "seed12")] != [r["text"] for r in records(reference)]


def test_temperature_zero_is_greedy(world: Path, tmp_path: Path) -> None:
    """Batched, left-padded greedy generation equals a plain argmax loop on each prompt alone."""
    from transformers import AutoModelForCausalLM

    greedy = SamplingSettings(n=1, temperature=0, max_new_tokens=6, seed=0)
    run_generation(gen_config(world, "llama", tmp_path / "greedy", sampling=greedy))
    renderer, stops, _ = generate_module.prompt_tokenizer(gen_config(world, "llama", tmp_path / "x"))
    model = AutoModelForCausalLM.from_pretrained(str(world / "llama"), dtype=torch.float32).eval()
    messages = prompt_messages(world)
    greedy_rows = records(tmp_path / "greedy")
    assert len(greedy_rows) == len(messages)
    for r in greedy_rows:
        ids = renderer.render_ids(messages[r["prompt_id"]], add_generation_prompt=True)
        new: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                new.append(token)
                if token in stops:
                    break
        expected = finish_sample(RawSample(new), stops, 6, lambda t: renderer.tokenizer.decode(t, skip_special_tokens=True))
        assert (r["text"], r["num_tokens"], r["finish_reason"]) == (expected.text, expected.num_tokens, expected.finish_reason)


def test_finish_reasons_and_vllm_requests_and_results() -> None:
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731
    assert finish_sample(RawSample([5, 6, 9, 7]), [9], 8, decode) == GeneratedSample("5 6", 3, "stop")
    assert finish_sample(RawSample([5, 6, 7]), [9], 3, decode).finish_reason == "length"
    assert finish_sample(RawSample([5, 6], stopped=True), [9], 3, decode).finish_reason == "stop"
    sampling = SamplingSettings(n=3, temperature=0.8, top_p=0.95, max_new_tokens=64, seed=5)
    prompts, params = vllm_requests([Request("p1", [1, 2]), Request("p2", [3])], sampling, [9, 4])
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert params[0] == {"n": 3, "temperature": 0.8, "top_p": 0.95, "top_k": -1, "max_tokens": 64,
                         "seed": request_seed(5, "p1"), "stop_token_ids": [9, 4], "skip_special_tokens": True}
    assert params[0]["seed"] != params[1]["seed"]
    greedy = vllm_requests([Request("p1", [1])], SamplingSettings(n=1, temperature=0), [9])[1][0]
    assert (greedy["temperature"], greedy["top_p"]) == (0.0, 1.0)
    output = SimpleNamespace(outputs=[SimpleNamespace(index=1, token_ids=[7, 8], finish_reason="length"),
                                      SimpleNamespace(index=0, token_ids=[5, 9], finish_reason="stop")])
    samples = raw_samples_from_vllm(output, 2)
    assert [(list(s.token_ids), s.stopped) for s in samples] == [([5, 9], True), ([7, 8], False)]
    assert finish_sample(samples[0], [9], 2, decode) == finish_sample(RawSample([5, 9]), [9], 2, decode)
    with pytest.raises(RuntimeError, match="2 samples for a request of n=3"):
        raw_samples_from_vllm(output, 3)
    with pytest.raises(RuntimeError, match="'abort'"):
        raw_samples_from_vllm(SimpleNamespace(outputs=[SimpleNamespace(index=0, token_ids=[], finish_reason="abort")]), 1)


def _vllm_and_gpu() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _vllm_and_gpu(), reason="needs vllm and a GPU")
def test_vllm_backend_generates_the_same_record_format(world: Path, tmp_path: Path) -> None:
    greedy = SamplingSettings(n=1, temperature=0, max_new_tokens=6, seed=0)
    run_generation(gen_config(world, "llama", tmp_path / "hf", sampling=greedy))
    run_generation(gen_config(world, "llama", tmp_path / "vllm", sampling=greedy, backend="vllm",
                              vllm_engine_args={"gpu_memory_utilization": 0.2, "enforce_eager": True}))
    hf, vllm_rows = records(tmp_path / "hf"), records(tmp_path / "vllm")
    assert [(r["prompt_id"], r["sample_index"], r["prompt_tokens"]) for r in hf] == \
        [(r["prompt_id"], r["sample_index"], r["prompt_tokens"]) for r in vllm_rows]
    # Greedy on a float32 random model: the same tokens, allowing for kernels' rounding on near-ties.
    same = sum(a["text"] == b["text"] for a, b in zip(hf, vllm_rows, strict=True))
    assert same >= len(hf) - 1


# ----------------------------------------------------------------------------- judge


def judge_config(world: Path, generated: dict[str, Path], out: Path, **changes: object) -> JudgeConfig:
    base = dict(data_path=str(world / "prompts.jsonl"), generation_dirs=[str(generated[m]) for m in MODELS],
                output_dir=str(out), judge_type="reward_model", model_path=str(world / "rm"), dtype="float32",
                max_tokens=96, shard_count=2)
    base.update(changes)
    return JudgeConfig(**base)  # type: ignore[arg-type]


def test_reward_model_scores_equal_a_plain_sequence_classification(world: Path, generated: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    summary = run_judge(judge_config(world, generated, tmp_path / "judge"))
    assert summary.shards_computed == [0, 1] and summary.excluded == 0
    scores = records(tmp_path / "judge")
    assert len(scores) == 3 * 5 * 2
    texts = {(r["prompt_id"], r["model"], r["sample_index"]): r["text"] for m in MODELS for r in records(generated[m])}
    assert {(r["prompt_id"], r["model"], r["sample_index"]) for r in scores} == set(texts)
    renderer = ResponseTokenizer(load_tokenizer(world / "rm"))
    model = AutoModelForSequenceClassification.from_pretrained(str(world / "rm"), dtype=torch.float32).eval()
    messages = prompt_messages(world)
    for r in scores:
        conversation = messages[r["prompt_id"]] + [
            {"role": "assistant", "content": texts[(r["prompt_id"], r["model"], r["sample_index"])]}]
        ids = renderer.render_ids(conversation, add_generation_prompt=False)
        with torch.no_grad():
            plain = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        assert r["score"] == pytest.approx(plain, abs=1e-4)
    assert len({round(r["score"], 6) for r in scores}) > 20  # a real spread, not a constant
    # Rerun: nothing to do; another reward model into the same directory is refused.
    assert run_judge(judge_config(world, generated, tmp_path / "judge")).shards_skipped == [0, 1]
    with pytest.raises(OutputMismatchError, match="judge"):
        run_judge(judge_config(world, generated, tmp_path / "judge", judge_type="function",
                               function="nemo_infifpo.generation.verifiers:reference_similarity"))


JUDGE_MODULE = '''
import math

BAD = {}

def score(row, answer):
    key = (row["id"], answer)
    if BAD.get(key) == "raise":
        raise ValueError("cannot judge this one")
    if BAD.get(key) == "nan":
        return math.nan
    return len(answer) + int(row["reference"])

def always_raises(row, answer):
    raise RuntimeError("broken judge")
'''


def test_function_judge_excludes_and_reports_answers_it_cannot_score(world: Path, generated: dict[str, Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = records(generated["phi3"])
    bad = {(rows[0]["prompt_id"], rows[0]["text"]): "raise", (rows[3]["prompt_id"], rows[3]["text"]): "nan"}
    (tmp_path / "tiny_judges.py").write_text(JUDGE_MODULE.replace("BAD = {}", f"BAD = {bad!r}"))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = judge_config(world, generated, tmp_path / "judge", judge_type="function", function="tiny_judges:score",
                          max_failed_fraction=0.2)
    summary = run_judge(config)
    assert summary.excluded == 2 and summary.scored == 28
    reference = {str(p.get("id", "")): p["reference"] for p in PROMPTS}
    texts = {(r["prompt_id"], r["model"], r["sample_index"]): r["text"] for m in MODELS for r in records(generated[m])}
    for r in records(tmp_path / "judge"):
        text = texts[(r["prompt_id"], r["model"], r["sample_index"])]
        if r["prompt_id"] in reference:
            assert r["score"] == len(text) + int(reference[r["prompt_id"]])
    excluded = [e for k in range(2) for e in outputs.read_sidecar(tmp_path / "judge", k, 2)["excluded"]]
    assert sorted(e["reason"] for e in excluded) == ["judge_error", "judge_nan"]
    assert any("cannot judge this one" in e["detail"] for e in excluded)
    assert {(e["id"], e["model"]) for e in excluded} == {(rows[0]["prompt_id"], "phi3"), (rows[3]["prompt_id"], "phi3")}
    # build_pairs reports them and leaves those answers out.
    report = build_pairs(BuildPairsConfig(data_path=config.data_path, generation_dirs=config.generation_dirs,
                                          judge_dir=config.output_dir, output_dir=str(tmp_path / "pairs"),
                                          rules=PairRules(allow_truncated=True)))
    assert report["judge_excluded"]["by_reason"] == {"judge_error": 1, "judge_nan": 1}
    assert report["candidates"]["excluded"]["unjudged"] == 2
    # A judge that fails on everything stops the shard with a summary, and writes nothing.
    broken = judge_config(world, generated, tmp_path / "broken", judge_type="function", function="tiny_judges:always_raises")
    with pytest.raises(TooManyExcludedRows, match="judge_error"):
        run_judge(broken)
    assert not list((tmp_path / "broken").glob("shard-*"))


# ----------------------------------------------------------------------------- bad inputs


def run_recipe(name: str, *args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(REPO / "recipes" / name), *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


@pytest.mark.slow
def test_bad_inputs_give_one_clear_line_and_lose_nothing(world: Path, generated: dict[str, Path], tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_recipe("generate.py", f"model.path={world / 'phi3'}", f"data.path={empty}", f"output_dir={tmp_path / 'o1'}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: generate: {empty}: no prompts (the file is empty)"

    # A model directory that cannot generate (config and tokenizer, no weights): stopped with a
    # message naming it; the finished output of an earlier run next to it is untouched.
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in (world / "phi3").iterdir():
        if "safetensors" not in path.name:
            (broken / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in generated["phi3"].iterdir()}
    result = run_recipe("generate.py", f"model.path={broken}", f"data.path={world / 'prompts.jsonl'}",
                        f"output_dir={tmp_path / 'o2'}", "dtype=float32")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: generate: model.path '{broken}': cannot load a causal language model")
    assert not list((tmp_path / "o2").glob("shard-*"))
    # Once the weights are there, the same command works: the failed run computed nothing.
    for path in (world / "phi3").iterdir():
        if "safetensors" in path.name:
            (broken / path.name).write_bytes(path.read_bytes())
    result = run_recipe("generate.py", f"model.path={broken}", f"data.path={world / 'prompts.jsonl'}",
                        f"output_dir={tmp_path / 'o2'}", "dtype=float32", "sampling.max_new_tokens=4")
    assert result.returncode == 0, result.stderr
    assert "replacing the manifest of a run that computed nothing" in result.stderr
    assert len(records(tmp_path / "o2")) == 5
    # ... and pointed at an earlier output, refused before anything is computed.
    result = run_recipe("generate.py", f"model.path={world / 'qwen2'}", f"data.path={world / 'prompts.jsonl'}",
                        f"output_dir={generated['phi3']}", "dtype=float32", "shard.count=2", "sampling.n=2",
                        f"sampling.max_new_tokens={MAX_NEW}", "sampling.seed=11")
    assert result.returncode == 1 and "already holds generate results computed from different inputs" in result.stderr
    assert "model_fingerprint" in result.stderr and "tokenizer_fingerprint" in result.stderr
    assert {p.name: p.read_bytes() for p in generated["phi3"].iterdir()} == before

    result = run_recipe("generate.py", f"model.path={world / 'phi3'}", f"data.path={world / 'prompts.jsonl'}",
                        f"output_dir={tmp_path / 'o3'}", "sampling.temperature=-1")
    assert result.returncode == 1 and "sampling.temperature must be a number >= 0" in result.stderr
    result = run_recipe("judge.py", f"data.path={world / 'prompts.jsonl'}", f"generation_dirs=[{tmp_path / 'o3'}]",
                        f"output_dir={tmp_path / 'j'}", "judge.type=function", "judge.function=no_such_module:f")
    assert result.returncode == 1 and "generation_dirs[0]" in result.stderr
    result = run_recipe("judge.py", f"data.path={world / 'prompts.jsonl'}", f"generation_dirs=[{generated['phi3']}]",
                        f"output_dir={tmp_path / 'j'}", "judge.type=function", "judge.function=no_such_module:f")
    assert result.returncode == 1 and "cannot import 'no_such_module'" in result.stderr
    result = run_recipe("judge.py", f"data.path={world / 'prompts.jsonl'}", f"generation_dirs=[{generated['phi3']}]",
                        f"output_dir={tmp_path / 'j'}", "judge.type=reward_model")
    assert result.returncode == 1 and "judge.type=reward_model needs judge.model_path" in result.stderr


@pytest.mark.slow
def test_reward_model_ranks_share_the_answers(world: Path, generated: dict[str, Path], tmp_path: Path) -> None:
    """Two torchrun ranks (gloo) judge the same answers as one process, and rank 0 writes them."""
    from torchrun import free_port

    run_judge(judge_config(world, generated, tmp_path / "one", shard_count=1))
    args = [f"data.path={world / 'prompts.jsonl'}", "generation_dirs=[" + ",".join(str(generated[m]) for m in MODELS) + "]",
            f"output_dir={tmp_path / 'two'}", "judge.type=reward_model", f"judge.model_path={world / 'rm'}",
            "dtype=float32", "batch.max_tokens=64"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                             f"--master_port={free_port()}", str(REPO / "recipes" / "judge.py"), *args],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = records(tmp_path / "one"), records(tmp_path / "two")
    assert [(r["prompt_id"], r["model"], r["sample_index"]) for r in two] == [(r["prompt_id"], r["model"], r["sample_index"]) for r in one]
    for a, b in zip(one, two, strict=True):
        assert b["score"] == pytest.approx(a["score"], abs=1e-4)


def test_prompt_rows_name_the_file_line_and_field(tmp_path: Path) -> None:
    from nemo_infifpo.data.policy import RowPolicy
    from nemo_infifpo.data.rows import PreferenceDataError
    from nemo_infifpo.generation.prompts import prompt_hash_id, read_prompt_rows

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok", "reference": 4}\nnot json\n{"prompt": ""}\n'
                    '{"id": "x", "prompt": [{"role": "assistant", "content": "a"}]}\n{"id": 3, "prompt": "dup"}\n{"id": "3", "prompt": "dup"}\n')
    read = read_prompt_rows(path, policy=RowPolicy(max_excluded_fraction=1.0))
    assert [(r.id, r.extra) for r in read.rows] == [(prompt_hash_id([{"role": "user", "content": "ok"}]), {"reference": 4})]
    assert [e.reason for e in read.excluded] == ["invalid_json", "empty_content", "invalid_row", "duplicate_id", "duplicate_id"]
    assert read.excluded[2].detail == f"{path}, line 4 (id 'x'): field 'prompt': must end with a user message, it ends with 'assistant'"
    with pytest.raises(PreferenceDataError, match=r"line 2: invalid JSON"):
        read_prompt_rows(path, policy=RowPolicy(on_invalid_row="fail"))
    with pytest.raises(TooManyExcludedRows, match="5 of 6 prompts are invalid"):
        read_prompt_rows(path)
