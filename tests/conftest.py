"""Shared test set-up: offline hub, deterministic CPU threads, helpers for multi-rank runs."""

import os

# Nothing in the test-suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402
from typing import Iterator  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_leaked_global_torch_state():
    """A test (or the code it runs in-process) must not switch gradients off for the whole
    process: every later test would then fail far from the cause."""
    import torch

    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "gradients were left disabled for the whole process (torch.set_grad_enabled(False))"


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[None]:
    """A one-process gloo world with megatron's groups at TP=PP=1, torn down afterwards."""
    import torch.distributed as dist

    from nemo_infifpo.engine.distributed import destroy_distributed, init_distributed

    already = dist.is_initialized()
    init_distributed(1, 1, device="cpu")
    yield
    if not already:
        destroy_distributed()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (HF directory with tokenizer)."""
    from nemo_infifpo.testing.models import save_tiny_hf_model

    return save_tiny_hf_model("llama", tmp_path_factory.mktemp("hf") / "llama")
