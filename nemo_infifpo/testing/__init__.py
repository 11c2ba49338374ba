"""Test helpers that other parts of the project (tests, benchmarks, the offline demo) reuse."""

from nemo_infifpo.testing.tokenizers import (
    TINY_CORPUS,
    chatml_tokenizer,
    llama3_tokenizer,
    phi_tokenizer,
    plain_tokenizer,
    save_tokenizer,
    unstable_tokenizer,
)

__all__ = [
    "TINY_CORPUS",
    "chatml_tokenizer",
    "llama3_tokenizer",
    "phi_tokenizer",
    "plain_tokenizer",
    "save_tokenizer",
    "unstable_tokenizer",
]
