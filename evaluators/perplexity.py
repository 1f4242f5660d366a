"""Perplexity of the eval references given their prompts: exp of the token-weighted mean NLL."""

from __future__ import annotations

import math

import numpy as np

from evaluators.base import EvalContext, EvalResult, Evaluator


def reference_ids(tokenizer, references: list[str]) -> list[list[int]]:
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in references]


def perplexity_from_logprobs(logprobs: list[list[float]]) -> tuple[float, list[float]]:
    """Corpus perplexity weighting every reference token equally, and each sample's own perplexity."""
    total = sum(sum(lp) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    per = [math.exp(-sum(lp) / len(lp)) if lp else float("nan") for lp in logprobs]
    return math.exp(-total / count), per


class Perplexity(Evaluator):
    name = "perplexity"
    metrics = ("perplexity",)
    needs_generation = False
    scores_references = True
    corpus_metrics = ("perplexity",)  # per sample: [NLL summed over its reference tokens, its token count]

    @classmethod
    def corpus_score(cls, metric: str, totals: np.ndarray) -> np.ndarray:
        if metric != "perplexity":
            return super().corpus_score(metric, totals)
        totals = np.atleast_2d(totals)
        return np.exp(totals[:, 0] / totals[:, 1])

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        refs = reference_ids(ctx.tokenizer, [s.reference for s in ctx.samples])
        logprobs = ctx.backend.logprobs(ctx.prompt_ids, refs)
        corpus, per = perplexity_from_logprobs(logprobs)
        stats = [[-float(sum(lp)), len(lp)] for lp in logprobs]
        return EvalResult({"perplexity": corpus}, {"perplexity": per}, corpus_stats={"perplexity": stats})
