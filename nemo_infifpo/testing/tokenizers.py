"""Tiny, offline tokenizers with real-style chat templates, for tests, benchmarks and demos.

Each builder trains a byte-level BPE (every byte string is encodable; pre-tokenisation and
merges behave like Qwen's or Llama 3's) on a small built-in corpus in a few
milliseconds, then wraps it as a ``transformers`` fast tokenizer with its special tokens
registered as special, ``bos``/``eos``/``pad`` set, and a chat template in the style of a real
model family:

==========================  ==============================================================
``chatml_tokenizer()``      Qwen-like ``<|im_start|>role\\ncontent<|im_end|>\\n``
``phi_tokenizer()``         Phi-4-like ``<|im_start|>role<|im_sep|>content<|im_end|>``
``llama3_tokenizer()``      Llama-3-like, ``<|begin_of_text|>`` + header/``<|eot_id|>`` turns;
                            like the real one it also adds BOS when asked for special tokens
``plain_tokenizer()``       no chat template (a base model); adds ``<s>`` like Llama-2
``unstable_tokenizer()``    ChatML whose generation prompt opens a ``<think>`` block that the
                            rendered conversation does not contain: not prefix-stable
==========================  ==============================================================

Different builders give different vocabularies: vocabulary sizes differ, special tokens sit at
the end of the vocabulary (as in Qwen and Llama), and every builder shuffles the ids of the
ordinary tokens with its own seed, so the same text maps to different ids and usually to a
different number of tokens. ``vocab_size`` (the total, special tokens included, exactly
``len(tokenizer)``) can be chosen, odd sizes included, to exercise vocabulary padding; sizes
beyond what the corpus can merge (about 900) are filled with ``<|reserved_N|>`` special tokens.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "TINY_CORPUS",
    "chatml_tokenizer",
    "llama3_tokenizer",
    "phi_tokenizer",
    "plain_tokenizer",
    "save_tokenizer",
    "unstable_tokenizer",
]

# Original text written for this project: a bit of prose, dialogue, code, arithmetic and a
# few non-ASCII words, so that merges cover the kinds of strings tests throw at tokenizers.
TINY_CORPUS: tuple[str, ...] = (
    "The pivot model learns from several source models without ever loading them at once.",
    "Each source scores the preferred and the dispreferred answer with its own tokenizer.",
    "A preference row holds a prompt, a chosen response and a rejected response.",
    "What is the capital of France? The capital of France is Paris.",
    "How many legs does a spider have? A spider has eight legs.",
    "Please write a short poem about the sea at night.",
    "The sea at night is dark and quiet, and the stars are bright above the waves.",
    "Explain why the sky looks blue during the day and red in the evening.",
    "Sunlight scatters off the air; short blue waves scatter more than long red ones.",
    "def add(a, b):\n    return a + b\n",
    "def mean(values):\n    total = sum(values)\n    return total / len(values)\n",
    "for index in range(10):\n    print(index * index)\n",
    "import math\nprint(math.sqrt(16))  # prints 4.0\n",
    "1 + 2 = 3, 12 * 7 = 84, 100 / 4 = 25, 2 ** 10 = 1024.",
    "Solve for x: 3x + 5 = 20. Subtract five, then divide by three: x = 5.",
    "The integral of 2x from 0 to 3 equals 9.",
    "You are a helpful assistant. Answer briefly and honestly.",
    "I cannot help with that request, but here is something related you may find useful.",
    "Thank you! Could you give me another example, please?",
    "Sure. Here is another example with a little more detail than before.",
    "Café, naïve, über, jalapeño: accents are bytes too.",
    "Training runs on many GPUs with tensor, pipeline and data parallelism.",
    "Checkpoints are saved in shards and can be loaded with a different layout.",
    "The loss compares the pivot's margin with the fused margin of the sources.",
    "Lists:\n- apples\n- oranges\n- pears\n\nTables have rows and columns.",
    "She said, \"It's fine.\" He asked, 'Is it?' They laughed (quietly).",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    "January February March April May June July August September October November December",
    "zero one two three four five six seven eight nine ten eleven twelve",
    "https://example.org/path?query=value&other=42",
)


@dataclass(frozen=True)
class _Family:
    """What distinguishes one tokenizer family from another."""

    special_tokens: tuple[str, ...]
    bos_token: str
    eos_token: str
    pad_token: str
    chat_template: str | None
    default_vocab_size: int
    id_shuffle_seed: int
    # Add BOS when `add_special_tokens=True`, as Llama tokenizers do (double-BOS trap).
    adds_bos: bool = False


_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_PHI_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

# Like Llama 3, content is trimmed and BOS comes from the template itself.
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# The generation prompt opens a reasoning block, but assistant turns are rendered without it:
# the rendered prompt is not a prefix of the rendered conversation.
_UNSTABLE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)

_CHATML = _Family(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=_CHATML_TEMPLATE,
    default_vocab_size=487,
    id_shuffle_seed=11,
)
_PHI = _Family(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_85|>"),
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|dummy_85|>",
    chat_template=_PHI_TEMPLATE,
    default_vocab_size=431,
    id_shuffle_seed=23,
)
_LLAMA3 = _Family(
    special_tokens=(
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ),
    bos_token="<|begin_of_text|>",
    eos_token="<|eot_id|>",
    pad_token="<|finetune_right_pad_id|>",
    chat_template=_LLAMA3_TEMPLATE,
    default_vocab_size=521,
    id_shuffle_seed=37,
    adds_bos=True,
)
_PLAIN = _Family(
    special_tokens=("<s>", "</s>", "<pad>"),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="<pad>",
    chat_template=None,
    default_vocab_size=347,
    id_shuffle_seed=41,
    adds_bos=True,
)
_UNSTABLE = _Family(
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token="<|endoftext|>",
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
    chat_template=_UNSTABLE_TEMPLATE,
    default_vocab_size=409,
    id_shuffle_seed=53,
)

_BYTE_ALPHABET_SIZE = 256

# Pre-tokenisation in the style of the Qwen 2 / Llama 3 / cl100k splitters: words keep one
# leading space or punctuation mark, digits stand alone, and a run of newlines is split from
# the indentation after it, so "assistant\n" + "    code" tokenises like the two halves.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def chatml_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Qwen-like ChatML tokenizer; generation prompt ``<|im_start|>assistant\\n``."""
    return _build(_CHATML, vocab_size)


def phi_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Phi-4-like tokenizer; generation prompt ``<|im_start|>assistant<|im_sep|>``."""
    return _build(_PHI, vocab_size)


def llama3_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Llama-3-like tokenizer; adds ``<|begin_of_text|>`` when asked for special tokens."""
    return _build(_LLAMA3, vocab_size)


def plain_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """Base-model tokenizer without a chat template; adds ``<s>`` when asked for special tokens."""
    return _build(_PLAIN, vocab_size)


def unstable_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """ChatML tokenizer whose template is deliberately not prefix-stable."""
    return _build(_UNSTABLE, vocab_size)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Save ``tokenizer`` (with its chat template) so ``AutoTokenizer`` can load it offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _build(family: _Family, vocab_size: int | None) -> PreTrainedTokenizerFast:
    size = family.default_vocab_size if vocab_size is None else vocab_size
    # The serialised backend is cached; every call gets its own, independent wrapper.
    backend = Tokenizer.from_str(_backend_json(family, size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=family.bos_token,
        eos_token=family.eos_token,
        pad_token=family.pad_token,
        chat_template=family.chat_template,
        # The older name; transformers 5 maps it to `extra_special_tokens`.
        additional_special_tokens=[
            token
            for token in family.special_tokens
            if token not in (family.bos_token, family.eos_token, family.pad_token)
        ],
    )


@functools.cache
def _backend_json(family: _Family, vocab_size: int) -> str:
    num_special = len(family.special_tokens)
    smallest = _BYTE_ALPHABET_SIZE + num_special
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size must be at least {smallest} (256 bytes + {num_special} special "
            f"tokens), got {vocab_size}"
        )
    num_ordinary = min(vocab_size - num_special, _max_trained_size())
    vocab, merges = _trained_bpe(num_ordinary)
    shuffled_vocab = _shuffle_ids(vocab, seed=family.id_shuffle_seed)

    tokenizer = Tokenizer(models.BPE(vocab=shuffled_vocab, merges=merges))
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    # Special tokens get the ids after the ordinary vocabulary, as in Qwen and Llama. Sizes
    # beyond what the corpus can merge are filled with reserved tokens, as Llama 3 does.
    num_reserved = vocab_size - num_ordinary - num_special
    reserved = [f"<|reserved_{index}|>" for index in range(num_reserved)]
    tokenizer.add_special_tokens(list(family.special_tokens) + reserved)
    if family.adds_bos:
        bos_id = tokenizer.token_to_id(family.bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{family.bos_token} $A",
            pair=f"{family.bos_token} $A {family.bos_token} $B",
            special_tokens=[(family.bos_token, bos_id)],
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer.get_vocab_size() == vocab_size
    return tokenizer.to_str()


def _bpe_trainer_input(vocab_size: int) -> tuple[Tokenizer, trainers.BpeTrainer]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = _pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    return tokenizer, trainer


@functools.cache
def _trained_bpe(num_ordinary_tokens: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with exactly ``num_ordinary_tokens`` tokens (bytes + merges)."""
    tokenizer, trainer = _bpe_trainer_input(num_ordinary_tokens)
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    assert len(vocab) == num_ordinary_tokens, (len(vocab), num_ordinary_tokens)
    # Merges serialise as pairs in recent `tokenizers`, as "a b" strings in older ones.
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, merges  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _max_trained_size() -> int:
    """How many ordinary tokens BPE reaches when it merges everything the corpus allows."""
    tokenizer, trainer = _bpe_trainer_input(1_000_000)
    tokenizer.train_from_iterator(TINY_CORPUS, trainer)
    return tokenizer.get_vocab_size()


def _shuffle_ids(vocab: dict[str, int], *, seed: int) -> dict[str, int]:
    """Give the same tokens different ids per family, as different models' vocabularies do."""
    tokens = sorted(vocab, key=vocab.__getitem__)
    new_ids = list(range(len(tokens)))
    random.Random(seed).shuffle(new_ids)
    return dict(zip(tokens, new_ids, strict=True))
