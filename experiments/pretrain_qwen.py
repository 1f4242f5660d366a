"""Continued pretraining on raw text, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field
from harness.training.methods import pretrain_trainer


@dataclass
class PretrainQwen(Experiment):
    """Continued pretraining of the embedded tiny Qwen2 on raw text (.txt one document per line, or {"text"} rows)."""

    model: str = help_field(
        "tiny-qwen2-base", "tiny-qwen2-base (the embedded model before any SFT: SFT's starting point), or any model "
                           "the base field takes")
    train_data: str = help_field("data/pretrain.txt", "raw text: a .txt file, one document per line, or text records")
    learning_rate: float = help_field(1e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    max_length: int = help_field(64, "tokens per document seen by the trainer (longer ones are truncated)")
    select_metric: str = help_field("eval/perplexity/perplexity", "the best checkpoint is kept by eval perplexity")
    select_mode: str = help_field("min", "min: a lower perplexity is better")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "text")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return pretrain_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
