"""Reading and writing Hugging Face checkpoint directories (safetensors, config, tokenizer).

Reading is lazy and per tensor: :class:`HFCheckpointReader` memory-maps each safetensors file
with ``safe_open`` and materialises one tensor when asked, so converting a 14B model never
holds a second full copy of it. Writing streams tensors into size-capped shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

import torch

from nemo_infifpo.models.errors import (
    CheckpointFormatError,
    MissingWeightsError,
    UnexpectedWeightsError,
    WeightShapeError,
)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# Files that travel with the weights: tokenizer in all its formats, chat template, licence.
ASSET_PATTERNS = (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template*",
    "preprocessor_config.json",
    "LICENSE*",
    "NOTICE*",
)

# Non-parameter tensors some checkpoints carry (old transformers saved RoPE buffers).
_IGNORABLE_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_hf_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (
        (path / SAFETENSORS_INDEX).is_file() or (path / SINGLE_SAFETENSORS).is_file() or any(path.glob("*.safetensors"))
    )


def load_hf_config(path: str | Path) -> Any:
    """The HF config of a local directory (never touches the hub)."""
    from transformers import AutoConfig

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise CheckpointFormatError(f"{path} has no {CONFIG_FILE}; not a Hugging Face model directory")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def expected_hf_shapes(hf_config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the HF model ``hf_config`` describes (built on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


# --------------------------------------------------------------------------- reading


class HFCheckpointReader:
    """Lazy access to the tensors of a safetensors HF checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.weight_map = self._read_weight_map()
        self._handles: dict[str, Any] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            missing = sorted({f for f in weight_map.values() if not (self.directory / f).is_file()})
            if missing:
                raise MissingWeightsError(
                    f"{index} references weight file(s) that do not exist: {', '.join(missing)}"
                )
            return dict(weight_map)
        single = self.directory / SINGLE_SAFETENSORS
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as handle:
                return {name: SINGLE_SAFETENSORS for name in handle.keys()}
        shards = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if shards:
            raise MissingWeightsError(
                f"{self.directory} has {len(shards)} safetensors shard(s) ({shards[0]}, ...) but no "
                f"weight index {SAFETENSORS_INDEX}"
            )
        legacy = sorted(p.name for p in self.directory.glob("pytorch_model*.bin"))
        hint = f" (found {legacy[0]}: re-save the model with safe_serialization=True)" if legacy else ""
        raise MissingWeightsError(
            f"no weights in {self.directory}: expected {SINGLE_SAFETENSORS} or {SAFETENSORS_INDEX}{hint}"
        )

    def __enter__(self) -> "HFCheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str) -> Any:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise MissingWeightsError(f"tensor {name!r} is not in the checkpoint {self.directory}")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except MissingWeightsError:
            raise
        except Exception as error:  # the index claims a tensor its file lacks
            raise MissingWeightsError(
                f"tensor {name!r} not readable from {self.weight_map[name]}: {error}"
            ) from error

    def validate(self, required: Iterable[str], shapes: dict[str, tuple[int, ...]], *, optional: Iterable[str] = ()) -> None:
        """Fail early, naming tensors: missing ones, unexpected ones, wrong shapes."""
        required = list(required)
        present = set(self.weight_map)
        missing = [n for n in required if n not in present]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise MissingWeightsError(
                f"checkpoint {self.directory} lacks tensor(s) {', '.join(missing[:5])}{more}"
            )
        allowed = set(required) | set(optional)
        unexpected = sorted(n for n in present - allowed if not _IGNORABLE_TENSORS.search(n))
        if unexpected:
            raise UnexpectedWeightsError(
                f"checkpoint {self.directory} has tensor(s) the architecture does not use: "
                f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
            )
        for name in required:
            expected, got = shapes.get(name), self.shape(name)
            if expected is not None and tuple(expected) != got:
                raise WeightShapeError(f"tensor {name!r}: expected shape {tuple(expected)}, got {got}")


def fingerprint_hf_checkpoint(directory: str | Path) -> str:
    """sha256 over config.json and every weight file's name, size and safetensors header.

    Headers list each tensor's name, dtype, shape and byte range, so any re-save or edit of
    the weights changes the fingerprint; it costs kilobytes of reading, not the weights.
    """
    directory = Path(directory)
    digest = hashlib.sha256()
    digest.update((directory / CONFIG_FILE).read_bytes())
    for file in sorted(directory.glob("*.safetensors")):
        digest.update(file.name.encode())
        digest.update(str(file.stat().st_size).encode())
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            digest.update(handle.read(header_len))
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as HF's ``max_shard_size``); ints pass through."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


class ShardedSafetensorsWriter:
    """Stream tensors into ``model-0000i-of-0000n.safetensors`` shards plus the weight index."""

    def __init__(self, directory: str | Path, max_shard_size: str | int = "5GB") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = parse_size(max_shard_size)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # Own, contiguous storage: safetensors refuses views that share memory.
        self._pending[name] = tensor.detach().cpu().contiguous().clone()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        temp_name = f".partial-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.directory / temp_name), metadata={"format": "pt"})
        self._shards.append((temp_name, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> Path:
        """Write the last shard, give shards their final names, write the index; return it."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        weight_map: dict[str, str] = {}
        for number, (temp_name, names) in enumerate(self._shards, start=1):
            final = f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / temp_name, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = self.directory / SAFETENSORS_INDEX
        index.write_text(
            json.dumps({"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
            + "\n"
        )
        return index


def copy_hf_assets(source: str | Path, destination: str | Path) -> list[str]:
    """Copy config, generation config, tokenizer and licence files; return the names copied."""
    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        # Never leave a checkpoint whose assets are silently missing: export needs them.
        raise FileNotFoundError(f"{source} has no config.json: cannot copy the model's HF assets from it")
    destination.mkdir(parents=True, exist_ok=True)
    copied: list[str] = []
    for pattern in ASSET_PATTERNS:
        for file in sorted(source.glob(pattern)):
            if file.is_file() and file.name not in copied:
                # Contents only: the copy gets this process's umask like every file we write
                # (a read-only source must not make the checkpoint unreadable to the group).
                shutil.copyfile(file, destination / file.name)
                copied.append(file.name)
    return copied


def write_config_with_dtype(source_config: str | Path, destination: str | Path, dtype: torch.dtype) -> None:
    """Copy config.json verbatim except its dtype entry, which must match the written weights."""
    config = json.loads(Path(source_config).read_text())
    name = str(dtype).removeprefix("torch.")
    key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[key] = name
    Path(destination).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
