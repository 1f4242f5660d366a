"""Knowledge distillation from a stronger teacher into the embedded student, evaluated in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.formats import convert
from harness.core.models import load_model, resolve_model
from harness.training.experiment import Experiment, help_field
from harness.training.methods import check_teacher_vocabulary, distill_trainer


@dataclass
class DistillQwen(Experiment):
    """Supervised KD: the embedded instruct model learns the embedded teacher's token distributions on chat data."""

    train_data: str = help_field(
        "data/sft.jsonl", "chat data (messages, sharegpt or alpaca) whose completions the student learns")
    teacher: str = help_field(
        "tiny-qwen2-teacher", "tiny-qwen2-teacher (the instruct model after a longer SFT stage, built with it), or a "
                            "path or hub model sharing the student's tokenizer")
    kd_alpha: float = help_field(
        0.5, "weight of the KL to the teacher; the rest (1 - kd_alpha) is cross-entropy on the data")
    kd_temperature: float = help_field(2.0, "softmax temperature of teacher and student in the KL (scaled by T^2)")
    learning_rate: float = help_field(1e-4, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-5, 1e-3, log=True),
                "kd_alpha": trial.suggest_float("kd_alpha", 0.1, 0.9),
                "kd_temperature": trial.suggest_float("kd_temperature", 1.0, 4.0)}

    def check_models(self, model_path: str) -> None:
        check_teacher_vocabulary(self.teacher, resolve_model(self.teacher), self.model, model_path,
                                 self.trust_remote_code)

    def train_rows(self, records):
        return convert(records, self.data_format, "sft")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        teacher = load_model(resolve_model(self.teacher), trust_remote_code=self.trust_remote_code)
        return distill_trainer(model, tokenizer, rows, callbacks, teacher=teacher, alpha=self.kd_alpha,
                               temperature=self.kd_temperature, **self.trainer_args(output_dir))
