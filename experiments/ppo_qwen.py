"""PPO with a value model, rollouts from the in-loop vLLM engine, rewarded by checkable answers or a reward model."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset
from transformers import TrainingArguments

from harness.rl.ppo import PPOSettings, PPOTrainer, value_model_from
from harness.rl.rewards import RewardModel, make_rewards, reward_rows, reward_rules
from harness.training.experiment import Experiment, help_factory, help_field
from harness.training.lineage import reward_model_path
from harness.training.methods import make_config

VALUE_INITS = ("auto", "reward_model", "policy")


@dataclass
class PpoQwen(Experiment):
    """PPO on the embedded tiny Qwen2: value model, per-token KL to the step-0 policy, GAE, clipped losses."""

    needs_rollouts = True
    train_data: str = help_field(
        "data/rl.jsonl", "prompts, plus the columns the rewards read (answer, reference, test/entry_point)")
    max_steps: int = help_field(
        20, "PPO steps: each is one rollout of batch_size prompts and ppo_epochs x num_minibatches updates")
    eval_every: int = help_field(10, "evaluate in the loop every N steps, and at step 0 and after the last step")
    learning_rate: float = help_field(
        1e-5, "peak learning rate of the policy and the value model, reached after the warm-up")
    batch_size: int = help_field(8, "prompts per rollout, one sampled completion each")
    ppo_epochs: int = help_field(2, "optimisation passes over each rollout")
    num_minibatches: int = help_field(2, "minibatches per pass (each one optimizer update); divides batch_size")
    kl_coef: float = help_field(
        0.05, "per-token KL penalty coefficient against the reference (the step-0 policy; with LoRA the base model)")
    gamma: float = help_field(1.0, "discount of GAE (1: the score at the last token counts fully for every token)")
    lam: float = help_field(0.95, "lambda of GAE: 1 = Monte-Carlo returns, 0 = one-step TD")
    cliprange: float = help_field(0.2, "PPO's clip of the probability ratio to [1 - cliprange, 1 + cliprange]")
    cliprange_value: float = help_field(0.2, "clip of the new values to within this of the rollout's values")
    vf_coef: float = help_field(0.1, "weight of the value loss in the combined loss")
    temperature: float = help_field(1.0, "sampling temperature of the rollouts (the logprobs are taken at it too)")
    value_init: str = help_field(
        "auto", "the value model's initial weights: reward_model (trunk and head of reward_model), policy (the "
                "policy's starting trunk, a zero head), auto (reward_model when reward_model is set, else policy)")
    rewards: list[str] = help_factory(
        lambda: ["answer_match", "rouge_l"], "reward functions, comma-separated: answer_match, rouge_l, code_pass, "
                                             "reward_model")
    reward_weights: list[float] = help_factory(lambda: [1.0, 0.5], "one weight per reward, in the order of rewards")
    reward_model: str = help_field(
        "", "for the reward_model reward and value_init: a reward model run's best checkpoint, run:RUN_ID or "
            "run:latest:rm_qwen (pinned to the run's id), or a reward model directory")
    max_new_tokens: int = help_field(32, "cap on generated tokens per rollout completion and per eval prompt")

    def rules(self) -> list[tuple[bool, str, str]]:
        return [
            *reward_rules(self.rewards, self.reward_weights, self.reward_model),
            (self.ppo_epochs >= 1, "ppo_epochs", "must be >= 1"),
            (self.num_minibatches >= 1 and self.batch_size % self.num_minibatches == 0, "num_minibatches",
             f"must divide batch_size={self.batch_size} (each minibatch is batch_size / num_minibatches rollouts)"),
            (self.gradient_accumulation_steps == 1, "gradient_accumulation_steps",
             "must be 1 for PPO: a step is one rollout; use batch_size and num_minibatches instead"),
            (0 < self.gamma <= 1, "gamma", "must be in (0, 1]"),
            (0 <= self.lam <= 1, "lam", "must be in [0, 1]"),
            (self.kl_coef >= 0, "kl_coef", "must be >= 0"),
            (self.cliprange > 0 and self.cliprange_value > 0, "cliprange", "cliprange and cliprange_value must be > 0"),
            (self.value_init in VALUE_INITS, "value_init", f"must be one of {', '.join(VALUE_INITS)}"),
            (self.value_init != "reward_model" or bool(self.reward_model), "value_init",
             "value_init=reward_model needs reward_model=PATH (e.g. run:latest:rm_qwen or "
             "outputs/rm_qwen/<run id>/best)"),
        ]

    def search_space(self, trial) -> dict:
        return {"learning_rate": trial.suggest_float("learning_rate", 1e-6, 1e-4, log=True),
                "kl_coef": trial.suggest_float("kl_coef", 0.01, 0.2, log=True)}

    def train_rows(self, records):
        return reward_rows(records, self.rewards)

    def build_trainer(self, model, tokenizer, rows, callbacks, output_dir, backend=None):
        reward_path = reward_model_path(self.reward_model)  # a run: reference costs a tracking-store lookup
        reward_funcs = make_rewards(self.rewards, reward_path)
        init = None
        if self.value_init == "reward_model" or (self.value_init == "auto" and self.reward_model):
            # reuse the reward model the reward already loaded (and merged, for a LoRA one) rather than load it twice
            scorer = next((f for f in reward_funcs if isinstance(f, RewardModel)), None) or RewardModel(reward_path)
            init = scorer.model
        settings = PPOSettings(ppo_epochs=self.ppo_epochs, num_minibatches=self.num_minibatches,
                               kl_coef=self.kl_coef, gamma=self.gamma, lam=self.lam, cliprange=self.cliprange,
                               cliprange_value=self.cliprange_value, vf_coef=self.vf_coef,
                               temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed,
                               each_rank=self.rollout_engines == "each_rank")
        args = self.trainer_args(output_dir)
        args.pop("max_length")  # prompts are rendered for the engine; completions are capped by max_new_tokens
        return PPOTrainer(model, make_config(TrainingArguments, {}, args), Dataset.from_list(rows), tokenizer,
                          callbacks, backend=backend, value_model=value_model_from(model.name_or_path, init),
                          reward_funcs=reward_funcs, reward_weights=self.reward_weights, settings=settings)
