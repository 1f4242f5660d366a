"""CPO (contrastive preference optimisation, no reference model), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field, preference_learning_rate
from harness.training.methods import cpo_trainer


@dataclass
class CpoQwen(Experiment):
    """CPO (sigmoid preference loss plus NLL on the chosen answers, no reference) on the embedded tiny Qwen2."""

    beta: float = help_field(
        0.1, "scale of the chosen-minus-rejected log-probability inside the sigmoid preference loss")
    cpo_alpha: float = help_field(1.0, "weight of the NLL (behaviour cloning) term on the chosen answers")
    learning_rate: float = preference_learning_rate()

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.01, 0.5, log=True),
                "cpo_alpha": trial.suggest_float("cpo_alpha", 0.0, 2.0)}

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return cpo_trainer(model, tokenizer, rows, callbacks, beta=self.beta, cpo_alpha=self.cpo_alpha,
                           **self.trainer_args(output_dir))
