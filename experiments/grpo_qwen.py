"""GRPO online RL with rollouts from the in-loop vLLM engine, rewarded by checkable answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.rl.rewards import REWARD_COLUMNS, make_rewards
from harness.rl.rollouts import VLLMRollout
from harness.training.experiment import Experiment
from harness.training.methods import grpo_trainer


@dataclass
class GrpoQwen(Experiment):
    """GRPO on the embedded tiny Qwen2: G samples per task prompt from the shared vLLM engine, answer rewards."""

    needs_rollouts = True
    train_data: str = "data/rl.jsonl"  # prompt, plus the columns the rewards read (REWARD_COLUMNS)
    learning_rate: float = 1e-5
    batch_size: int = 8  # completions per step: batch_size / num_generations prompts
    num_generations: int = 4
    temperature: float = 1.0
    beta: float = 0.0  # KL to a reference; 0 (TRL's default) needs no reference model
    rewards: list[str] = field(default_factory=lambda: ["answer_match", "rouge_l"])
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.5])
    reward_model: str = ""  # for the reward_model reward: a reward model directory, e.g. rm_qwen's best checkpoint
    max_new_tokens: int = 32

    def rules(self) -> list[tuple[bool, str, str]]:
        unknown = [r for r in self.rewards if r not in REWARD_COLUMNS]
        return [
            (not unknown, "", f"rewards: unknown {unknown}; known: {', '.join(REWARD_COLUMNS)}"),
            ("reward_model" not in self.rewards or bool(self.reward_model), "", "rewards=reward_model needs "
             "reward_model=PATH (a reward model directory, e.g. outputs/rm_qwen/<run id>/best)"),
            (len(self.reward_weights) == len(self.rewards), "", "reward_weights: one weight per reward"),
            (self.num_generations >= 2, "", "num_generations must be >= 2 (advantages are relative to the group)"),
            (self.batch_size % self.num_generations == 0, "", "batch_size must be a multiple of num_generations"),
        ]

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "temperature": trial.suggest_float("temperature", 0.7, 1.2)}

    def train_rows(self, records):
        from harness.core.errors import DataError

        columns = ("prompt", *dict.fromkeys(c for r in self.rewards for c in REWARD_COLUMNS[r]))
        rows = []
        for r in records:
            for key in columns:
                if not isinstance(r.fields.get(key), str) or not r.fields[key]:
                    raise DataError(f"{r.source}: field '{key}' must be a non-empty string (rewards "
                                    f"{','.join(self.rewards)} read {', '.join(columns)})")
            rows.append({k: r.fields[k] for k in columns})
        return rows

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir, backend=None):
        rollout = VLLMRollout(backend, tokenizer, self.max_new_tokens, self.temperature, self.seed)
        args = self.trainer_args(output_dir)
        args.pop("max_length")  # prompts are rendered by the rollout; completions are capped by max_new_tokens
        return grpo_trainer(model, tokenizer, rows, callbacks, rollout=rollout,
                            reward_funcs=make_rewards(self.rewards, self.reward_model),
                            reward_weights=self.reward_weights, num_generations=self.num_generations,
                            max_new_tokens=self.max_new_tokens, temperature=self.temperature, beta=self.beta, **args)
