"""A reward model trained from preference pairs, evaluated in the loop by pairwise accuracy on held-out pairs."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_factory, help_field
from harness.training.methods import reward_trainer


@dataclass
class RmQwen(Experiment):
    """Reward model on the embedded tiny Qwen2 (scalar head); in-loop pairwise accuracy on held-out pairs."""

    model_head = "reward"
    learning_rate: float = help_field(1e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    backend: str = help_field("hf", "hf: the evaluator scores with the live model; a reward head does not generate")
    evaluators: list[str] = help_factory(
        lambda: ["reward_accuracy"], "reward_accuracy, the one evaluator a reward model supports")
    select_metric: str = help_field(
        "eval/reward_accuracy/accuracy", "the best checkpoint is kept by the % of held-out pairs scored chosen > "
                                         "rejected")
    reward_accuracy_pairs: str = help_field(
        "data/preference_eval.jsonl", "reward_accuracy evaluator: the held-out preference pairs it scores")
    reward_accuracy_limit: int = help_field(0, "reward_accuracy evaluator: first N pairs; 0 means all (256 here)")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return reward_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
