"""A reward model trained from preference pairs, evaluated in the loop by pairwise accuracy on held-out pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.formats import convert
from harness.training.experiment import Experiment
from harness.training.methods import reward_trainer


@dataclass
class RmQwen(Experiment):
    """Reward model on the embedded tiny Qwen2 (scalar head); in-loop pairwise accuracy on held-out pairs."""

    model_head = "reward"
    learning_rate: float = 1e-4
    backend: str = "hf"  # the evaluator scores with the live model; a reward head does not generate
    evaluators: list[str] = field(default_factory=lambda: ["reward_accuracy"])
    select_metric: str = "eval/reward_accuracy/accuracy"
    reward_accuracy_pairs: str = "data/preference_eval.jsonl"
    reward_accuracy_limit: int = 64

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return reward_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
