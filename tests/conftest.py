"""Shared test set-up: offline hub, deterministic CPU threads, helpers for multi-rank runs."""

import os

# Nothing in the test-suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
