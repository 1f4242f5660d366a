"""KTO on unpaired preference data (prompt, completion, label), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment
from harness.training.methods import kto_trainer


@dataclass
class KtoQwen(Experiment):
    """KTO on unpaired desirable/undesirable answers on the embedded tiny Qwen2 (pairs are split when given)."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    learning_rate: float = 1e-5

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.01, 0.5, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "kto")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return kto_trainer(model, tokenizer, rows, callbacks, beta=self.beta, desirable_weight=self.desirable_weight,
                           undesirable_weight=self.undesirable_weight, **self.trainer_args(output_dir))
