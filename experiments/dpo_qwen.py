"""DPO preference optimisation against a frozen reference model, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field, preference_learning_rate
from harness.training.methods import dpo_loss_types, dpo_trainer


@dataclass
class DpoQwen(Experiment):
    """DPO (sigmoid loss against a frozen copy of the starting model) on the embedded tiny Qwen2."""

    beta: float = help_field(0.1, "strength of the KL anchor to the reference")
    loss_type: str = help_field("sigmoid", "any of TRL's DPO losses: sigmoid, ipo, hinge, robust, ... (an unknown "
                                           "one is refused with the list)")
    learning_rate: float = preference_learning_rate()

    def rules(self) -> list[tuple[bool, str, str]]:
        losses = dpo_loss_types()
        return [(self.loss_type in losses, "loss_type", f"is not one of TRL's DPO losses: {', '.join(losses)}")]

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "beta": trial.suggest_float("beta", 0.01, 0.5, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "preference")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return dpo_trainer(model, tokenizer, rows, callbacks, beta=self.beta, loss_type=self.loss_type,
                           **self.trainer_args(output_dir))
