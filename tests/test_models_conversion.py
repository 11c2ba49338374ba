"""Import/export in one process (world of 1): bad inputs fail early and clearly, and a quick
HF -> checkpoint -> HF round trip is bit-exact (the multi-rank layouts are in
test_models_parallel.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from nemo_infifpo.models.checkpoint import (
    HF_ASSETS_DIR,
    METADATA_FILE,
    WEIGHTS_DIR,
    CheckpointMetadata,
    hf_assets_dir,
    is_megatron_checkpoint,
    load_megatron_model,
)
from nemo_infifpo.models.conversion import export_checkpoint_to_hf, import_hf_checkpoint
from nemo_infifpo.models.errors import (
    CheckpointFormatError,
    MissingWeightsError,
    UnexpectedWeightsError,
    UnsupportedArchitectureError,
    UnsupportedRopeScalingError,
    WeightShapeError,
)
from nemo_infifpo.models.hf_io import SAFETENSORS_INDEX, ShardedSafetensorsWriter, parse_size


# world_of_one and tiny_llama: tests/conftest.py


@pytest.fixture
def llama_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "llama"))


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = json.loads((directory / SAFETENSORS_INDEX).read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        out.update(load_file(directory / file))
    return out


# --------------------------------------------------------------------------- round trip


def test_import_export_round_trip_is_bit_exact(world_of_one: None, tiny_llama: Path, tmp_path: Path) -> None:
    checkpoint = import_hf_checkpoint(tiny_llama, tmp_path / "ckpt")
    assert is_megatron_checkpoint(checkpoint)
    assert (checkpoint / WEIGHTS_DIR / "metadata.json").is_file()
    assert hf_assets_dir(checkpoint) == checkpoint / HF_ASSETS_DIR
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (checkpoint / HF_ASSETS_DIR).iterdir()
    }
    metadata = CheckpointMetadata.read(checkpoint)
    assert (metadata.architecture, metadata.vocab_size, metadata.padded_vocab_size) == ("LlamaForCausalLM", 307, 384)
    assert metadata.source_path == str(tiny_llama.resolve()) and len(metadata.source_fingerprint or "") == 64

    out = export_checkpoint_to_hf(checkpoint, tmp_path / "out", max_shard_size="30KB")
    got, expected = _safetensors(out), _safetensors(tiny_llama)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], tensor) for name, tensor in expected.items())
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1


def test_bfloat16_load_of_a_float32_checkpoint(world_of_one: None, tiny_llama: Path, tmp_path: Path) -> None:
    checkpoint = import_hf_checkpoint(tiny_llama, tmp_path / "ckpt")
    loaded = load_megatron_model(checkpoint, params_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    out = export_checkpoint_to_hf(checkpoint, tmp_path / "out", dtype="bfloat16")
    got = _safetensors(out)
    assert all(torch.equal(got[n], t.to(torch.bfloat16)) for n, t in _safetensors(tiny_llama).items())


def test_existing_output_is_not_overwritten_unless_asked(world_of_one: None, tiny_llama: Path, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        import_hf_checkpoint(tiny_llama, tmp_path / "ckpt")
    import_hf_checkpoint(tiny_llama, tmp_path / "ckpt", overwrite=True)
    assert not (tmp_path / "ckpt" / "keep.txt").exists() and (tmp_path / "ckpt" / METADATA_FILE).is_file()


# --------------------------------------------------------------------------- bad inputs


def test_missing_weight_file_is_named(world_of_one: None, llama_copy: Path) -> None:
    shard = sorted(llama_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingWeightsError, match=f"weight file\\(s\\) that do not exist: {shard.name}"):
        load_megatron_model(llama_copy)


def test_missing_index_is_named(world_of_one: None, llama_copy: Path) -> None:
    (llama_copy / SAFETENSORS_INDEX).unlink()
    with pytest.raises(MissingWeightsError, match=r"safetensors shard\(s\) .* but no weight index model.safetensors.index.json"):
        load_megatron_model(llama_copy)


def test_directory_without_weights(world_of_one: None, llama_copy: Path) -> None:
    for file in llama_copy.glob("model*"):
        file.unlink()
    with pytest.raises(MissingWeightsError, match="expected model.safetensors or model.safetensors.index.json"):
        load_megatron_model(llama_copy)


def test_missing_and_unexpected_tensors_are_named(world_of_one: None, llama_copy: Path) -> None:
    index_path = llama_copy / SAFETENSORS_INDEX
    index = json.loads(index_path.read_text())
    removed = index["weight_map"].pop("model.layers.1.mlp.up_proj.weight")
    index_path.write_text(json.dumps(index))
    with pytest.raises(MissingWeightsError, match="lacks tensor\\(s\\) model.layers.1.mlp.up_proj.weight"):
        load_megatron_model(llama_copy)
    index["weight_map"]["model.layers.1.mlp.up_proj.weight"] = removed
    index["weight_map"]["model.layers.9.extra.weight"] = removed
    index_path.write_text(json.dumps(index))
    with pytest.raises(UnexpectedWeightsError, match="model.layers.9.extra.weight"):
        load_megatron_model(llama_copy)


def test_shape_mismatch_names_the_tensor(world_of_one: None, llama_copy: Path) -> None:
    _edit_json(llama_copy / "config.json", intermediate_size=120)
    with pytest.raises(
        WeightShapeError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight': expected shape \(120, 64\), got \(112, 64\)"
    ):
        load_megatron_model(llama_copy)


def test_unsupported_architecture_in_a_checkpoint(world_of_one: None, llama_copy: Path) -> None:
    _edit_json(llama_copy / "config.json", architectures=["GemmaForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError, match="supported architectures: Phi3ForCausalLM, LlamaForCausalLM"):
        load_megatron_model(llama_copy)


def test_unsupported_rope_scaling_in_a_checkpoint(world_of_one: None, llama_copy: Path) -> None:
    _edit_json(llama_copy / "config.json", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedRopeScalingError, match="'dynamic' is not supported"):
        load_megatron_model(llama_copy)


def test_neither_hf_nor_checkpoint(world_of_one: None, tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError, match="neither a Hugging Face model directory"):
        load_megatron_model(tmp_path)


def test_layout_must_match_the_initialised_world(world_of_one: None, tiny_llama: Path) -> None:
    with pytest.raises(ValueError, match="asked for tp=2, pp=1 but distributed was initialised with tp=1, pp=1"):
        load_megatron_model(tiny_llama, 2, 1)


# --------------------------------------------------------------------------- writer


def test_shard_writer_caps_shards_and_indexes_every_tensor(tmp_path: Path) -> None:
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_size=1000)
    tensors = {f"t{i}": torch.full((50,), float(i)) for i in range(9)}  # 200 bytes each
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    index = json.loads(writer.finish().read_text())
    files = sorted(tmp_path.glob("model-*.safetensors"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert index["metadata"]["total_size"] == 9 * 200 and set(index["weight_map"]) == set(tensors)
    got = _safetensors(tmp_path)
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(7) == 7
