"""KTO on unpaired preference data (prompt, completion, label), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field, preference_learning_rate
from harness.training.methods import kto_trainer


@dataclass
class KtoQwen(Experiment):
    """KTO on unpaired desirable/undesirable answers on the embedded tiny Qwen2 (pairs are split when given)."""

    beta: float = help_field(0.1, "strength of the KL anchor to the reference")
    desirable_weight: float = help_field(1.0, "loss weight of the desirable examples (raise it when they are fewer)")
    undesirable_weight: float = help_field(
        1.0, "loss weight of the undesirable examples (raise it when they are fewer)")
    learning_rate: float = preference_learning_rate()

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.01, 0.5, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "kto")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return kto_trainer(model, tokenizer, rows, callbacks, beta=self.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight, **self.trainer_args(output_dir))
