"""Reward functions for online RL, in TRL's signature (completions plus dataset columns as keyword lists).
They reuse what the evaluators measure, so the reward and the in-loop score agree on what "right" means."""

from __future__ import annotations

from evaluators.rouge import rouge_scores


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def answer_match(completions: list, answer: list[str], **_) -> list[float]:
    """1 when the completion contains the task's short answer (the checkable part of the embedded tasks)."""
    return [float(a in _text(c)) for c, a in zip(completions, answer, strict=True)]


def rouge_l(completions: list, reference: list[str], **_) -> list[float]:
    """ROUGE-L F1 against the reference answer, scaled to 0-1: a dense signal for the answer's form."""
    return [rouge_scores(_text(c), r)["rougeL"] / 100 for c, r in zip(completions, reference, strict=True)]


REWARDS = {"answer_match": answer_match, "rouge_l": rouge_l}
