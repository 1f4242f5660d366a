"""Supervised fine-tuning on easy Python tasks, with HumanEval-style pass@1 measured in the loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.core.records import prompt_completion_rows
from harness.training.experiment import Experiment
from harness.training.methods import sft_trainer


@dataclass
class SftCodeQwen(Experiment):
    """SFT of the embedded tiny Qwen2 on easy code tasks; pass@1 on held-out tasks run in the sandbox."""

    train_data: str = "data/code_sft.jsonl"
    max_steps: int = 120
    eval_every: int = 30
    learning_rate: float = 1e-3
    batch_size: int = 16
    evaluators: list[str] = field(default_factory=lambda: ["humaneval"])
    select_metric: str = "eval/humaneval/pass_at_1"
    # humaneval_<option> fields configure the humaneval evaluator (see evaluators/humaneval.py)
    humaneval_problems: str = "data/code_eval.jsonl"  # or "humaneval" for the 164 shipped problems
    humaneval_limit: int = 0
    humaneval_n: int = 1  # samples per problem; 1 = greedy
    humaneval_k: list[int] = field(default_factory=lambda: [1])
    humaneval_temperature: float = 0.8
    humaneval_max_new_tokens: int = 32
    humaneval_prompt_style: str = "completion"
    humaneval_timeout_s: float = 3.0
    humaneval_allow_weak_isolation: bool = False

    def search_space(self, trial) -> dict:
        space = {"learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-3, log=True),
                 "batch_size": trial.suggest_categorical("batch_size", [8, 16])}
        if self.peft != "none":
            space["lora_rank"] = trial.suggest_categorical("lora_rank", [8, 16, 32])
        return space

    def train_rows(self, records):
        return prompt_completion_rows(records)

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir):
        return sft_trainer(model, tokenizer, rows, callbacks, **self.trainer_args(output_dir))
