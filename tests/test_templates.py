"""The response-token boundary: exact response strings per template family, prefix stability,
length exclusion, BOS handling and fingerprints; plus the tiny test tokenizers themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_infifpo.data.rows import PreferenceRow, normalize_record
from nemo_infifpo.data.templates import (
    IGNORE_INDEX,
    ResponseTokenizer,
    TemplateError,
    TokenizedSequence,
    load_tokenizer,
)
from nemo_infifpo.testing import (
    chatml_tokenizer,
    llama3_tokenizer,
    phi_tokenizer,
    plain_tokenizer,
    save_tokenizer,
    unstable_tokenizer,
)

SINGLE = normalize_record(
    {"id": "single", "prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "Five."}
)
MULTI = normalize_record(
    {
        "id": "multi",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "Apple."},
            {"role": "user", "content": "Another one?"},
        ],
        "chosen": "  Pear. ",
        "rejected": "No.",
    }
)

# HF renders with trim_blocks: a newline right after a {% ... %} tag is dropped, hence the
# explicit {{ '\n' }}.
_PLAIN_CUSTOM = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]\n{% endif %}"
)

# For each family: the expected prompt render (with generation prompt) of MULTI, and the
# expected decoded response tokens of SINGLE and MULTI, exactly as the template writes them.
CASES = {
    "chatml": (
        chatml_tokenizer,
        None,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
        "<|im_start|>assistant\nApple.<|im_end|>\n<|im_start|>user\nAnother one?<|im_end|>\n"
        "<|im_start|>assistant\n",
        ("It is 4.<|im_end|>\n", "Five.<|im_end|>\n"),
        ("  Pear. <|im_end|>\n", "No.<|im_end|>\n"),
    ),
    "phi": (
        phi_tokenizer,
        None,
        "<|im_start|>system<|im_sep|>Be brief.<|im_end|>"
        "<|im_start|>user<|im_sep|>Name a fruit.<|im_end|>"
        "<|im_start|>assistant<|im_sep|>Apple.<|im_end|>"
        "<|im_start|>user<|im_sep|>Another one?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>",
        ("It is 4.<|im_end|>", "Five.<|im_end|>"),
        ("  Pear. <|im_end|>", "No.<|im_end|>"),
    ),
    "llama3": (
        llama3_tokenizer,
        None,
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a fruit.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nApple.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother one?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("It is 4.<|eot_id|>", "Five.<|eot_id|>"),
        # Llama 3's template trims message content.
        ("Pear.<|eot_id|>", "No.<|eot_id|>"),
    ),
    "plain": (
        plain_tokenizer,
        "plain",
        "<s>System: Be brief.\nUser: Name a fruit.\nAssistant:\nApple.</s>"
        "User: Another one?\nAssistant:\n",
        ("It is 4.</s>", "Five.</s>"),
        ("  Pear. </s>", "No.</s>"),
    ),
    "plain_custom_jinja": (
        plain_tokenizer,
        _PLAIN_CUSTOM,
        "<s>[system]\nBe brief.\n[user]\nName a fruit.\n[assistant]\nApple.</s>\n"
        "[user]\nAnother one?\n[assistant]\n",
        ("It is 4.</s>\n", "Five.</s>\n"),
        ("  Pear. </s>\n", "No.</s>\n"),
    ),
}


def _decode(encoder: ResponseTokenizer, ids: list[int]) -> str:
    return encoder.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("family", sorted(CASES))
def test_response_tokens_are_the_content_plus_end_of_turn_marker(family: str) -> None:
    build, template, multi_prompt, single_responses, multi_responses = CASES[family]
    encoder = ResponseTokenizer(build(), chat_template=template)
    for row, (chosen_text, rejected_text) in ((SINGLE, single_responses), (MULTI, multi_responses)):
        pair = encoder.encode_pair(row)
        assert pair.id == row.id
        assert _decode(encoder, pair.chosen.response_ids) == chosen_text
        assert _decode(encoder, pair.rejected.response_ids) == rejected_text
        # Both sides share the same prompt tokens.
        assert (
            pair.chosen.input_ids[: pair.chosen.response_start]
            == pair.rejected.input_ids[: pair.rejected.response_start]
        )
    multi = encoder.encode_pair(MULTI)
    assert _decode(encoder, multi.chosen.input_ids[: multi.chosen.response_start]) == multi_prompt
    assert _decode(encoder, multi.chosen.input_ids) == multi_prompt + multi_responses[0]


@pytest.mark.parametrize("family", sorted(CASES))
def test_prompt_ids_are_a_prefix_of_full_ids(family: str) -> None:
    build, template, *_ = CASES[family]
    encoder = ResponseTokenizer(build(), chat_template=template)
    for row in (SINGLE, MULTI):
        prompt_ids = encoder.render_ids(row.prompt, add_generation_prompt=True)
        full_ids = encoder.render_ids(row.prompt + row.chosen, add_generation_prompt=False)
        pair = encoder.encode_pair(row)
        assert pair.chosen.input_ids == full_ids
        assert pair.chosen.response_start == len(prompt_ids)
        assert full_ids[: len(prompt_ids)] == prompt_ids


def test_response_of_several_assistant_messages_includes_every_turn_marker() -> None:
    row = normalize_record(
        {
            "id": "two-part",
            "chosen": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
                {"role": "assistant", "content": "How can I help?"},
            ],
            "rejected": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Bye."},
            ],
        }
    )
    encoder = ResponseTokenizer(chatml_tokenizer())
    pair = encoder.encode_pair(row)
    assert _decode(encoder, pair.chosen.response_ids) == (
        "Hello.<|im_end|>\n<|im_start|>assistant\nHow can I help?<|im_end|>\n"
    )


def test_template_that_is_not_prefix_stable_raises_with_the_row_id() -> None:
    encoder = ResponseTokenizer(unstable_tokenizer())
    with pytest.raises(
        TemplateError,
        match=r"row 'single', chosen: .*not prefix-stable.*first difference at token \d+",
    ) as caught:
        encoder.encode_pair(SINGLE)
    assert "<think>" in str(caught.value)
    assert "the generation prompt opens a reasoning block" in str(caught.value)
    assert "tokenizer.boundary=generation" in str(caught.value)


def test_tokenisation_across_the_boundary_is_detected() -> None:
    # "Assistant: " ends in a space that byte-level BPE glues to the response's first word.
    trailing_space = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
        "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    encoder = ResponseTokenizer(plain_tokenizer(), chat_template=trailing_space)
    row = normalize_record(
        {"id": "glued", "prompt": "Hi?", "chosen": "the answer", "rejected": "No."}
    )
    with pytest.raises(
        TemplateError, match=r"row 'glued', chosen: .*tokenisation merges characters"
    ):
        encoder.encode_pair(row)


def test_empty_response_tokens_raise() -> None:
    drops_assistant = (
        "{% for m in messages %}{% if m['role'] == 'user' %}U: {{ m['content'] }}\n{% endif %}"
        "{% endfor %}"
    )
    encoder = ResponseTokenizer(plain_tokenizer(), chat_template=drops_assistant)
    with pytest.raises(
        TemplateError, match=r"row 'single', chosen: the template renders the response as no tokens"
    ):
        encoder.encode_pair(SINGLE)


def test_template_refusing_a_conversation_names_the_row() -> None:
    no_system = (
        "{% if messages[0]['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}" + _PLAIN_CUSTOM
    )
    encoder = ResponseTokenizer(plain_tokenizer(), chat_template=no_system)
    encoder.encode_pair(SINGLE)
    with pytest.raises(TemplateError, match=r"row 'multi': .*System role not supported"):
        encoder.encode_pair(MULTI)


def test_tokenizer_without_template_needs_configuration() -> None:
    with pytest.raises(
        TemplateError, match=r"no chat template; set the chat_template option .*plain"
    ):
        ResponseTokenizer(plain_tokenizer())
    with pytest.raises(TemplateError, match=r"'no-such-template' is neither a known template name"):
        ResponseTokenizer(plain_tokenizer(), chat_template="no-such-template")


def test_template_from_a_jinja_file(tmp_path: Path) -> None:
    template = _PLAIN_CUSTOM
    path = tmp_path / "template.jinja"
    path.write_text(template)
    from_file = ResponseTokenizer(plain_tokenizer(), chat_template=str(path))
    inline = ResponseTokenizer(plain_tokenizer(), chat_template=template)
    assert from_file.encode_pair(MULTI) == inline.encode_pair(MULTI)
    assert from_file.fingerprint() == inline.fingerprint()


@pytest.mark.parametrize("build", [llama3_tokenizer, plain_tokenizer])
def test_no_double_bos(build) -> None:
    tokenizer = build()
    # These tokenizers add BOS themselves when asked for special tokens ...
    assert tokenizer("Hi")["input_ids"][0] == tokenizer.bos_token_id
    encoder = ResponseTokenizer(
        tokenizer, chat_template=None if tokenizer.chat_template else "plain"
    )
    pair = encoder.encode_pair(MULTI)
    # ... and the template writes BOS too: exactly one must remain.
    for sequence in (pair.chosen, pair.rejected):
        assert sequence.input_ids[0] == tokenizer.bos_token_id
        assert sequence.input_ids.count(tokenizer.bos_token_id) == 1


def test_rows_longer_than_max_length_are_excluded_not_truncated() -> None:
    long_answer = "This answer is much longer than the other ones. " * 4
    rows = [
        SINGLE,
        normalize_record(
            {"id": "long-chosen", "prompt": "Hi?", "chosen": long_answer, "rejected": "No."}
        ),
        MULTI,
        normalize_record(
            {"id": "long-rejected", "prompt": "Hi?", "chosen": "Yes.", "rejected": long_answer}
        ),
    ]
    unlimited = ResponseTokenizer(chatml_tokenizer())
    full_pairs = {pair.id: pair for pair in unlimited.encode_rows(rows)[0]}
    limit = max(full_pairs["single"].longest, full_pairs["multi"].longest)
    assert limit < min(full_pairs["long-chosen"].longest, full_pairs["long-rejected"].longest)

    limited = ResponseTokenizer(chatml_tokenizer(), max_length=limit)
    pairs, excluded = limited.encode_rows(rows)
    assert [pair.id for pair in pairs] == ["single", "multi"]
    assert pairs == [full_pairs["single"], full_pairs["multi"]]  # untouched, not truncated
    assert [row.id for row in excluded] == ["long-chosen", "long-rejected"]
    for row in excluded:
        assert row.chosen_length == len(full_pairs[row.id].chosen)
        assert row.rejected_length == len(full_pairs[row.id].rejected)
        assert row.max_length == limit
        assert "max_length" in row.reason


def test_sequence_scoring_convention() -> None:
    sequence = TokenizedSequence(input_ids=[5, 6, 7, 8, 9], response_start=3)
    assert sequence.num_response_tokens == 2
    assert sequence.response_ids == [8, 9]
    assert sequence.response_mask() == [False, False, False, True, True]
    # Position t-1 predicts token t: positions 2 and 3 carry the labels of tokens 3 and 4.
    assert sequence.next_token_labels() == [IGNORE_INDEX, IGNORE_INDEX, 8, 9, IGNORE_INDEX]
    assert sequence.next_token_labels(ignore_index=-1) == [-1, -1, 8, 9, -1]


def test_fingerprint_is_stable_and_tells_tokenizers_and_templates_apart(tmp_path: Path) -> None:
    chatml = ResponseTokenizer(chatml_tokenizer())
    assert (
        chatml.fingerprint()
        == chatml.fingerprint()
        == ResponseTokenizer(chatml_tokenizer()).fingerprint()
    )
    assert chatml.fingerprint() == ResponseTokenizer(chatml_tokenizer(), max_length=8).fingerprint()

    reloaded = ResponseTokenizer(
        load_tokenizer(save_tokenizer(chatml_tokenizer(), tmp_path / "chatml"))
    )
    assert reloaded.fingerprint() == chatml.fingerprint()
    assert reloaded.encode_pair(MULTI) == chatml.encode_pair(MULTI)

    fingerprints = {
        chatml.fingerprint(),
        ResponseTokenizer(chatml_tokenizer(vocab_size=401)).fingerprint(),
        ResponseTokenizer(phi_tokenizer()).fingerprint(),
        ResponseTokenizer(llama3_tokenizer()).fingerprint(),
        ResponseTokenizer(llama3_tokenizer(), chat_template="plain").fingerprint(),
        ResponseTokenizer(plain_tokenizer(), chat_template="plain").fingerprint(),
        ResponseTokenizer(plain_tokenizer(), chat_template=_PLAIN_CUSTOM).fingerprint(),
    }
    assert len(fingerprints) == 7


def test_load_tokenizer_requires_a_local_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "missing")


# --------------------------------------------------------------------------- tiny tokenizers

BUILDERS = [chatml_tokenizer, phi_tokenizer, llama3_tokenizer, plain_tokenizer, unstable_tokenizer]


def test_builders_give_different_vocabularies() -> None:
    text = "What is the capital of France? Paris."
    encodings = [
        tuple(build()(text, add_special_tokens=False)["input_ids"]) for build in BUILDERS[:4]
    ]
    assert len(set(encodings)) == 4
    assert len({len(build()) for build in BUILDERS}) == len(BUILDERS)
    assert len({build().eos_token_id for build in BUILDERS[:4]}) == 4


@pytest.mark.parametrize("build", BUILDERS)
def test_builders_are_deterministic_and_round_trip_text(build) -> None:
    first, second = build(), build()
    text = "Café: 12 * 7 = 84\n    return a + b  "
    ids = first(text, add_special_tokens=False)["input_ids"]
    assert ids == second(text, add_special_tokens=False)["input_ids"]
    assert first.decode(ids) == text
    assert first.bos_token and first.eos_token and first.pad_token
    for token in (first.bos_token, first.eos_token, first.pad_token):
        assert token in first.all_special_tokens
        assert len(first(token, add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize("vocab_size", [263, 401, 2001])
def test_vocab_size_is_exact(vocab_size: int) -> None:
    tokenizer = phi_tokenizer(vocab_size=vocab_size)
    assert len(tokenizer) == vocab_size
    assert max(tokenizer.get_vocab().values()) == vocab_size - 1
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        phi_tokenizer(vocab_size=100)


# --------------------------------------------------------------------------- property

_ENCODER = ResponseTokenizer(chatml_tokenizer())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chosen=st.text(
        st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30
    ).filter(str.strip),
    prompt=st.text(min_size=1, max_size=30).filter(str.strip),
)
def test_boundary_is_exact_or_refused(chosen: str, prompt: str) -> None:
    """Whatever the text, the boundary is either exact or a TemplateError, never silently off."""
    row = PreferenceRow(
        id="prop",
        prompt=[{"role": "user", "content": prompt}],
        chosen=[{"role": "assistant", "content": chosen}],
        rejected=[{"role": "assistant", "content": chosen + "!"}],
    )
    try:
        pair = _ENCODER.encode_pair(row)
    except TemplateError as error:
        assert "row 'prop'" in str(error)
        return
    assert _decode(_ENCODER, pair.chosen.response_ids) == chosen + "<|im_end|>\n"


# --------------------------------------------------------------------------- arguments, clock, causes, modes

from nemo_infifpo.data.errors import ConfigError  # noqa: E402
from nemo_infifpo.data.templates import DEFAULT_TEMPLATE_DATE  # noqa: E402
from nemo_infifpo.testing.chat_templates import (  # noqa: E402
    DATED,
    QWEN3_STYLE,
    R1_STYLE,
    SYSTEM_IF_LAST_USER,
    TRIMMING,
)

WITH_SYSTEM = normalize_record(
    {
        "id": "sys",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "chosen": "Hello.",
        "rejected": "Go.",
    }
)
REASONED = normalize_record(
    {"id": "why", "prompt": "Hi?", "chosen": "<think>\nThey greet.\n</think>\n\nHello.", "rejected": "Go."}
)


def _response(encoder: ResponseTokenizer, row: PreferenceRow) -> str:
    return _decode(encoder, encoder.encode_pair(row).chosen.response_ids)


def test_template_kwargs_reach_every_render_and_the_fingerprint() -> None:
    thinking = ResponseTokenizer(chatml_tokenizer(), QWEN3_STYLE)
    quiet = ResponseTokenizer(chatml_tokenizer(), QWEN3_STYLE, template_kwargs={"enable_thinking": False})
    assert quiet.render_text(SINGLE.prompt, add_generation_prompt=True).endswith("<think>\n\n</think>\n\n")
    assert _response(quiet, SINGLE) == "It is 4.<|im_end|>\n"
    assert thinking.fingerprint() != quiet.fingerprint()
    with pytest.raises(ConfigError, match=r"tokenizer.chat_template_kwargs must be a mapping"):
        ResponseTokenizer(chatml_tokenizer(), template_kwargs=["enable_thinking"])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"chat_template_kwargs.add_generation_prompt: reserved"):
        ResponseTokenizer(chatml_tokenizer(), template_kwargs={"add_generation_prompt": True})


def test_the_clock_is_pinned_detected_and_part_of_the_fingerprint() -> None:
    dated = ResponseTokenizer(chatml_tokenizer(), DATED)
    assert f"Today is {DEFAULT_TEMPLATE_DATE}." in dated.render_text(SINGLE.prompt, add_generation_prompt=True)
    assert dated.describe()["clock_dependent"] is True
    assert ResponseTokenizer(chatml_tokenizer()).describe()["clock_dependent"] is False
    other_day = ResponseTokenizer(chatml_tokenizer(), DATED, template_date="2024-12-31")
    assert "Today is 2024-12-31." in other_day.render_text(SINGLE.prompt, add_generation_prompt=True)
    assert other_day.fingerprint() != dated.fingerprint()
    # A date-independent template: the pinned date changes nothing rendered, but is recorded.
    assert ResponseTokenizer(chatml_tokenizer(), template_date="2024-12-31").encode_pair(SINGLE) == (
        ResponseTokenizer(chatml_tokenizer()).encode_pair(SINGLE)
    )
    with pytest.raises(ConfigError, match=r"tokenizer.template_date must be a date as YYYY-MM-DD"):
        ResponseTokenizer(chatml_tokenizer(), template_date="31/12/2024")


def test_prefix_errors_name_the_cause_and_what_to_set() -> None:
    with pytest.raises(TemplateError, match=r"dropped the system message from the full conversation") as caught:
        ResponseTokenizer(chatml_tokenizer(), SYSTEM_IF_LAST_USER).encode_pair(WITH_SYSTEM)
    assert caught.value.reason == "not_prefix_stable" and caught.value.row_id == "sys"
    assert "tokenizer.chat_template" in str(caught.value) and "tokenizer.boundary=generation" in str(caught.value)
    # With all merges learnt, "\n\n" is one token, as in Qwen's vocabulary: a response that
    # starts with "\n" glues onto the "assistant\n" of the generation prompt.
    glued = normalize_record({"id": "nl", "prompt": "Hi?", "chosen": "\nHello.", "rejected": "Go."})
    with pytest.raises(TemplateError, match=r"the response starts with whitespace \('\\n'\) that tokenises together"):
        ResponseTokenizer(chatml_tokenizer(vocab_size=1000)).encode_pair(glued)
    generated = ResponseTokenizer(chatml_tokenizer(vocab_size=1000), boundary="generation")
    assert _response(generated, glued) == "\nHello.<|im_end|>"
    with pytest.raises(TemplateError, match=r"opens a reasoning block \('<think>\\n'\)"):
        ResponseTokenizer(chatml_tokenizer(), R1_STYLE).encode_pair(SINGLE)
    earlier = normalize_record(
        {
            "id": "earlier",
            "prompt": [
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "<think>\nGreeting.\n</think>\n\nHello."},
                {"role": "user", "content": "And?"},
            ],
            "chosen": "Bye.",
            "rejected": "No.",
        }
    )
    # Keeps the reasoning of the last assistant message only: the earlier turn is the last
    # assistant message in the prompt render, but not once the response follows.
    last_keeps = (
        "{% set ns = namespace(last=-1) %}{% for m in messages %}"
        "{% if m['role'] == 'assistant' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 != ns.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    encoder = ResponseTokenizer(chatml_tokenizer(), last_keeps)
    encoder.encode_pair(SINGLE)
    with pytest.raises(TemplateError, match=r"strips the reasoning of an earlier assistant turn"):
        encoder.encode_pair(earlier)


def test_text_changes_are_recorded_per_sequence() -> None:
    trimming = ResponseTokenizer(chatml_tokenizer(), TRIMMING)
    assert trimming.encode_pair(MULTI).chosen.text_change == "trimmed"  # "  Pear. "
    assert trimming.encode_pair(SINGLE).chosen.text_change is None
    assert trimming.describe()["trims_content"] is True
    thinking = ResponseTokenizer(chatml_tokenizer(), QWEN3_STYLE)
    pair = thinking.encode_pair(SINGLE)
    assert pair.chosen.text_change == "inserted_before_content"  # the empty think block is scored
    assert _decode(thinking, pair.chosen.response_ids) == "<think>\n\n</think>\n\nIt is 4.<|im_end|>\n"
    assert ResponseTokenizer(chatml_tokenizer(), R1_STYLE, boundary="generation").describe()["strips_reasoning"]


@pytest.mark.parametrize(
    ("factory", "eot"),
    [(chatml_tokenizer, "<|im_end|>"), (phi_tokenizer, "<|im_end|>"), (llama3_tokenizer, "<|eot_id|>")],
)
def test_generation_boundary_is_prompt_plus_text_plus_end_of_turn(factory, eot) -> None:
    conversation = ResponseTokenizer(factory())
    generation = ResponseTokenizer(factory(), boundary="generation")
    assert generation.end_of_turn == eot
    pair = generation.encode_pair(SINGLE)
    assert pair.chosen.input_ids[: pair.chosen.response_start] == conversation.render_ids(
        SINGLE.prompt, add_generation_prompt=True
    )
    assert _decode(generation, pair.chosen.response_ids) == "It is 4." + eot
    assert generation.fingerprint() != conversation.fingerprint()


def test_generation_boundary_for_reasoning_templates() -> None:
    r1 = ResponseTokenizer(chatml_tokenizer(), R1_STYLE, boundary="generation")
    pair = r1.encode_pair(REASONED)
    # The prompt opened <think>; the data repeats it, so it is not scored twice.
    assert _response(r1, REASONED) == "They greet.\n</think>\n\nHello.<|im_end|>"
    assert pair.chosen.text_change == "continues_generation_prompt"
    qwen3 = ResponseTokenizer(chatml_tokenizer(), QWEN3_STYLE, boundary="generation")
    assert _response(qwen3, REASONED) == "<think>\nThey greet.\n</think>\n\nHello.<|im_end|>"
    quiet = ResponseTokenizer(
        chatml_tokenizer(), QWEN3_STYLE, boundary="generation", template_kwargs={"enable_thinking": False}
    )
    assert _response(quiet, SINGLE) == "It is 4.<|im_end|>"
    two = normalize_record(
        {"id": "two", "prompt": "Hi?", "chosen": [{"role": "assistant", "content": "A."},
                                                  {"role": "assistant", "content": "B."}], "rejected": "C."}
    )
    with pytest.raises(TemplateError, match=r"scores one generated assistant message, the response has 2"):
        r1.encode_pair(two)
    with pytest.raises(ConfigError, match=r"tokenizer.boundary must be one of conversation, generation"):
        ResponseTokenizer(chatml_tokenizer(), boundary="prefix")


def test_try_encode_records_or_raises_under_the_row_policy() -> None:
    from nemo_infifpo.data.policy import ExclusionLog, RowPolicy, TooManyExcludedRows

    encoder = ResponseTokenizer(chatml_tokenizer(), SYSTEM_IF_LAST_USER)
    log = ExclusionLog(RowPolicy(), stage="train", model="pivot")
    assert encoder.try_encode(SINGLE, log) is not None
    assert encoder.try_encode(WITH_SYSTEM, log) is None
    [entry] = log.entries
    assert (entry.id, entry.stage, entry.model, entry.reason) == ("sys", "train", "pivot", "not_prefix_stable")
    with pytest.raises(TooManyExcludedRows, match=r"1 of 2 rows are invalid \(stage train, model pivot; 50.00%\)"):
        log.check(2)
    log.check(100)
    with pytest.raises(TemplateError, match="dropped the system message"):
        encoder.try_encode(WITH_SYSTEM, ExclusionLog(RowPolicy("fail"), stage="train"))
