"""Function judges for prompts that carry a reference answer (``judge.function=
nemo_infifpo.generation.verifiers:<name>``). Each takes the prompt row (a dict with its extra
columns) and one answer, and returns a float; a row without the column raises, which leaves
that answer out and reports it (it does not stop the job).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["final_number", "reference_match", "reference_similarity"]

REFERENCE_COLUMN = "reference"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _reference(row: Mapping[str, Any]) -> str:
    if REFERENCE_COLUMN not in row:
        raise KeyError(f"prompt {row.get('id')!r} has no {REFERENCE_COLUMN!r} column")
    return str(row[REFERENCE_COLUMN])


def final_number(text: str) -> str | None:
    """The last number in ``text`` (how math answers are usually compared)."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def reference_match(row: Mapping[str, Any], answer: str) -> float:
    """1.0 when the answer's last number equals the reference's last number (or, for a reference
    without a number, when the stripped texts are equal); else 0.0."""
    reference = _reference(row)
    expected = final_number(reference)
    if expected is None:
        return float(answer.strip() == reference.strip())
    got = final_number(answer)
    return float(got is not None and float(got) == float(expected))


def reference_similarity(row: Mapping[str, Any], answer: str) -> float:
    """Character-level similarity in [0, 1] to the reference (difflib's ratio): a graded score
    for short free-form answers and for demos."""
    return difflib.SequenceMatcher(None, answer.strip(), _reference(row).strip(), autojunk=False).ratio()
