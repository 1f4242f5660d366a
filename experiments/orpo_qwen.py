"""ORPO (odds-ratio preference optimisation, SFT and preference in one loss), evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field, preference_learning_rate
from harness.training.methods import orpo_trainer


@dataclass
class OrpoQwen(Experiment):
    """ORPO (NLL on chosen plus an odds-ratio term, no reference) on the embedded tiny Qwen2."""

    beta: float = help_field(
        1.0, "weight of the odds-ratio preference term: the ORPO paper's lambda (0.1 there; on the embedded model at "
             "the default learning rate, 0.1 leaves most of the work to the NLL term: ROUGE-L +1.9 n.s., against +5.6)")
    learning_rate: float = preference_learning_rate()

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.05, 1.0, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return orpo_trainer(model, tokenizer, rows, callbacks, beta=self.beta, **self.trainer_args(output_dir))
