"""ROUGE-1/2/L F1 on jieba-segmented text, averaged over samples, as LLaMA-Factory computes it."""

from __future__ import annotations

import jieba
from rouge_chinese import Rouge

from evaluators.base import EvalContext, EvalResult, Evaluator

jieba.setLogLevel(60)  # jieba prints its dictionary loading to stderr on first use


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """rouge1/rouge2/rougeL F1 x100 for one pair; 0 when either side has no tokens."""
    hyp, ref = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if not hyp.split() or not ref.split():
        return {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    s = Rouge().get_scores(hyp, ref)[0]
    return {"rouge1": 100 * s["rouge-1"]["f"], "rouge2": 100 * s["rouge-2"]["f"], "rougeL": 100 * s["rouge-l"]["f"]}


class RougeChinese(Evaluator):
    name = "rouge"
    metrics = ("rouge1", "rouge2", "rougeL")
    mean_metrics = metrics

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        rows = [rouge_scores(p, s.reference) for p, s in zip(ctx.predictions, ctx.samples, strict=True)]
        per = {k: [r[k] for r in rows] for k in ("rouge1", "rouge2", "rougeL")}
        return EvalResult({k: sum(v) / len(v) for k, v in per.items()}, per)
