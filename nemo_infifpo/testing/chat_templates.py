"""Chat templates written for tests, each with one behaviour real templates have and a scoring
job must survive. All use ChatML-style turns (``<|im_start|>role\\n...<|im_end|>\\n``), so they
work with :func:`~nemo_infifpo.testing.tokenizers.chatml_tokenizer` and the tiny Qwen2 model.

======================  ====================================================================
``DATED``               with no system message, a default system prompt holding today's date
                        (``strftime_now``)
``SYSTEM_IF_LAST_USER`` emits the system message only when the last message is a user message
``TRIMMING``            trims every message's content
``R1_STYLE``            the generation prompt opens ``<think>\\n``; assistant turns are rendered
                        with the reasoning (everything up to ``</think>``) stripped
``QWEN3_STYLE``         the last assistant turn is rendered with a think block (empty when the
                        content has no reasoning), earlier turns without; with
                        ``enable_thinking=false`` the generation prompt holds an empty think block
``LEADING_NEWLINE_OK``  plain ChatML (a response starting with ``"\\n"`` merges with
                        ``assistant\\n`` into one token: not prefix-stable for that row)
======================  ====================================================================
"""

from __future__ import annotations

__all__ = [
    "DATED",
    "LEADING_NEWLINE_OK",
    "QWEN3_STYLE",
    "R1_STYLE",
    "SYSTEM_IF_LAST_USER",
    "TRIMMING",
]

_TURN = "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
_GENERATION = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

DATED = (
    "{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{% set rest = messages %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant. Today is ' + strftime_now('%Y-%m-%d') "
    "+ '.<|im_end|>\\n' }}{% endif %}"
    "{% for m in rest %}" + _TURN + "{% endfor %}" + _GENERATION
)

SYSTEM_IF_LAST_USER = (
    "{% for m in messages %}"
    "{% if m['role'] != 'system' or messages[-1]['role'] == 'user' %}" + _TURN + "{% endif %}"
    "{% endfor %}" + _GENERATION
)

TRIMMING = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + '<|im_end|>\\n' }}"
    "{% endfor %}" + _GENERATION
)

R1_STYLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' + (m['content'].split('</think>')[-1] | trim) + '<|im_end|>\\n' }}"
    "{% else %}" + _TURN + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)

QWEN3_STYLE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set answer = m['content'].split('</think>')[-1] | trim %}"
    "{% if loop.last %}"
    "{% set reasoning = m['content'].split('</think>')[0].replace('<think>', '') | trim "
    "if '</think>' in m['content'] else '' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + answer + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' }}{% endif %}"
    "{% else %}" + _TURN + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)

LEADING_NEWLINE_OK = "{% for m in messages %}" + _TURN + "{% endfor %}" + _GENERATION
