"""Pairwise accuracy of a reward model on held-out preference pairs: how often it scores chosen above rejected."""

from __future__ import annotations

from evaluators.base import EvalContext, EvalResult, Evaluator
from harness.core.formats import convert
from harness.core.records import read_records


def reward_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> list[float]:
    """A reward model's scalar score of each conversation, rendered by the chat template it was trained with."""
    scores = []
    for i in range(0, len(conversations), batch_size):
        texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[i:i + batch_size]]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        scores += model(**batch).logits[:, 0].float().tolist()
    return scores


class RewardAccuracy(Evaluator):
    name = "reward_accuracy"
    metrics = ("accuracy", "margin")
    mean_metrics = metrics  # over the pairs: their own rows, one per pair
    unit_column = "pair"
    needs_generation = False
    needs_model = True  # scores the live reward model itself (ctx.model)

    def __init__(self, pairs: str = "data/preference_eval.jsonl", limit: int = 64, batch_size: int = 32):
        rows = convert(read_records(pairs), "auto", "preference")  # a bad file stops the run before it opens
        self.rows = rows[:limit] if limit else rows
        self.batch_size = batch_size

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        # eval samples that are preference pairs (held out of a preference train_data by eval_split) are scored
        # themselves; other eval sets leave the evaluator its own `pairs` file
        rows = self.rows
        if ctx.samples and all(s.rejected is not None for s in ctx.samples):
            rows = [{"prompt": list(s.messages or [{"role": "user", "content": s.prompt}]),
                     "chosen": [{"role": "assistant", "content": s.reference}],
                     "rejected": [{"role": "assistant", "content": s.rejected}]} for s in ctx.samples]
        model, was_training = ctx.model, ctx.model.training
        model.eval()
        try:
            import torch  # the heavy package stays out of commands that only list evaluators

            with torch.no_grad():
                chosen = reward_scores(model, ctx.tokenizer, [r["prompt"] + r["chosen"] for r in rows], self.batch_size)
                rejected = reward_scores(model, ctx.tokenizer, [r["prompt"] + r["rejected"] for r in rows],
                                         self.batch_size)
        finally:
            model.train(was_training)
        margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
        wins = [100.0 * (m > 0) for m in margins]
        table = {"pair": list(range(len(rows))), "accuracy": wins, "margin": margins,
                 "prompt": [r["prompt"][-1]["content"] for r in rows],
                 "chosen": [r["chosen"][-1]["content"] for r in rows],
                 "rejected": [r["rejected"][-1]["content"] for r in rows],
                 "score_chosen": chosen, "score_rejected": rejected, "correct": [w > 0 for w in wins]}
        return EvalResult({"accuracy": sum(wins) / len(wins), "margin": sum(margins) / len(margins)}, table=table)
