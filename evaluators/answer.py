"""Whether an output states a record's short answer: the checkable part of the embedded tasks."""

from __future__ import annotations


def contains_answer(output: str, answer: str) -> bool:
    """True when the answer string appears verbatim in the output (case and spacing as written)."""
    return answer in output
