"""Supervised fine-tuning on chat data, loss on the assistant tokens only, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.training.experiment import Experiment, help_field
from harness.training.methods import sft_trainer


@dataclass
class SftQwen(Experiment):
    """SFT of the embedded tiny Qwen2 on chat data (messages, ShareGPT or Alpaca), multi-turn, assistant-only loss."""

    model: str = help_field(
        "tiny-qwen2-base", "tiny-qwen2-base (the embedded model before any SFT: SFT's starting point), or any model "
                           "the base field takes")
    train_data: str = help_field("data/sft.jsonl", "chat data: messages, sharegpt or alpaca records, multi-turn")
    learning_rate: float = help_field(1e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    chat_template: str = help_field(
        "chatml", "the chat format SFT teaches (the base model has none: SFT brings it): a named template (chatml), "
                  "a Jinja file, or empty for the model's own")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True)}

    def train_rows(self, records):
        return convert(records, self.data_format, "sft")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return sft_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
