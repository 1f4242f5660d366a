"""GRPO online RL with rollouts from the in-loop vLLM engine, rewarded by checkable answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.errors import ConfigError
from harness.experiment import Experiment
from harness.methods import grpo_trainer
from harness.rewards import REWARDS
from harness.rollouts import VLLMRollout


@dataclass
class GrpoQwen(Experiment):
    """GRPO on the embedded tiny Qwen2: G samples per task prompt from the shared vLLM engine, answer rewards."""

    needs_rollouts = True
    train_data: str = "data/rl.jsonl"  # prompt, reference, answer: the columns the rewards read
    learning_rate: float = 1e-5
    batch_size: int = 8  # completions per step: batch_size / num_generations prompts
    num_generations: int = 4
    temperature: float = 1.0
    beta: float = 0.0  # KL to a reference; 0 (TRL's default) needs no reference model
    rewards: list[str] = field(default_factory=lambda: ["answer_match", "rouge_l"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.5])
    max_new_tokens: int = 32

    def validate(self) -> None:
        super().validate()
        unknown = [r for r in self.rewards if r not in REWARDS]
        problems = [
            (self.backend == "vllm", f"backend={self.backend!r}: rollouts come from the vLLM engine; use vllm"),
            (not unknown, f"rewards: unknown {unknown}; known: {', '.join(REWARDS)}"),
            (len(self.reward_weights) == len(self.rewards), "reward_weights: one weight per reward"),
            (self.num_generations >= 2, "num_generations must be >= 2 (advantages are relative to the group)"),
            (self.batch_size % self.num_generations == 0, "batch_size must be a multiple of num_generations"),
        ]
        for ok, why in problems:
            if not ok:
                raise ConfigError(f"{self.name()}: {why}")

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "temperature": trial.suggest_float("temperature", 0.7, 1.2)}

    def train_rows(self, records):
        from harness.errors import DataError

        rows = []
        for r in records:
            for key in ("prompt", "reference", "answer"):
                if not isinstance(r.fields.get(key), str) or not r.fields[key]:
                    raise DataError(f"{r.source}: field '{key}' must be a non-empty string (GRPO rewards read it)")
            rows.append({k: r.fields[k] for k in ("prompt", "reference", "answer")})
        return rows

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir, backend=None):
        rollout = VLLMRollout(backend, tokenizer, self.max_new_tokens, self.temperature, self.seed)
        args = self.trainer_args(output_dir)
        args.pop("max_length")  # prompts are rendered by the rollout; completions are capped by max_new_tokens
        return grpo_trainer(model, tokenizer, rows, callbacks, rollout=rollout,
                            reward_funcs=[REWARDS[r] for r in self.rewards], reward_weights=self.reward_weights,
                            num_generations=self.num_generations, max_new_tokens=self.max_new_tokens,
                            temperature=self.temperature, beta=self.beta, **args)
