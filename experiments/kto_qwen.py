"""KTO on unpaired preference data (prompt, completion, label), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field
from harness.training.methods import kto_trainer


@dataclass
class KtoQwen(Experiment):
    """KTO on unpaired desirable/undesirable answers on the embedded tiny Qwen2 (pairs are split when given)."""

    beta: float = help_field(0.1, "strength of the KL anchor to the reference")
    desirable_weight: float = help_field(1.0, "loss weight of the desirable examples (raise it when they are fewer)")
    undesirable_weight: float = help_field(
        1.0, "loss weight of the undesirable examples (raise it when they are fewer)")
    learning_rate: float = help_field(
        5e-6, "peak learning rate, reached after the warm-up; at 1e-5 the embedded model peaks by step 20-40 and falls "
              "back by step 60")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.01, 0.5, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "kto")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return kto_trainer(model, tokenizer, rows, callbacks, beta=self.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight, **self.trainer_args(output_dir))
