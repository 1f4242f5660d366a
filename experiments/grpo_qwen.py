"""GRPO online RL with rollouts from the in-loop vLLM engine, rewarded by checkable answers."""

from __future__ import annotations

from dataclasses import dataclass

from harness.rl.rewards import make_rewards, reward_rows, reward_rules
from harness.rl.rollouts import VLLMRollout
from harness.training.experiment import Experiment, help_factory, help_field
from harness.training.lineage import reward_model_path
from harness.training.methods import grpo_trainer


@dataclass
class GrpoQwen(Experiment):
    """GRPO on the embedded tiny Qwen2: G samples per task prompt from the shared vLLM engine, answer rewards."""

    needs_rollouts = True
    trainer_factory = staticmethod(grpo_trainer)  # rloo_qwen swaps in RLOO on the same rollouts and rewards
    train_data: str = help_field(
        "data/rl.jsonl", "prompts, plus the columns the rewards read (answer, reference, test/entry_point)")
    learning_rate: float = help_field(1e-5, "peak learning rate, reached after the warm-up (see lr_scheduler_type)")
    batch_size: int = help_field(
        8, "completions per step: batch_size / num_generations prompts (a multiple of num_generations)")
    num_generations: int = help_field(4, "samples per prompt, the group the advantages are relative to (>= 2)")
    temperature: float = help_field(1.0, "sampling temperature of the rollouts")
    beta: float = help_field(0.0, "KL to a reference; 0 (TRL's default) needs no reference model")
    rewards: list[str] = help_factory(
        lambda: ["answer_match", "rouge_l"], "reward functions, comma-separated: answer_match, rouge_l, code_pass, "
                                             "reward_model")
    reward_weights: list[float] = help_factory(lambda: [1.0, 0.5], "one weight per reward, in the order of rewards")
    reward_model: str = help_field(
        "", "for the reward_model reward: a reward model run's best checkpoint, run:RUN_ID or run:latest:rm_qwen "
            "(pinned to the run's id), or a reward model directory")
    max_new_tokens: int = help_field(32, "cap on generated tokens per rollout completion and per eval prompt")

    def rules(self) -> list[tuple[bool, str, str]]:
        return [
            *reward_rules(self.rewards, self.reward_weights, self.reward_model),
            (self.num_generations >= 2, "", "num_generations must be >= 2 (advantages are relative to the group)"),
            (self.batch_size % self.num_generations == 0, "", "batch_size must be a multiple of num_generations"),
        ]

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "temperature": trial.suggest_float("temperature", 0.7, 1.2)}

    def train_rows(self, records):
        return reward_rows(records, self.rewards)

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir, backend=None):
        rollout = VLLMRollout(backend, tokenizer, self.max_new_tokens, self.temperature, self.seed,
                              each_rank=self.rollout_engines == "each_rank")
        args = self.trainer_args(output_dir)
        args.pop("max_length")  # prompts are rendered by the rollout; completions are capped by max_new_tokens
        return self.trainer_factory(model, tokenizer, rows, callbacks, rollout=rollout,
                                    reward_funcs=make_rewards(self.rewards, reward_model_path(self.reward_model)),
                                    reward_weights=self.reward_weights, num_generations=self.num_generations,
                                    max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    beta=self.beta, **args)
