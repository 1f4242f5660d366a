"""Perplexity and bits per byte of the eval references given their prompts.

Each reference is scored as the continuation of its rendered prompt (the reference's own tokens, encoded alone and
without special tokens, so a leading space in the reference is part of what is scored). From the same
log-likelihoods:
- perplexity: exp of the token-weighted mean NLL;
- bpb: bits per byte of the reference, lm-eval's `bits_per_byte` with its corpus aggregation: sum over samples of
  -loglik / (ln 2 x sum of the references' UTF-8 bytes). Unlike perplexity it does not depend on the tokenizer, so
  it compares models with different vocabularies (the metric OLMo and nanochat watch before accuracy moves).
"""

from __future__ import annotations

import math

import numpy as np

from evaluators.base import EvalContext, EvalResult, Evaluator
from evaluators.choice import Choice, bits_per_byte


def reference_ids(tokenizer, references: list[str]) -> list[list[int]]:
    return [tokenizer(r, add_special_tokens=False)["input_ids"] for r in references]


def perplexity_from_logprobs(logprobs: list[list[float]]) -> tuple[float, list[float]]:
    """Corpus perplexity weighting every reference token equally, and each sample's own perplexity."""
    total = sum(sum(lp) for lp in logprobs)
    count = sum(len(lp) for lp in logprobs)
    per = [math.exp(-sum(lp) / len(lp)) if lp else float("nan") for lp in logprobs]
    return math.exp(-total / count), per


def byte_stats(logprobs: list[list[float]], references: list[str]) -> list[list[float]]:
    """Each sample's [-loglik of its reference, the reference's UTF-8 bytes]: lm-eval's (loglikelihood, bytes)
    item of `bits_per_byte`, the bytes counted on the text that was tokenized and scored."""
    return [[-float(sum(lp)), float(len(r.encode("utf-8")))] for lp, r in zip(logprobs, references, strict=True)]


class Perplexity(Evaluator):
    name = "perplexity"
    metrics = ("perplexity", "bpb")
    needs_generation = False
    scores_references = True
    # per sample: perplexity [NLL summed over its reference tokens, its token count]; bpb [the same NLL, its bytes]
    corpus_metrics = ("perplexity", "bpb")

    @classmethod
    def corpus_score(cls, metric: str, totals: np.ndarray) -> np.ndarray:
        if metric == "bpb":  # the same aggregation as the choice evaluator's bits per byte of the gold answer
            return Choice.corpus_score(metric, totals)
        if metric != "perplexity":
            return super().corpus_score(metric, totals)
        totals = np.atleast_2d(totals)
        return np.exp(totals[:, 0] / totals[:, 1])

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        references = [s.reference for s in ctx.samples]
        logprobs = ctx.backend.logprobs(ctx.prompt_ids, reference_ids(ctx.tokenizer, references))
        corpus, per = perplexity_from_logprobs(logprobs)
        stats = [[-float(sum(lp)), len(lp)] for lp in logprobs]
        bytes_ = byte_stats(logprobs, references)
        per_bpb = [bits_per_byte([row]) if row[1] else float("nan") for row in bytes_]
        return EvalResult({"perplexity": corpus, "bpb": bits_per_byte(bytes_)},
                          {"perplexity": per, "bpb": per_bpb},
                          corpus_stats={"perplexity": stats, "bpb": bytes_})
