"""Supervised fine-tuning on easy Python tasks, with HumanEval-style pass@1 measured in the loop."""

from __future__ import annotations

from dataclasses import dataclass

from harness.core.records import prompt_completion_rows
from harness.training.experiment import Experiment, help_factory, help_field
from harness.training.methods import sft_trainer


@dataclass
class SftCodeQwen(Experiment):
    """SFT of the embedded tiny Qwen2 on easy code tasks; pass@1 on held-out tasks run in the sandbox."""

    model: str = help_field(
        "tiny-qwen2-base", "tiny-qwen2-base (the embedded model before any SFT: SFT's starting point), or any model "
                           "the base field takes")
    train_data: str = help_field("data/code_sft.jsonl", "code tasks as prompt/completion records")
    max_steps: int = help_field(120, "training steps (optimizer updates); 0 = train for num_train_epochs instead")
    eval_every: int = help_field(30, "evaluate in the loop every N steps, and at step 0 and after the last step")
    learning_rate: float = help_field(1e-3, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    batch_size: int = help_field(16, "training examples per step in each process (per-device batch size)")
    evaluators: list[str] = help_factory(
        lambda: ["humaneval"], "humaneval: pass@k of the completions run in the sandbox")
    select_metric: str = help_field("eval/humaneval/pass_at_1", "the best checkpoint is kept by pass@1")
    humaneval_problems: str = help_field(
        "data/code_eval.jsonl", "humaneval evaluator: a problems JSONL, or humaneval for the 164 shipped problems")
    humaneval_limit: int = help_field(0, "humaneval evaluator: a seeded subset of N problems; 0 means all")
    humaneval_n: int = help_field(1, "humaneval evaluator: samples per problem; 1 = greedy")
    humaneval_k: list[int] = help_factory(
        lambda: [1], "humaneval evaluator: the k of each pass@k reported (those <= humaneval_n)")
    humaneval_temperature: float = help_field(0.8, "humaneval evaluator: sampling temperature when humaneval_n > 1")
    humaneval_max_new_tokens: int = help_field(32, "humaneval evaluator: cap on generated tokens per completion")
    humaneval_prompt_style: str = help_field(
        "completion", "humaneval evaluator: completion (the raw prompt, cut at the stop sequences) or chat (the chat "
                      "template with an instruction)")
    humaneval_timeout_s: float = help_field(
        3.0, "humaneval evaluator: wall-clock limit per program in the sandbox, in seconds")
    humaneval_allow_weak_isolation: bool = help_field(
        False, "humaneval evaluator: run code without bubblewrap (limits only; the code can read your files)")

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
