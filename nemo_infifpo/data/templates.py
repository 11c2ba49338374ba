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

Template arguments (``tokenizer.chat_template_kwargs``): a mapping passed to every render, e.g.
``{enable_thinking: false}``; part of the fingerprint.

The clock: a template may call ``strftime_now`` (today's date in a default system prompt).
Renders here never see the real clock: ``strftime_now`` is pinned to ``template_date``
(``tokenizer.template_date``, default :data:`DEFAULT_TEMPLATE_DATE`, midnight), so the same
rows give the same ids on every day, on every rank and in every stage. Whether the template
depends on the date at all is detected (a probe conversation rendered under two dates) and
recorded in :meth:`ResponseTokenizer.describe`. The fingerprint covers what is rendered: the
template text and arguments, the pinned date and the renders of the probe conversations.

Boundary modes (``tokenizer.boundary``), chosen per model:

``conversation`` (default)
    the definition above; requires prefix stability. When it fails, the error names the
    cause: a system message the full render dropped, a generation prompt that opens a
    reasoning block (``<think>``) the rendered assistant turn lacks, reasoning stripped from
    an earlier turn, whitespace that tokenises together with the generation prompt.
``generation``
    the response exactly as the model would have generated it after its generation prompt:
    ``ids(render(prompt, add_generation_prompt=True)) + ids(response text + end-of-turn
    marker)``. For reasoning templates (a generation prompt that opens ``<think>`` or
    inserts an empty think block; assistant turns rendered with reasoning stripped). The
    response must be one assistant message; where its text begins with what the generation
    prompt already opened (``<think>\n``), that overlap is not repeated. The end-of-turn marker
    is what the template writes after an assistant message's content, up to and including
    its first special token (``<|im_end|>``, ``<|eot_id|>``, EOS, ...).

Text changes: when a template changes the response text it renders (trims whitespace,
strips reasoning), the tokens scored are those of the changed text. Each sequence records
the change (:attr:`TokenizedSequence.text_change`) so that scoring can report it per model.
"""

from __future__ import annotations

import contextlib
import datetime as _datetime
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nemo_infifpo.data.errors import ConfigError, InputError
from nemo_infifpo.data.policy import ExclusionLog
from nemo_infifpo.data.rows import Message, PreferenceRow

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "BOUNDARY_MODES",
    "BUILTIN_TEMPLATES",
    "DEFAULT_TEMPLATE_DATE",
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
# 2: template arguments, the pinned clock, boundary modes and probe renders in the fingerprint.
_BOUNDARY_VERSION = 2

BOUNDARY_MODES: tuple[str, ...] = ("conversation", "generation")
# Any fixed date would do; this one is documented so users can reproduce it elsewhere.
DEFAULT_TEMPLATE_DATE = "2025-01-01"
# Two dates far apart (different year, month, day, weekday) to tell if a template reads the clock.
_PROBE_DATES = ("2001-02-03", "2034-11-26")
# Names a render passes itself; template arguments may not replace them.
_RESERVED_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "chat_template", "tokenize", "tools", "documents",
     "continue_final_message", "return_dict", "strftime_now"}
)
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
# Probe conversations for the template's behaviour (clock, trimming, reasoning, end of turn).
_PROBE_USER = "Hello there, what time is it?"
_PROBE_SYSTEM = "Answer briefly."
_PROBE_ANSWER = "Probe answer 7Q."
_PROBE_PADDED = "  Padded probe answer.\n"
_PROBE_REASONING = "<think>\nProbe reasoning 3Z.\n</think>\n\nProbe final 5K."
_SENTINEL = "Sentinel answer 9X."


class TemplateError(InputError):
    """A chat template (or its configuration) that cannot give a well-defined response boundary.

    ``reason`` is a short code for exclusion reports (``not_prefix_stable``,
    ``template_refused``, ``empty_response``, ...); ``row_id`` the row, when one is at fault."""

    def __init__(self, message: str, *, reason: str = "template_error", row_id: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.row_id = row_id


@dataclass(frozen=True)
class TokenizedSequence:
    """Prompt + one response, tokenised with one model's template.

    ``input_ids[response_start:]`` are the response tokens. Each is scored from the previous
    position: ``S(y) = sum_{t >= response_start} log p(input_ids[t] | input_ids[:t])``, i.e. the
    logits at position ``t - 1`` predict token ``t`` (so ``response_start >= 1``).
    """

    input_ids: list[int]
    response_start: int
    # How the template changed the response text before tokenising it ("trimmed",
    # "reasoning_stripped", "inserted_before_content", "rewritten",
    # "continues_generation_prompt"), or None.
    text_change: str | None = None

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
    """Tokenises preference rows for one model: its tokenizer, its template (with its arguments,
    boundary mode and pinned date), its length limit.

    Scoring, training and evaluation all go through this class, so they agree on which tokens
    are the response.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        chat_template: str | None = None,
        max_length: int | None = None,
        *,
        template_kwargs: Mapping[str, Any] | None = None,
        boundary: str = "conversation",
        template_date: str | None = None,
    ) -> None:
        if max_length is not None and max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.tokenizer = tokenizer
        self.template_name, self.template = resolve_chat_template(tokenizer, chat_template)
        self.max_length = max_length
        self.template_kwargs = _check_template_kwargs(template_kwargs)
        if boundary not in BOUNDARY_MODES:
            raise ConfigError(
                f"tokenizer.boundary must be one of {', '.join(BOUNDARY_MODES)}, got {boundary!r}"
            )
        self.boundary = boundary
        self.template_date = template_date or DEFAULT_TEMPLATE_DATE
        self._clock = _parse_date(self.template_date)
        if self.template_name == "builtin:plain" and tokenizer.eos_token is None:
            raise TemplateError(
                "the 'plain' template needs an eos_token as end-of-turn marker; "
                "the tokenizer has none"
            )
        _check_clock_can_be_pinned(tokenizer)
        self._probes = self._probe_renders()
        self.end_of_turn = self._end_of_turn() if boundary == "generation" else None

    # ------------------------------------------------------------------ rendering

    def render_text(
        self,
        messages: list[Message],
        *,
        add_generation_prompt: bool,
        clock: _datetime.datetime | None = None,
    ) -> str:
        with _pinned_clock(clock or self._clock):
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **self.template_kwargs,
            )
        # transformers returns str for tokenize=False; guard against API drift explicitly.
        if not isinstance(text, str):
            raise TypeError(
                f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str"
            )
        return text

    def render_ids(self, messages: list[Message], *, add_generation_prompt: bool) -> list[int]:
        text = self.render_text(messages, add_generation_prompt=add_generation_prompt)
        return self.text_ids(text)

    def text_ids(self, text: str) -> list[int]:
        # The template already wrote BOS/control tokens into the text: add none here.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ encoding

    def encode_pair(self, row: PreferenceRow) -> TokenizedPair:
        """Both sides of ``row``; raises :class:`TemplateError` if the boundary is ill-defined.
        Does not apply ``max_length`` (see :meth:`encode_rows`)."""
        import jinja2

        try:
            prompt_text = self.render_text(row.prompt, add_generation_prompt=True)
            prompt_ids = self.text_ids(prompt_text)
            if not prompt_ids:
                raise TemplateError(
                    f"row {row.id!r}: the template renders the prompt as no tokens at all",
                    reason="empty_prompt",
                    row_id=row.id,
                )
            encode = self._encode_generated if self.boundary == "generation" else self._encode_response
            return TokenizedPair(
                id=row.id,
                chosen=encode(row, "chosen", prompt_text, prompt_ids, row.chosen),
                rejected=encode(row, "rejected", prompt_text, prompt_ids, row.rejected),
            )
        except jinja2.TemplateError as error:
            # e.g. templates that reject a system message or non-alternating roles.
            raise TemplateError(
                f"row {row.id!r}: template {self.template_name!r} refused the conversation: {error}",
                reason="template_refused",
                row_id=row.id,
            ) from error

    def encode_rows(
        self, rows: Iterable[PreferenceRow], *, invalid: ExclusionLog | None = None
    ) -> tuple[list[TokenizedPair], list[ExcludedRow]]:
        """Encode every row; rows whose chosen or rejected sequence is longer than
        ``max_length`` are excluded (reported, never truncated). A row the template cannot
        encode raises :class:`TemplateError`, or, given ``invalid``, goes to that log under
        its policy."""
        pairs: list[TokenizedPair] = []
        excluded: list[ExcludedRow] = []
        for row in rows:
            pair = self.encode_pair(row) if invalid is None else self.try_encode(row, invalid)
            if pair is None:
                continue
            exclusion = self.exclusion(pair)
            if exclusion is None:
                pairs.append(pair)
            else:
                excluded.append(exclusion)
        return pairs, excluded

    def try_encode(self, row: PreferenceRow, invalid: ExclusionLog) -> TokenizedPair | None:
        """:meth:`encode_pair`, or None after recording the row in ``invalid`` when the template
        cannot encode it (raises instead under ``on_invalid_row=fail``). For stages that encode
        row by row, e.g. a rank measuring its slice of the training data."""
        try:
            return self.encode_pair(row)
        except TemplateError as error:
            invalid.reject(error, row_id=row.id)
            return None

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
        self,
        row: PreferenceRow,
        side: str,
        prompt_text: str,
        prompt_ids: list[int],
        response: list[Message],
    ) -> TokenizedSequence:
        full_text = self.render_text(row.prompt + response, add_generation_prompt=False)
        full_ids = self.text_ids(full_text)
        boundary = len(prompt_ids)
        if full_ids[:boundary] != prompt_ids:
            raise TemplateError(
                self._prefix_problem(row, side, prompt_text, prompt_ids, full_text, full_ids, response),
                reason="not_prefix_stable",
                row_id=row.id,
            )
        if len(full_ids) == boundary:
            raise TemplateError(
                f"row {row.id!r}, {side}: the template renders the response as no tokens",
                reason="empty_response",
                row_id=row.id,
            )
        change = _text_change(full_text[len(prompt_text):], response) if full_text.startswith(prompt_text) else None
        return TokenizedSequence(input_ids=full_ids, response_start=boundary, text_change=change)

    def _encode_generated(
        self,
        row: PreferenceRow,
        side: str,
        prompt_text: str,
        prompt_ids: list[int],
        response: list[Message],
    ) -> TokenizedSequence:
        if len(response) != 1:
            raise TemplateError(
                f"row {row.id!r}, {side}: tokenizer.boundary=generation scores one generated "
                f"assistant message, the response has {len(response)}",
                reason="multi_message_response",
                row_id=row.id,
            )
        content = response[0]["content"]
        overlap = _opened_by_prompt(prompt_text, content)
        assert self.end_of_turn is not None
        response_ids = self.text_ids(content[overlap:] + self.end_of_turn)
        return TokenizedSequence(
            input_ids=prompt_ids + response_ids,
            response_start=len(prompt_ids),
            text_change="continues_generation_prompt" if overlap else None,
        )

    def _prefix_problem(
        self,
        row: PreferenceRow,
        side: str,
        prompt_text: str,
        prompt_ids: list[int],
        full_text: str,
        full_ids: list[int],
        response: list[Message],
    ) -> str:
        position = next(
            (i for i, (a, b) in enumerate(zip(prompt_ids, full_ids, strict=False)) if a != b),
            min(len(prompt_ids), len(full_ids)),
        )
        start, end = max(0, position - _CONTEXT_BEFORE), position + _CONTEXT_AFTER
        cause = self._prefix_cause(row, prompt_text, full_text, response)
        return (
            f"row {row.id!r}, {side}: template {self.template_name!r} is not prefix-stable: the "
            f"prompt tokens (add_generation_prompt=True) are not a prefix of the conversation "
            f"tokens; first difference at token {position}: prompt has "
            f"{self._decode(prompt_ids[start:end])!r}, conversation has "
            f"{self._decode(full_ids[start:end])!r}. Cause: {cause}"
        )

    def _prefix_cause(
        self, row: PreferenceRow, prompt_text: str, full_text: str, response: list[Message]
    ) -> str:
        """Which part of the conversation the template dropped, moved or rewrote, and what to set."""
        fixes = (
            "set tokenizer.chat_template to a template without this behaviour, a "
            "tokenizer.chat_template_kwargs value that switches it off, or tokenizer.boundary="
            "generation (scores the response as generated after the generation prompt)"
        )
        for message in row.prompt:
            if message["role"] != "system":
                continue
            in_prompt, in_full = message["content"] in prompt_text, message["content"] in full_text
            if in_prompt != in_full:
                where = "the full conversation" if in_prompt else "the prompt"
                return (
                    f"the template dropped the system message from {where} (it emits the system "
                    "prompt only in some positions, e.g. only when the last message is a user "
                    f"message); {fixes}"
                )
        for message in row.prompt:
            if message["role"] == "assistant" and _THINK_CLOSE in message["content"]:
                reasoning = message["content"].split(_THINK_CLOSE)[0].replace(_THINK_OPEN, "").strip()
                if reasoning and (reasoning in prompt_text) != (reasoning in full_text):
                    return (
                        "the template strips the reasoning of an earlier assistant turn in one "
                        "render but not in the other; remove the reasoning from earlier turns "
                        f"of the data, or {fixes}"
                    )
        plain = self.render_text(row.prompt, add_generation_prompt=False)
        if prompt_text.startswith(plain) and full_text.startswith(plain):
            opened = prompt_text[len(plain):]
            turn = full_text[len(plain):]
            common = 0
            while common < min(len(opened), len(turn)) and opened[common] == turn[common]:
                common += 1
            extra = opened[common:]
            if extra:
                if _THINK_OPEN in extra:
                    return (
                        f"the generation prompt opens a reasoning block ({extra!r}) that the "
                        "rendered assistant turn does not contain; set tokenizer.boundary="
                        "generation for this model, or a tokenizer.chat_template_kwargs value "
                        "that changes the generation prompt (e.g. {enable_thinking: false})"
                    )
                return (
                    f"the generation prompt ends with {extra!r}, which the rendered assistant "
                    f"turn does not contain (the template renders the generation prompt "
                    f"differently from the assistant turn); {fixes}"
                )
        if full_text.startswith(prompt_text):
            content = response[0]["content"]
            lead = content[: len(content) - len(content.lstrip())]
            if lead:
                return (
                    f"the response starts with whitespace ({lead!r}) that tokenises together "
                    "with the end of the generation prompt (the rendered text is a prefix, but "
                    "tokenisation merges characters across the prompt/response boundary); strip "
                    "leading whitespace from the responses, set tokenizer.boundary=generation "
                    "(the response tokenised on its own, as generated), or leave such rows out "
                    "(data.on_invalid_row=exclude)"
                )
            return (
                "the rendered text is a prefix, but tokenisation merges characters across the "
                "prompt/response boundary (the generation prompt ends in a partial token, e.g. a "
                f"trailing space); {fixes}"
            )
        return f"the template renders the generation prompt differently from the assistant turn; {fixes}"

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ the template's behaviour

    def _probe_conversations(self) -> list[tuple[str, list[Message], bool]]:
        user = {"role": "user", "content": _PROBE_USER}
        system = {"role": "system", "content": _PROBE_SYSTEM}
        answer = {"role": "assistant", "content": _PROBE_ANSWER}
        return [
            ("prompt", [user], True),
            ("conversation", [user, answer], False),
            ("system_prompt", [system, user], True),
            ("system_conversation", [system, user, answer], False),
        ]

    def _render_or_none(self, messages: list[Message], generation: bool, clock: Any = None) -> str | None:
        import jinja2

        try:
            return self.render_text(messages, add_generation_prompt=generation, clock=clock)
        except jinja2.TemplateError:
            return None  # templates may refuse a probe (say, a system message): not our concern

    def _probe_renders(self) -> dict[str, str | None]:
        """Probe renders under the pinned date, and the template's behaviour from them."""
        renders = {name: self._render_or_none(m, g) for name, m, g in self._probe_conversations()}
        if all(text is None for text in renders.values()):
            raise TemplateError(
                f"template {self.template_name!r} refuses even a one-turn conversation; check "
                "tokenizer.chat_template and tokenizer.chat_template_kwargs"
            )
        return renders

    def _renders_by_date(self) -> list[list[str | None]]:
        return [
            [self._render_or_none(m, g, clock=_parse_date(day)) for _, m, g in self._probe_conversations()]
            for day in _PROBE_DATES
        ]

    def describe(self) -> dict[str, Any]:
        """What scoring records about this model's rendering (manifest ``info.template``)."""
        user = {"role": "user", "content": _PROBE_USER}
        padded = self._render_or_none([user, {"role": "assistant", "content": _PROBE_PADDED}], False)
        reasoning = self._render_or_none([user, {"role": "assistant", "content": _PROBE_REASONING}], False)
        by_date = self._renders_by_date()
        return {
            "name": self.template_name,
            "boundary": self.boundary,
            "kwargs": dict(self.template_kwargs),
            "template_date": self.template_date,
            # The template reads the clock: its renders would change from day to day without
            # the pinned date.
            "clock_dependent": by_date[0] != by_date[1],
            "trims_content": padded is not None and _PROBE_PADDED not in padded and _PROBE_PADDED.strip() in padded,
            "strips_reasoning": reasoning is not None and "Probe reasoning 3Z." not in reasoning,
            "end_of_turn": self.end_of_turn,
        }

    def _end_of_turn(self) -> str:
        """What the template writes after an assistant message's content, up to and including
        its first special token: the marker a model generates to end its turn."""
        user = {"role": "user", "content": _PROBE_USER}
        text = self._render_or_none([user, {"role": "assistant", "content": _SENTINEL}], False)
        if text is None or _SENTINEL not in text:
            raise TemplateError(
                f"template {self.template_name!r}: cannot find the end-of-turn marker (a probe "
                "assistant message does not appear in its render); use tokenizer.boundary=conversation"
            )
        tail = text[text.index(_SENTINEL) + len(_SENTINEL):]
        specials = sorted({str(t) for t in self.tokenizer.all_special_tokens}, key=len, reverse=True)
        first = min(
            ((tail.find(token), token) for token in specials if token and token in tail),
            default=None,
        )
        if first is None:
            raise TemplateError(
                f"template {self.template_name!r}: nothing after an assistant message's content "
                f"is a special token ({tail!r}), so the end of a generated turn is unknown; use "
                "tokenizer.boundary=conversation"
            )
        index, token = first
        return tail[: index + len(token)]

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """sha256 (hex) of everything that decides the token ids and the boundary: vocabulary,
        merges, normalisation, special tokens, template text and arguments, boundary mode, the
        pinned date and what the template renders from probe conversations under it. Scores
        computed under different fingerprints must not be mixed."""
        identity = {
            "boundary_version": _BOUNDARY_VERSION,
            "tokenizer": _tokenizer_identity(self.tokenizer),
            "special_tokens": {
                name: str(value)
                for name, value in sorted(self.tokenizer.special_tokens_map.items())
            },
            "all_special_tokens": sorted(str(token) for token in self.tokenizer.all_special_tokens),
            "template": self.template,
            "template_kwargs": self.template_kwargs,
            "template_date": self.template_date,
            "boundary": self.boundary,
            "end_of_turn": self.end_of_turn,
            "probe_renders": self._probes,
        }
        canonical = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _check_template_kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise ConfigError(
            f"tokenizer.chat_template_kwargs must be a mapping (e.g. {{enable_thinking: false}}), "
            f"got {type(kwargs).__name__}"
        )
    checked = {}
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise ConfigError(f"tokenizer.chat_template_kwargs: keys must be strings, got {key!r}")
        if key in _RESERVED_KWARGS:
            raise ConfigError(
                f"tokenizer.chat_template_kwargs.{key}: reserved (set by the renderer itself"
                + ("; pin the date with tokenizer.template_date" if key == "strftime_now" else "")
                + ")"
            )
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(
                f"tokenizer.chat_template_kwargs.{key}: expected a JSON-like value "
                f"(string, number, boolean, list, mapping), got {type(value).__name__}"
            ) from None
        checked[key] = value
    return checked


def _parse_date(value: str) -> _datetime.datetime:
    try:
        return _datetime.datetime.strptime(str(value), "%Y-%m-%d")
    except ValueError:
        raise ConfigError(
            f"tokenizer.template_date must be a date as YYYY-MM-DD (e.g. {DEFAULT_TEMPLATE_DATE}), got {value!r}"
        ) from None


class _FixedClock:
    """Stands in for ``datetime.datetime`` where transformers' ``strftime_now`` reads it."""

    def __init__(self, moment: _datetime.datetime) -> None:
        self._moment = moment

    def now(self, tz: Any = None) -> _datetime.datetime:
        return self._moment if tz is None else self._moment.replace(tzinfo=tz)

    def __getattr__(self, name: str) -> Any:
        return getattr(_datetime.datetime, name)


@contextlib.contextmanager
def _pinned_clock(moment: _datetime.datetime) -> Iterator[None]:
    """Renders inside see ``moment`` as now. transformers gives templates ``strftime_now``,
    which reads ``datetime.now()`` of its module, and refuses callables as template arguments,
    so the module's clock is swapped for the render (renders are not run concurrently)."""
    from transformers.utils import chat_template_utils

    saved = chat_template_utils.datetime
    chat_template_utils.datetime = _FixedClock(moment)  # type: ignore[assignment]
    try:
        yield
    finally:
        chat_template_utils.datetime = saved


_CLOCK_PROBE = "{{ strftime_now('%Y-%m-%d %H:%M') }}"
_clock_checked = False


def _check_clock_can_be_pinned(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse to run if pinning has no effect (a transformers version that reads the clock
    elsewhere): renders would depend on the day again, silently."""
    global _clock_checked
    if _clock_checked:
        return
    moment = _parse_date(_PROBE_DATES[0])
    with _pinned_clock(moment):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}], chat_template=_CLOCK_PROBE, tokenize=False
        )
    if text != moment.strftime("%Y-%m-%d %H:%M"):
        raise TemplateError(
            "cannot pin the date chat templates see (strftime_now) with this transformers "
            "version; renders would change from day to day"
        )
    _clock_checked = True


def _opened_by_prompt(prompt_text: str, content: str, limit: int = 64) -> int:
    """Length of the longest start of ``content`` that the generation prompt already ends with
    (``<think>\n`` opened by the prompt and repeated by the data), ignoring pure whitespace."""
    for size in range(min(len(content), limit), 0, -1):
        piece = content[:size]
        if piece.strip() and prompt_text.endswith(piece):
            return size
    return 0


def _text_change(rendered_response: str, response: list[Message]) -> str | None:
    """How the template changed the response text it rendered, or None when every message's
    content appears verbatim."""
    for position, message in enumerate(response):
        content = message["content"]
        if content in rendered_response:
            if position == 0 and rendered_response.index(content) > 0:
                # Text between the generation prompt and the content (an empty think block,
                # say) that the template adds: it is scored as part of the response.
                return "inserted_before_content"
            continue
        if _THINK_CLOSE in content and content.split(_THINK_CLOSE)[-1].strip() in rendered_response:
            return "reasoning_stripped"
        if content.strip() in rendered_response:
            return "trimmed"
        return "rewritten"
    return None


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
