"""Chat-template rendering and THE response-token boundary of a row for a tokenizer.

This module is the single definition, shared by scoring, training and evaluation, of
"the response tokens of a row for model m" (METHOD.md, "Sequence scores"):

    prompt_ids = ids(render(prompt,            add_generation_prompt=True))
    full_ids   = ids(render(prompt + response, add_generation_prompt=False))
    response   = full_ids[len(prompt_ids):]

so the response tokens include whatever the template emits after the content, in particular
the end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, EOS, ...). ``full_ids`` must start with
``prompt_ids`` (templates and tokenizers that break this raise :class:`TemplateError`; they
would otherwise silently move tokens between prompt and response).

Rendering → ids: the template is rendered to text, then the text is tokenised with
``add_special_tokens=False``. Chat templates write BOS (and every other control token) into the
text themselves, so letting the tokenizer add its own BOS as well would give two (Llama-3 and
Llama-2-style tokenizers add one by default). This is also exactly what
``apply_chat_template(tokenize=True)`` does, so scores match generation-time tokenisation.
Like that default, control-token text inside message content (say a literal ``<|im_end|>``)
is tokenised as the control token.

The template is the tokenizer's own chat template, or a configured one: the name of a built-in
template (:data:`BUILTIN_TEMPLATES`, e.g. ``"plain"`` for base models), the name of one of the
tokenizer's named templates, a Jinja string (HF chat-template semantics: it receives
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, ...), or a path to a
``.jinja`` file.

Scoring convention (see :class:`TokenizedSequence`): the response tokens are
``input_ids[response_start:]``; token ``t`` is scored from the logits at position ``t - 1``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_infifpo.data.rows import Message, PreferenceRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BUILTIN_TEMPLATES",
    "IGNORE_INDEX",
    "ExcludedRow",
    "ResponseTokenizer",
    "TemplateError",
    "TokenizedPair",
    "TokenizedSequence",
    "load_tokenizer",
    "resolve_chat_template",
]

IGNORE_INDEX = -100

# A base-model format. The generation prompt ends in a newline rather than "Assistant: ":
# byte-level BPE glues a space to the following word, which would make a trailing space in
# the prompt tokenise differently once the response follows (not prefix-stable).
PLAIN_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant:\\n' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"plain": PLAIN_TEMPLATE}

# Tokens shown around the first difference when a template is not prefix-stable.
_CONTEXT_BEFORE, _CONTEXT_AFTER = 4, 8

# Bump when the definition of the response tokens changes: old scores must not mix with new.
_BOUNDARY_VERSION = 1


class TemplateError(ValueError):
    """A chat template (or its configuration) that cannot give a well-defined response boundary."""


@dataclass(frozen=True)
class TokenizedSequence:
    """Prompt + one response, tokenised with one model's template.

    ``input_ids[response_start:]`` are the response tokens. Each is scored from the previous
    position: ``S(y) = sum_{t >= response_start} log p(input_ids[t] | input_ids[:t])``, i.e. the
    logits at position ``t - 1`` predict token ``t`` (so ``response_start >= 1``).
    """

    input_ids: list[int]
    response_start: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        """``T_m(y)``: the count each model divides its sum by when length-normalising."""
        return len(self.input_ids) - self.response_start

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start :]

    def response_mask(self) -> list[bool]:
        """Aligned with ``input_ids``: True at the response tokens (the positions scored)."""
        return [position >= self.response_start for position in range(len(self.input_ids))]

    def next_token_labels(self, ignore_index: int = IGNORE_INDEX) -> list[int]:
        """Aligned with the logits: ``labels[i]`` is the token position ``i`` predicts
        (``input_ids[i + 1]``) when that token is a response token, else ``ignore_index``.
        Summing ``log_softmax(logits[i])[labels[i]]`` over non-ignored ``i`` gives ``S(y)``.
        (Megatron-style, already shifted: do not hand these to a model that shifts again.)"""
        labels = [ignore_index] * len(self.input_ids)
        for position in range(self.response_start - 1, len(self.input_ids) - 1):
            labels[position] = self.input_ids[position + 1]
        return labels


@dataclass(frozen=True)
class TokenizedPair:
    """A preference row tokenised for one model: chosen and rejected share the prompt."""

    id: str
    chosen: TokenizedSequence
    rejected: TokenizedSequence

    @property
    def longest(self) -> int:
        return max(len(self.chosen), len(self.rejected))


@dataclass(frozen=True)
class ExcludedRow:
    """A row left out (never truncated: a truncated response would change its score)."""

    id: str
    reason: str
    chosen_length: int
    rejected_length: int
    max_length: int


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A Hugging Face tokenizer from a local directory (never downloads)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {path}")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def resolve_chat_template(
    tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None
) -> tuple[str, str]:
    """``(description, jinja_text)`` of the template to use; see the module docstring."""
    own = getattr(tokenizer, "chat_template", None)
    if chat_template is None:
        if isinstance(own, dict):
            if "default" in own:
                return "tokenizer:default", own["default"]
            raise TemplateError(
                "the tokenizer has several chat templates and none is called 'default'; set "
                f"the chat_template option to one of {sorted(own)}"
            )
        if own:
            return "tokenizer", own
        raise TemplateError(
            "the tokenizer has no chat template; set the chat_template option to a built-in "
            f"template name ({', '.join(sorted(BUILTIN_TEMPLATES))}), a Jinja template string, "
            "or a path to a .jinja file"
        )
    if chat_template in BUILTIN_TEMPLATES:
        return f"builtin:{chat_template}", BUILTIN_TEMPLATES[chat_template]
    if isinstance(own, dict) and chat_template in own:
        return f"tokenizer:{chat_template}", own[chat_template]
    if "{{" in chat_template or "{%" in chat_template:
        return "custom", chat_template
    if chat_template.endswith(".jinja") and Path(chat_template).is_file():
        return f"file:{chat_template}", Path(chat_template).read_text(encoding="utf-8")
    known = sorted(BUILTIN_TEMPLATES) + (sorted(own) if isinstance(own, dict) else [])
    raise TemplateError(
        f"chat_template {chat_template!r} is neither a known template name ({', '.join(known)}), "
        "a Jinja template string, nor an existing .jinja file"
    )


class ResponseTokenizer:
    """Tokenises preference rows for one model: its tokenizer, its template, its length limit.

    Scoring, training and evaluation all go through this class, so they agree on which tokens
    are the response.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        max_length: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.template_name, self.template = resolve_chat_template(tokenizer, chat_template)
        self.max_length = max_length
        if self.template_name == "builtin:plain" and tokenizer.eos_token is None:
            raise TemplateError(
                "the 'plain' template needs an eos_token as end-of-turn marker; "
                "the tokenizer has none"
            )

    # ------------------------------------------------------------------ rendering

    def render_text(self, messages: list[Message], *, add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
        # transformers returns str for tokenize=False; guard against API drift explicitly.
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
            )
        return text

    def render_ids(self, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        # The template already wrote BOS/control tokens into the text: add none here.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ encoding

    def encode_pair(self, row: PreferenceRow) -> TokenizedPair:
        """Both sides of ``row``; raises :class:`TemplateError` if the boundary is ill-defined.
        Does not apply ``max_length`` (see :meth:`encode_rows`)."""
        import jinja2

        try:
            prompt_ids = self.render_ids(row.prompt, add_generation_prompt=True)
            if not prompt_ids:
                raise TemplateError(
                    f"row {row.id!r}: the template renders the prompt as no tokens at all"
                )
            return TokenizedPair(
                id=row.id,
                chosen=self._encode_response(row, "chosen", prompt_ids, row.chosen),
                rejected=self._encode_response(row, "rejected", prompt_ids, row.rejected),
            )
        except jinja2.TemplateError as error:
            # e.g. templates that reject a system message or non-alternating roles.
            raise TemplateError(
                f"row {row.id!r}: template {self.template_name!r} refused the conversation: {error}"
            ) from error

    def encode_rows(
        self, rows: Iterable[PreferenceRow]
    ) -> tuple[list[TokenizedPair], list[ExcludedRow]]:
        """Encode every row; rows whose chosen or rejected sequence is longer than
        ``max_length`` are excluded (reported, never truncated)."""
        pairs: list[TokenizedPair] = []
        excluded: list[ExcludedRow] = []
        for row in rows:
            pair = self.encode_pair(row)
            exclusion = self.exclusion(pair)
            if exclusion is None:
                pairs.append(pair)
            else:
                excluded.append(exclusion)
        return pairs, excluded

    def exclusion(self, pair: TokenizedPair) -> ExcludedRow | None:
        """Why ``pair`` must be left out under ``max_length``, or None if it fits."""
        if self.max_length is None or pair.longest <= self.max_length:
            return None
        return ExcludedRow(
            id=pair.id,
            reason=f"longer than max_length={self.max_length} tokens",
            chosen_length=len(pair.chosen),
            rejected_length=len(pair.rejected),
            max_length=self.max_length,
        )

    def _encode_response(
        self, row: PreferenceRow, side: str, prompt_ids: list[int], response: list[Message]
    ) -> TokenizedSequence:
        full_ids = self.render_ids(row.prompt + response, add_generation_prompt=False)
        boundary = len(prompt_ids)
        if full_ids[:boundary] != prompt_ids:
            raise TemplateError(self._prefix_problem(row, side, prompt_ids, full_ids, response))
        if len(full_ids) == boundary:
            raise TemplateError(
                f"row {row.id!r}, {side}: the template renders the response as no tokens"
            )
        return TokenizedSequence(input_ids=full_ids, response_start=boundary)

    def _prefix_problem(
        self,
        row: PreferenceRow,
        side: str,
        prompt_ids: list[int],
        full_ids: list[int],
        response: list[Message],
    ) -> str:
        position = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
            min(len(prompt_ids), len(full_ids)),
        )
        start, end = max(0, position - _CONTEXT_BEFORE), position + _CONTEXT_AFTER
        prompt_text = self.render_text(row.prompt, add_generation_prompt=True)
        full_text = self.render_text(row.prompt + response, add_generation_prompt=False)
        if full_text.startswith(prompt_text):
            cause = (
                "the rendered text is a prefix, but tokenisation merges characters across the "
                "prompt/response boundary"
            )
        else:
            cause = (
                "the template renders the generation prompt differently from the assistant "
                "turn in the full conversation"
            )
        return (
            f"row {row.id!r}, {side}: template {self.template_name!r} is not prefix-stable: the "
            f"prompt tokens (add_generation_prompt=True) are not a prefix of the conversation "
            f"tokens; first difference at token {position}: prompt has "
            f"{self._decode(prompt_ids[start:end])!r}, conversation has "
            f"{self._decode(full_ids[start:end])!r} ({cause})"
        )

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """sha256 (hex) of everything that decides the token ids and the boundary: vocabulary,
        merges, normalisation, special tokens, template text. Scores computed under different
        fingerprints must not be mixed."""
        identity = {
            "boundary_version": _BOUNDARY_VERSION,
            "tokenizer": _tokenizer_identity(self.tokenizer),
            "special_tokens": {
                name: str(value)
                for name, value in sorted(self.tokenizer.special_tokens_map.items())
            },
            "all_special_tokens": sorted(str(token) for token in self.tokenizer.all_special_tokens),
            "template": self.template,
        }
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        # Runtime padding/truncation settings change when the tokenizer is used, not its ids.
        state.pop("padding", None)
        state.pop("truncation", None)
        return state
    # Slow (Python) tokenizers: the vocabulary is what can be compared.
    return sorted(tokenizer.get_vocab().items())
