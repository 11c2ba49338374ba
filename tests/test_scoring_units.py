"""Scoring building blocks: token-budget batching, shards, fingerprints, configs, and the hf
back end's choice between hidden-state and model-logit log-probs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from nemo_infifpo.data.rows import rows_from_records
from nemo_infifpo.data.templates import TokenizedSequence
from nemo_infifpo.scoring.batching import batch_stats, collate, plan_batches
from nemo_infifpo.scoring.job import ScoreConfig
from nemo_infifpo.scoring.manifest import ScoringIdentity, dataset_fingerprint, model_fingerprint
from nemo_infifpo.scoring.shards import shard_slices, split_rows

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- batching


@pytest.mark.parametrize("sort", [True, False])
def test_batches_cover_every_sequence_once_within_budget(sort: bool) -> None:
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    batches = plan_batches(lengths, 1024, sort_by_length=sort, pad_to_multiple_of=8)
    assert sorted(i for b in batches for i in b.indices) == list(range(len(lengths)))
    for batch in batches:
        assert batch.padded_length % 8 == 0
        assert batch.padded_length >= max(lengths[i] for i in batch.indices)
        assert batch.padded_tokens <= 1024
    if sort:  # longest first: the biggest batch runs first
        assert batches[0].padded_length == max(-(-n // 8) * 8 for n in lengths)


def test_length_sorting_removes_most_padding() -> None:
    rng = random.Random(1)
    lengths = [rng.randint(10, 1000) for _ in range(2000)]
    by_length = batch_stats(plan_batches(lengths, 8192), lengths)
    file_order = batch_stats(plan_batches(lengths, 8192, sort_by_length=False), lengths)
    assert by_length.real_tokens == file_order.real_tokens == sum(lengths)
    assert by_length.padding_fraction < 0.05 < 0.3 < file_order.padding_fraction
    assert by_length.num_batches < file_order.num_batches


def test_batching_edge_cases() -> None:
    # A sequence longer than the budget gets a batch of its own instead of being dropped.
    batches = plan_batches([50, 500, 40], 100)
    assert [b.indices for b in batches] == [(1,), (0, 2)]  # 2 x 50 fits the budget of 100
    assert [len(b.indices) for b in plan_batches([10] * 10, 1000, max_sequences=4)] == [4, 4, 2]
    assert plan_batches([], 100) == []
    with pytest.raises(ValueError, match="max_tokens"):
        plan_batches([1], 0)


def test_collate_right_pads_and_masks_the_response() -> None:
    seqs = [TokenizedSequence([5, 6, 7, 8], 2), TokenizedSequence([9, 10, 11], 1)]
    tokens, mask = collate(seqs, 6)
    assert tokens.tolist() == [[5, 6, 7, 8, 0, 0], [9, 10, 11, 0, 0, 0]]
    assert mask.tolist() == [
        [False, False, True, True, False, False],
        [False, True, True, False, False, False],
    ]
    with pytest.raises(ValueError, match="padded_length"):
        collate(seqs, 3)


# --------------------------------------------------------------------------- shards and fingerprints

RECORDS = [{"id": f"r{i:03d}", "prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(23)]


def test_shards_are_contiguous_in_id_order_and_balanced() -> None:
    rows = rows_from_records(RECORDS)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    shards = split_rows(shuffled, 5)
    assert [len(s) for s in shards] == [4, 5, 4, 5, 5]
    assert [r.id for s in shards for r in s] == sorted(r.id for r in rows)  # contiguous, id order
    assert split_rows(rows, 5) == shards  # file order does not matter
    assert sum((s.stop - s.start for s in shard_slices(2, 4)), 0) == 2  # more shards than rows: some empty
    with pytest.raises(ValueError):
        shard_slices(3, 0)


def test_dataset_fingerprint_depends_on_content_not_order() -> None:
    rows = rows_from_records(RECORDS)
    assert dataset_fingerprint(rows) == dataset_fingerprint(list(reversed(rows)))
    changed = rows_from_records(RECORDS[:-1] + [{**RECORDS[-1], "chosen": "yes!"}])
    assert dataset_fingerprint(changed) != dataset_fingerprint(rows)
    assert dataset_fingerprint(rows[:-1]) != dataset_fingerprint(rows)


def test_model_fingerprint(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 8}')
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    first = model_fingerprint(model)
    # Tokenizer files and hidden files are not the model.
    (model / "tokenizer.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ x }}")
    (model / ".cache").mkdir()
    (model / ".cache" / "lock").write_text("x")
    assert model_fingerprint(model) == first
    (model / "config.json").write_text('{"hidden_size": 16}')
    second = model_fingerprint(model)
    assert second != first
    (model / "model.safetensors").write_bytes(b"\x00" * 65)
    assert model_fingerprint(model) != second
    with pytest.raises(FileNotFoundError):
        model_fingerprint(tmp_path / "missing")


def test_identity_differences_name_the_fields() -> None:
    a = ScoringIdentity("a" * 64, "t", "d", 4096, "bfloat16", "megatron", 8)
    b = ScoringIdentity("b" * 64, "t", "d", 2048, "bfloat16", "megatron", 8)
    assert a.differences(b) == [
        "model_fingerprint: aaaaaaaaaaaa… vs bbbbbbbbbbbb…",
        "max_length: 4096 vs 2048",
    ]
    assert ScoringIdentity.from_dict(a.to_dict()) == a and a.digest() != b.digest()


# --------------------------------------------------------------------------- configs


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name=name, overrides=overrides)


def test_score_config_from_hydra() -> None:
    from omegaconf import OmegaConf

    cfg = _compose(
        "score",
        [
            "model.path=/m",
            "data.path=/d.jsonl",
            "output_dir=/o",
            "shard.count=4",
            "shard.index=2",
            "model.backend=hf",
            "batch.max_tokens=999",
            "tokenizer.chat_template=plain",
        ],
    )
    config = ScoreConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert (config.model_path, config.data_path, config.output_dir) == ("/m", "/d.jsonl", "/o")
    assert (config.shard_index, config.shard_count, config.backend) == (2, 4, "hf")
    assert (config.max_tokens, config.chat_template, config.max_length, config.dtype) == (
        999,
        "plain",
        4096,
        "bfloat16",
    )
    config.validate()
    assert config.packing is False and config.pack_length is None  # the documented defaults
    packed = ScoreConfig.from_mapping(OmegaConf.to_container(
        _compose("score", ["model.path=/m", "data.path=/d", "output_dir=/o", "batch.packing=true", "batch.pack_length=8192"]),
        resolve=True))
    assert (packed.packing, packed.pack_length) == (True, 8192)
    with pytest.raises(ValueError, match="batch.packing must be true or false, got 'yes'"):
        ScoreConfig.from_mapping(OmegaConf.to_container(
            _compose("score", ["model.path=/m", "data.path=/d", "output_dir=/o", "batch.packing=yes"]), resolve=True))

    with pytest.raises(ValueError, match="model.path, output_dir"):
        ScoreConfig.from_mapping(OmegaConf.to_container(_compose("score", ["data.path=/d"]), resolve=True))
    for bad, message in [
        (dict(shard_index=4, shard_count=4), r"shard.index must be in \[0, 4\)"),
        (dict(backend="vllm"), "model.backend"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(backend="hf", packing=True), "batch.packing=true needs model.backend=megatron"),
        (dict(max_length=512, pack_length=256), r"batch.pack_length must be >= data.max_length \(512\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            ScoreConfig(model_path="m", data_path="d", output_dir="o", **bad).validate()


def test_merge_config_loads() -> None:
    cfg = _compose(
        "merge_scores", ["data.path=/d", "pivot_dir=/p", "source_dirs=[/a,/b]", "output_path=/o.parquet"]
    )
    assert list(cfg.source_dirs) == ["/a", "/b"] and cfg.source_names is None


# --------------------------------------------------------------------------- hf back end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nemo_infifpo.testing.models import save_tiny_hf_model

    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("hf_backend") / "llama", seed=4)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (3, 20), generator=generator)
    mask = torch.zeros(3, 20, dtype=torch.bool)
    mask[0, 5:20] = True
    mask[1, 3:12] = True
    mask[2, 10:15] = True
    return tokens, mask


def test_hf_backend_hidden_and_logit_paths_agree(tiny_model_dir: Path) -> None:
    from nemo_infifpo.scoring.backends import HFBackend

    hidden = HFBackend(tiny_model_dir, dtype=torch.float32, logits_mode="auto")
    tokens, mask = _batch(hidden.vocab_size)
    sums_h, counts_h = hidden.score(tokens, mask)
    assert hidden._mode == "hidden"  # plain lm_head: the cheap path is exact
    logits = HFBackend(tiny_model_dir, dtype=torch.float32, logits_mode="logits")
    sums_l, counts_l = logits.score(tokens, mask)
    assert counts_h.tolist() == counts_l.tolist() == [15, 9, 5]
    torch.testing.assert_close(sums_h, sums_l, rtol=0, atol=1e-4)


def test_hf_backend_falls_back_to_model_logits(tiny_model_dir: Path) -> None:
    """A model that transforms its logits (here: soft-capping, as Gemma-2 does) must be scored
    from its own logits; the probe on the first batch notices."""
    from nemo_infifpo.scoring.backends import HFBackend

    backend = HFBackend(tiny_model_dir, dtype=torch.float32)
    forward = backend.model.forward

    def capped(*args, **kwargs):
        output = forward(*args, **kwargs)
        output.logits = 3.0 * torch.tanh(output.logits / 3.0)
        return output

    backend.model.forward = capped
    tokens, mask = _batch(backend.vocab_size)
    sums, _ = backend.score(tokens, mask)
    assert backend._mode == "logits"
    with torch.no_grad():
        logp = torch.log_softmax(capped(input_ids=tokens[:, :-1]).logits.float(), -1)
    expected = (logp.gather(-1, tokens[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
    torch.testing.assert_close(sums, expected, rtol=0, atol=1e-4)

    with pytest.raises(ValueError, match="outside the vocabulary"):
        backend.score(torch.full((1, 4), backend.vocab_size), torch.tensor([[False, True, True, True]]))
