"""SimPO preference optimisation of a Qwen2 model, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field, preference_learning_rate
from harness.training.methods import simpo_trainer


@dataclass
class SimpoQwen(Experiment):
    """SimPO (reference-free, length-normalised reward with a margin) on the embedded tiny Qwen2."""

    beta: float = help_field(2.5, "reward scale; the SimPO paper's setting")
    gamma: float = help_field(1.375, "target reward margin (TRL's simpo_gamma); the SimPO paper's setting")
    learning_rate: float = preference_learning_rate()

    def search_space(self, trial) -> dict:
        space = {
            "learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-3, log=True),
            "beta": trial.suggest_float("beta", 1.0, 10.0),
            "gamma": trial.suggest_float("gamma", 0.3, 2.0),
        }
        if self.peft != "none":
            space["lora_rank"] = trial.suggest_categorical("lora_rank", [8, 16, 32])
        return space

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return simpo_trainer(
            model, tokenizer, rows, callbacks, beta=self.beta, gamma=self.gamma,
            **self.trainer_args(output_dir))
