"""BLEU two ways: sacreBLEU corpus BLEU, and LLaMA-Factory's character-level sentence BLEU-4."""

from __future__ import annotations

import re

import sacrebleu

from evaluators.base import EvalContext, EvalResult, Evaluator

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def has_chinese(texts: list[str]) -> bool:
    return any(_CJK.search(t) for t in texts)


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """sacreBLEU corpus BLEU (0-100); tokenizer `zh` when any reference has Chinese characters, else `13a`."""
    tokenize = "zh" if has_chinese(references) else "13a"
    return sacrebleu.corpus_bleu(predictions, [references], tokenize=tokenize).score, tokenize


def char_bleu4(prediction: str, reference: str) -> float:
    """Character-level BLEU-4 with NLTK smoothing method3, x100, exactly as LLaMA-Factory's compute_metrics."""
    # nltk takes ~2 s to import: loaded on first use, not by every command that lists the evaluators
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return 100 * sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)


class Bleu(Evaluator):
    name = "bleu"
    metrics = ("bleu", "bleu4")

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        refs = [s.reference for s in ctx.samples]
        preds = ctx.predictions
        corpus, _ = corpus_bleu(preds, refs)
        per = [char_bleu4(p, r) for p, r in zip(preds, refs, strict=True)]
        return EvalResult({"bleu": corpus, "bleu4": sum(per) / len(per)}, {"bleu4": per})
