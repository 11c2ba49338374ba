"""Judges: what gives every candidate answer a score.

``reward_model``
    A Hugging Face sequence-classification reward model (``AutoModelForSequenceClassification``
    with one label; the paper used a Skywork reward model). The conversation, prompt + answer as
    one assistant message, is rendered with the *reward model's own* chat template through the
    project's template module; the score is the logit at the conversation's last token. Batches
    are grouped by length and left-padded, with explicit position ids, so a batched score equals
    the score of the conversation alone; ranks take turns over the batches (data parallel).
``function``
    ``package.module:name``, a Python callable ``f(row, answer) -> float``: ``row`` is the prompt
    row as a dict (``id``, ``prompt`` as messages, and every extra column, e.g. a reference
    answer or unit tests), ``answer`` the candidate's text. For verifiable tasks and demos.

A judge that raises, returns something that is not a number, or returns NaN/inf for one answer
does not stop the job: that answer is left out with the reason (``judge_error``,
``judge_not_a_number``, ``judge_nan``) and reported; the row policy's
``data.max_excluded_fraction`` bounds how many may go.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_infifpo.data.errors import ConfigError, InputError

__all__ = ["JUDGE_TYPES", "Judgement", "FunctionJudge", "RewardModelJudge", "load_function", "plan_length_batches"]

JUDGE_TYPES = ("reward_model", "function")


@dataclass(frozen=True)
class Judgement:
    """A score, or why there is none (``reason``: a short code; ``detail``: the message)."""

    score: float | None
    reason: str | None = None
    detail: str | None = None


def _checked_score(value: Any) -> Judgement:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        return Judgement(None, "judge_not_a_number", f"the judge returned {type(value).__name__} {value!r:.80}, not a number")
    score = float(value)
    if not math.isfinite(score):
        return Judgement(None, "judge_nan", f"the judge returned {score}")
    return Judgement(score)


def load_function(spec: str) -> Callable[[Mapping[str, Any], str], Any]:
    """The callable named ``package.module:name`` (``judge.function``)."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        raise ConfigError(f"judge.function must be 'package.module:name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"judge.function {spec!r}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"judge.function {spec!r}: {module_name} has no callable {name!r}")
    return function


class FunctionJudge:
    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.function = load_function(spec)

    def fingerprint(self) -> dict[str, Any]:
        """The function's name and its module's source: an edited verifier means other scores."""
        try:
            source = inspect.getsource(inspect.getmodule(self.function))  # type: ignore[arg-type]
        except (OSError, TypeError):
            source = ""
        return {"type": "function", "function": self.spec, "source_sha256": hashlib.sha256(source.encode("utf-8")).hexdigest()}

    def judge(self, row: Mapping[str, Any], answers: Sequence[str]) -> list[Judgement]:
        results = []
        for answer in answers:
            try:
                value = self.function(dict(row), answer)
            except Exception as error:  # any failure of user code is this answer's, not the job's
                results.append(Judgement(None, "judge_error", f"{type(error).__name__}: {error}"))
                continue
            results.append(_checked_score(value))
        return results


def plan_length_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest first, each batch within ``max_tokens`` padded tokens."""
    from nemo_infifpo.scoring.batching import plan_batches

    return [list(batch.indices) for batch in plan_batches(lengths, max_tokens)]


class RewardModelJudge:
    """A sequence-classification reward model; see the module docstring."""

    def __init__(self, model_path: str | Path, *, dtype: str, chat_template: str | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None, template_date: str | None = None,
                 tokenizer_path: str | None = None, max_length: int | None = None) -> None:
        from nemo_infifpo.data.templates import ResponseTokenizer, load_tokenizer
        from nemo_infifpo.scoring.manifest import model_fingerprint

        self.model_path = Path(model_path)
        if not self.model_path.is_dir():
            raise FileNotFoundError(f"judge.model_path: reward model not found: {self.model_path}")
        self.renderer = ResponseTokenizer(
            load_tokenizer(tokenizer_path or self.model_path), chat_template,
            template_kwargs=chat_template_kwargs, template_date=template_date,
        )
        self.dtype = dtype
        self.max_length = max_length
        self._model_fingerprint = model_fingerprint(self.model_path)
        self.model: Any = None

    def fingerprint(self) -> dict[str, Any]:
        return {"type": "reward_model", "model_fingerprint": self._model_fingerprint,
                "tokenizer_fingerprint": self.renderer.fingerprint(), "dtype": self.dtype, "max_length": self.max_length}

    def encode(self, messages: list[dict[str, str]], answer: str) -> list[int]:
        """The conversation's token ids under the reward model's own template."""
        return self.renderer.render_ids([*messages, {"role": "assistant", "content": answer}], add_generation_prompt=False)

    def load(self, device: Any) -> None:
        from transformers import AutoModelForSequenceClassification

        from nemo_infifpo.models.architecture import parse_dtype

        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(self.model_path), dtype=parse_dtype(self.dtype), local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"judge.model_path {str(self.model_path)!r}: cannot load a sequence-classification "
                             f"reward model ({error})") from None
        if model.config.num_labels != 1:
            raise InputError(f"judge.model_path {str(self.model_path)!r}: a reward model has one output label, "
                             f"this one has {model.config.num_labels}")
        self.model = model.to(device).eval()
        self.device = device

    def score_batch(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        """Scores of left-padded conversations: the logit at each one's last token."""
        import torch

        width = max(len(s) for s in sequences)
        ids = torch.zeros((len(sequences), width), dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, width - len(sequence):] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence):] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        # Embeddings instead of ids: the model then pools the last position of every row (the
        # last real token, with left padding) rather than searching for a pad id that may also
        # occur inside a conversation.
        # No gradients, without switching them off for the whole process (a global
        # set_grad_enabled(False) would leak into whatever runs next in it).
        with torch.no_grad():
            embeddings = self.model.get_input_embeddings()(ids)
            logits = self.model(inputs_embeds=embeddings, attention_mask=mask, position_ids=positions).logits
        return [float(v) for v in logits[:, 0].float().cpu().tolist()]
