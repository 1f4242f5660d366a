"""RLOO online RL with rollouts from the in-loop vLLM engine, rewarded by checkable answers (as grpo_qwen)."""

from __future__ import annotations

from dataclasses import dataclass

from experiments.grpo_qwen import GrpoQwen
from harness.rl.rewards import make_rewards
from harness.rl.rollouts import VLLMRollout
from harness.training.experiment import help_field
from harness.training.methods import rloo_trainer


@dataclass
class RlooQwen(GrpoQwen):
    """RLOO on the embedded tiny Qwen2: G samples per task prompt from the shared vLLM engine, each sample's
    baseline the mean reward of the other G-1; same data, rewards and rules as grpo_qwen."""

    beta: float = help_field(0.0, "KL to a reference (TRL's RLOO default is 0.05); 0 needs no reference model")

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir, backend=None):
        rollout = VLLMRollout(backend, tokenizer, self.max_new_tokens, self.temperature, self.seed)
        args = self.trainer_args(output_dir)
        args.pop("max_length")  # prompts are rendered for the engine; completions are capped by max_new_tokens
        return rloo_trainer(model, tokenizer, rows, callbacks, rollout=rollout,
                            reward_funcs=make_rewards(self.rewards, self.reward_model),
                            reward_weights=self.reward_weights, num_generations=self.num_generations,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature, beta=self.beta, **args)
