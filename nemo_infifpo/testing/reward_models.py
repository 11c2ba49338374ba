"""A tiny random reward model (``AutoModelForSequenceClassification`` with one label) with its
own tokenizer and chat template, built offline, for the judge stage's tests and demos."""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_tiny_reward_model"]


def save_tiny_reward_model(directory: str | Path, *, family: str = "llama", seed: int = 0) -> Path:
    """Save a random sequence-classification model of ``family`` (one score per conversation),
    with the family's tokenizer and template, to ``directory``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from nemo_infifpo.testing.models import randomize_, tiny_hf_config, tiny_tokenizer
    from nemo_infifpo.testing.tokenizers import save_tokenizer

    directory = Path(directory)
    config = tiny_hf_config(family, num_labels=1)
    config.architectures = [type(config).__name__.replace("Config", "ForSequenceClassification")]
    tokenizer = tiny_tokenizer(family, config.vocab_size)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager", dtype=torch.float32)
    randomize_(model, seed)
    model.eval().save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory
