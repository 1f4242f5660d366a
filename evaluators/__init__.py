"""Evaluators by name. Adding one is a small subclass of `Evaluator` with `name`, `metrics` and `evaluate`."""

from evaluators.answer import Answer
from evaluators.base import EvalContext, EvalResult, Evaluator
from evaluators.bleu import Bleu
from evaluators.choice import Choice
from evaluators.humaneval import HumanEval
from evaluators.ifeval import IFEval
from evaluators.judge import Judge
from evaluators.mtbench import MTBench
from evaluators.perplexity import Perplexity
from evaluators.reward_accuracy import RewardAccuracy
from evaluators.rouge import RougeChinese

EVALUATORS: dict[str, type[Evaluator]] = {cls.name: cls for cls in (Perplexity, Bleu, RougeChinese, HumanEval, Judge,
                                                              RewardAccuracy, Answer, Choice, IFEval, MTBench)}


def is_diagnostic(key: str) -> bool:
    """`key` (eval/[<set>/]<evaluator>/<metric>) is one of its evaluator's diagnostic_metrics."""
    parts = key.split("/")
    return len(parts) >= 3 and parts[-2] in EVALUATORS and parts[-1] in EVALUATORS[parts[-2]].diagnostic_metrics


__all__ = ["EVALUATORS", "EvalContext", "EvalResult", "Evaluator", "is_diagnostic"]
