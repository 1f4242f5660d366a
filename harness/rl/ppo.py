"""PPO for language models with a value model, as RLHF (Ziegler et al., InstructGPT) and its open implementations
define it: rollouts from the in-loop vLLM engine synced to the policy, a per-token KL penalty against the frozen
step-0 policy with the score added at the last token, GAE advantages (whitened), and clipped policy and value losses
over several epochs of minibatches per rollout. The README's PPO section says which choice follows which
implementation (TRL's PPOTrainer of v0.11-0.19, OpenRLHF, Huang et al.'s "N implementation details").

The pure functions take per-token tensors of shape (batch, tokens) and a 0/1 `mask` of the completion tokens;
`PPOTrainer` is a transformers Trainer, so callbacks (in-loop evaluation), checkpoints, resume, logging and
schedulers work as for every other method. One Trainer step is one rollout and its PPO epochs."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from harness.core.generation import GenParams
from harness.core.prompts import render_prompt


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the masked entries (OpenRLHF's; TRL applies Bessel's correction, a negligible
    difference at rollout sizes)."""
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back (scale only)."""
    mean = masked_mean(x, mask)
    white = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return (white if shift_mean else white + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each row's tokens: delta_t = r_t + gamma V_{t+1} - V_t,
    A_t = delta_t + gamma lam A_{t+1}, with V and A zero after the last completion token. Returns (advantages,
    returns = advantages + values), zero outside the mask."""
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        # a padded position passes the running values through unchanged, so padding is invisible to the recursion
        next_advantage = torch.where(m.bool(), advantage, next_advantage)
        next_value = torch.where(m.bool(), values[:, t], next_value)
        advantages[:, t] = advantage * m
    return advantages, (advantages + values) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """The per-token KL estimate log pi(a|s) - log pi_ref(a|s) of the sampled tokens ("k1", as in TRL and
    OpenRLHF's default): unbiased for the sequence KL and what the reward is penalised by."""
    return logprobs - ref_logprobs


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef x the KL penalty on every completion token, plus the sequence's score on its last
    completion token. Returns (rewards, per-token kl), both zero outside the mask."""
    kl = kl_penalty(logprobs, ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of each row's last completion token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss: mean of max(-A r, -A clip(r, 1 - eps, 1 + eps)) with r the probability
    ratio to the rollout policy. Returns (loss, fraction of tokens where the clip was active, approximate KL
    0.5 (log r)^2)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac, masked_mean(0.5 * log_ratio**2, mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped value loss: 0.5 x mean of max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of
    the rollout's values. Returns (loss, fraction of tokens where the clipped error was the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, masked_mean((clipped > unclipped).float(), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 for a perfect value model, 0 for one no better than the mean, below 0 worse."""
    var = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var) if var > 0 else float("nan")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the vocabulary."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


@dataclass(frozen=True)
class PPOSettings:
    ppo_epochs: int = 4
    num_minibatches: int = 2
    kl_coef: float = 0.05
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    temperature: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0


def _rows(rows: list[dict]) -> list[dict]:
    """The data collator: a batch is its rows as they are (prompts and the columns the rewards read)."""
    return rows


@dataclass
class Rollout:
    """One rollout, padded to (batch, tokens): `input_ids` is prompt + completion + padding; per-token tensors are
    aligned with the token they score, position t holding token t + 1 (`mask` marks completion tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mask: torch.Tensor
    engine_logprobs: torch.Tensor
    texts: list[str]
    lengths: list[int]


class PPOTrainer(Trainer):
    """PPO with a separate value model (its parameters join the policy's optimizer as a second group, so one
    optimizer, schedule and checkpoint cover both). The reference is the policy with its adapter disabled under
    PEFT (one base serves actor and reference), otherwise a frozen copy of the step-0 policy."""

    def __init__(self, model, args, train_dataset, processing_class, callbacks: list, *, backend, value_model,
                 reward_funcs: list, reward_weights: list[float], settings: PPOSettings):
        from peft import PeftModel

        # rows carry strings the model's forward does not take: keep them; clip gradients here, per PPO update
        args.remove_unused_columns = False
        self.max_grad_norm, args.max_grad_norm = args.max_grad_norm, 0.0
        super().__init__(model=model, args=args, train_dataset=train_dataset, processing_class=processing_class,
                         callbacks=callbacks, data_collator=_rows)
        self.backend = backend
        self.settings = settings
        self.value_model = value_model.to(self.args.device)
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.reference = None if isinstance(model, PeftModel) else copy.deepcopy(model).eval().requires_grad_(False)
        self._pending: dict[str, float] = {}

    # -- optimizer and checkpoints: the value model trains and is saved beside the policy
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in held for p in self.value_model.parameters()):  # a second call returns the same one
            optimizer.add_param_group({"params": [p for p in self.value_model.parameters() if p.requires_grad],
                                       "weight_decay": 0.0})
        return optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        self.value_model.save_pretrained(Path(output_dir or self.args.output_dir) / "value_model")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = Path(resume_from_checkpoint) / "value_model"
        if saved.is_dir():
            self.value_model.load_state_dict(type(self.value_model).from_pretrained(saved).state_dict())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The step's PPO metrics join the Trainer's own log of that step (loss, learning rate)."""
        logs, self._pending = {**logs, **self._pending}, {}
        super().log(logs, start_time)

    # -- one step: rollout, score, advantages, PPO epochs
    def _generate(self, rows: list[dict]) -> tuple[Rollout, float, float]:
        s = self.settings
        tokenizer = self.processing_class
        t = time.perf_counter()
        self.backend.sync_weights(self.model)
        sync_s = time.perf_counter() - t
        prompt_ids = [render_prompt(tokenizer, r["prompt"]) for r in rows]
        params = GenParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                           seed=s.seed + self.state.global_step, sample_logprobs=True)
        t = time.perf_counter()
        completions = self.backend.generate(prompt_ids, params)
        generate_s = time.perf_counter() - t
        sequences = [p + c.token_ids[0] for p, c in zip(prompt_ids, completions, strict=True)]
        width = max(map(len, sequences))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        mask = torch.zeros(len(rows), width - 1)
        engine_logprobs = torch.zeros(len(rows), width - 1)
        for i, (p, c) in enumerate(zip(prompt_ids, completions, strict=True)):
            n = len(sequences[i])
            input_ids[i, :n] = torch.tensor(sequences[i])
            attention_mask[i, :n] = 1
            mask[i, len(p) - 1:n - 1] = 1
            engine_logprobs[i, len(p) - 1:n - 1] = torch.tensor(c.logprobs[0])
        device = self.args.device
        rollout = Rollout(input_ids.to(device), attention_mask.to(device), mask.to(device), engine_logprobs.to(device),
                          [c.texts[0] for c in completions], [len(c.token_ids[0]) for c in completions])
        return rollout, sync_s, generate_s

    def _scores(self, rows: list[dict], texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the reward functions, called as TRL's GRPO calls them (completions, prompts and the
        rows' other columns as keyword lists)."""
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        prompts = [r["prompt"] for r in rows]
        total = torch.zeros(len(rows))
        means = {}
        for func, weight in zip(self.reward_funcs, self.reward_weights, strict=True):
            values = torch.tensor(func(completions=texts, prompts=prompts, **columns), dtype=torch.float32)
            means[f"ppo/rewards/{func.__name__}"] = values.mean().item()
            total += weight * values
        return total.to(self.args.device), means

    def _forward(self, model, rollout: Rollout, rows: slice | torch.Tensor, value_model=None):
        """Per-token logprobs of the completion tokens (at the sampling temperature, as the samples were drawn),
        the logits, and with `value_model` its value at each position."""
        ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        with self.compute_loss_context_manager():
            logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
            logprobs = torch.log_softmax(logits / self.settings.temperature, -1)
            logprobs = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            values = None
            if value_model is not None:
                values = value_model(input_ids=ids, attention_mask=attention).logits[:, :-1, 0].float()
        return logprobs, logits, values

    def training_step(self, model, inputs: list[dict], num_items_in_batch=None) -> torch.Tensor:
        s = self.settings
        started = time.perf_counter()
        rollout, sync_s, generate_s = self._generate(inputs)
        t = time.perf_counter()
        scores, reward_means = self._scores(inputs, rollout.texts)
        score_s = time.perf_counter() - t
        mask = rollout.mask
        everything = slice(None)
        t = time.perf_counter()
        model.eval()  # no dropout: the first minibatch's ratio is then exactly 1
        self.value_model.eval()
        with torch.no_grad():
            old_logprobs, logits, old_values = self._forward(model, rollout, everything, self.value_model)
            # the engine's logprobs are of the unscaled distribution: the check that rollouts came from these weights
            raw = torch.log_softmax(logits, -1).gather(-1, rollout.input_ids[:, 1:, None]).squeeze(-1)
            logprob_gap = ((raw - rollout.engine_logprobs).abs() * mask).max().item()
            token_entropy = masked_mean(entropy(logits / s.temperature), mask).item()
            del logits, raw
            # under PEFT the reference is the same base with the adapter switched off
            with model.disable_adapter() if self.reference is None else contextlib.nullcontext():
                ref_logprobs, _, _ = self._forward(self.reference or model, rollout, everything)
            rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, s.kl_coef)
            advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            advantages = whiten(advantages, mask)
        experience_s = time.perf_counter() - t

        t = time.perf_counter()
        model.train()
        self.value_model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac",
                                                          "approx_kl", "grad_norm", "loss")}
        shuffle = torch.Generator().manual_seed(s.seed + self.state.global_step)  # the same order after a resume
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(inputs), generator=shuffle).to(mask.device)
            # tensor_split: a short last batch of the data gives smaller (never empty) minibatches
            for rows in (r for r in torch.tensor_split(order, s.num_minibatches) if len(r)):
                logprobs, _, values = self._forward(model, rollout, rows, self.value_model)
                m = mask[rows]
                pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs[rows], advantages[rows], m,
                                                           s.cliprange)
                vf_loss, vf_clipfrac = value_loss(values, old_values[rows], returns[rows], m, s.cliprange_value)
                loss = pg_loss + s.vf_coef * vf_loss
                self.accelerator.backward(loss)
                # an infinite bound measures the norm without clipping
                bound = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
                norm = self.accelerator.clip_grad_norm_(params, bound)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # the Trainer's own update after this step is then a no-op
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clipfrac", clipfrac),
                                   ("value_clipfrac", vf_clipfrac), ("approx_kl", approx_kl), ("grad_norm", norm),
                                   ("loss", loss)):
                    stats[key].append(float(value))
        optimise_s = time.perf_counter() - t
        step_s = time.perf_counter() - started
        kl_sum = (kl.sum(1)).mean().item()
        self._pending = {
            "ppo/reward": scores.mean().item(), **reward_means,
            "ppo/rlhf_reward": (scores - s.kl_coef * kl.sum(1)).mean().item(),
            "ppo/kl": kl_sum, "ppo/entropy": token_entropy,
            **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if k not in ("loss", "grad_norm")},
            # the updates' own norm (before clipping) replaces the Trainer's, taken after they already zeroed it
            "grad_norm": sum(stats["grad_norm"]) / len(stats["grad_norm"]),
            "ppo/explained_variance": explained_variance(old_values, returns, mask),
            "ppo/value_mean": masked_mean(old_values, mask).item(),
            "ppo/response_length": sum(rollout.lengths) / len(rollout.lengths),
            "ppo/rollout_logprob_gap": logprob_gap,
            "ppo/time/sync_s": sync_s, "ppo/time/generate_s": generate_s, "ppo/time/score_s": score_s,
            "ppo/time/experience_s": experience_s, "ppo/time/optimise_s": optimise_s, "ppo/time/step_s": step_s,
        }
        return torch.tensor(sum(stats["loss"]) / len(stats["loss"]), device=mask.device)


def value_model_from(source: str, init: torch.nn.Module | None = None) -> torch.nn.Module:
    """The value model: a token-classification model with one output (a scalar value per token) and no dropout.
    With `init` (a reward model, as loaded for the reward) its trunk and score head are copied in: its head has no
    bias, which starts at 0. Without, `source` (the policy's starting weights) gives the trunk and the head starts
    at 0, so the first values are 0 and the first advantages are the rewards themselves."""
    from transformers import AutoConfig, AutoModelForTokenClassification

    if init is None:
        config = AutoConfig.from_pretrained(source, num_labels=1)
        config.classifier_dropout = 0.0
        model = AutoModelForTokenClassification.from_pretrained(source, config=config)
        with torch.no_grad():
            model.score.weight.zero_()
    else:
        config = copy.deepcopy(init.config)  # the reward model's architecture, which may differ from the policy's
        config.num_labels, config.classifier_dropout = 1, 0.0
        model = AutoModelForTokenClassification.from_config(config)
        missing, unexpected = model.load_state_dict(init.state_dict(), strict=False)
        if unexpected or set(missing) - {"score.bias"}:
            raise ValueError(f"the reward model does not fit a value model of its architecture: missing {missing}, "
                             f"unexpected {unexpected}")
    with torch.no_grad():
        if model.score.bias is not None:
            model.score.bias.zero_()
    return model.float() if not torch.cuda.is_available() else model

