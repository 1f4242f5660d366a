"""Continued pretraining on raw text, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment
from harness.training.methods import pretrain_trainer


@dataclass
class PretrainQwen(Experiment):
    """Continued pretraining of the embedded tiny Qwen2 on raw text (.txt one document per line, or {"text"} rows)."""

    train_data: str = "data/pretrain.txt"
    learning_rate: float = 1e-4
    max_length: int = 64
    select_metric: str = "eval/perplexity/perplexity"
    select_mode: str = "min"

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "text")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return pretrain_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
