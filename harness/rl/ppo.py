"""PPO for language models with a value model, as RLHF (Ziegler et al., InstructGPT) and its open implementations
define it: rollouts from the in-loop vLLM engine synced to the policy, a per-token KL penalty against the frozen
step-0 policy with the score added at the last token, GAE advantages (whitened), and clipped policy and value losses
over several epochs of minibatches per rollout. docs/guides/ppo.md says which choice follows which
implementation (TRL's PPOTrainer of v0.11-0.19, OpenRLHF, Huang et al.'s "N implementation details").

The pure functions take per-token tensors of shape (batch, tokens) and a 0/1 `mask` of the completion tokens;
`PPOTrainer` is a transformers Trainer, so callbacks (in-loop evaluation), checkpoints, resume, logging and
schedulers work as for every other method. One Trainer step is one rollout and its PPO epochs."""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer

from harness.core import ranks
from harness.core.generation import GenParams
from harness.core.prompts import render_prompt
from harness.rl.rollouts import RolloutStats, sample_across_ranks

# sums a tensor over the ranks of a multi-process run (an all-reduce), so a statistic covers every rank's tokens
SumRanks = Callable[[torch.Tensor], torch.Tensor]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, sum_ranks: SumRanks | None = None) -> torch.Tensor:
    sums = torch.stack([(x * mask).sum(), mask.sum()])
    if sum_ranks is not None:
        sums = sum_ranks(sums)
    return sums[0] / sums[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, sum_ranks: SumRanks | None = None) -> torch.Tensor:
    """Population variance over the masked entries (OpenRLHF's; TRL applies Bessel's correction, a negligible
    difference at rollout sizes)."""
    return masked_mean((x - masked_mean(x, mask, sum_ranks)) ** 2, mask, sum_ranks)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           sum_ranks: SumRanks | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back (scale only). With
    `sum_ranks` the mean and variance are over every rank's masked entries (OpenRLHF's global whitening)."""
    mean = masked_mean(x, mask, sum_ranks)
    var = masked_mean((x - mean) ** 2, mask, sum_ranks)  # masked_var, without computing the mean again
    white = (x - mean) * torch.rsqrt(var + eps)
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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       sum_ranks: SumRanks | None = None) -> float:
    """1 - Var(R - V) / Var(R): 1 for a perfect value model, 0 for one no better than the mean, below 0 worse
    (with `sum_ranks`, over every rank's tokens)."""
    var = masked_var(returns, mask, sum_ranks)
    return float(1 - masked_var(returns - values, mask, sum_ranks) / var) if var > 0 else float("nan")


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the vocabulary."""
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def fingerprint(module: torch.nn.Module) -> torch.Tensor:
    """Two float64 numbers per parameter tensor (the sum of its entries and of their squares): ranks that hold the
    same weights have bit-identical fingerprints, and any drift changes them (short of a coincidence)."""
    return torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                        for p in module.parameters()]).flatten()


def ranks_differing(fingerprints: torch.Tensor) -> list[int]:
    """The ranks (rows of `fingerprints`, one per rank) whose fingerprint is not exactly rank 0's."""
    return [r for r in range(1, len(fingerprints)) if not torch.equal(fingerprints[r], fingerprints[0])]


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
    each_rank: bool = False  # rollout_engines=each_rank: every rank generates its own rollouts with its own engine


class PolicyAndValue(torch.nn.Module):
    """The policy and the value model as one module, the one DeepSpeed or DDP wraps for training: its forward gives
    the policy's logits and the value at every position."""

    def __init__(self, policy: torch.nn.Module, value_model: torch.nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    @property
    def config(self):
        """The policy's: DeepSpeed's "auto" values (bucket sizes from hidden_size) are read from the wrapped model."""
        return self.policy.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                use_cache: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache).logits
        return logits, self.value_model(input_ids=input_ids, attention_mask=attention_mask).logits[..., 0]


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
    PEFT (one base serves actor and reference), otherwise a frozen copy of the step-0 policy.

    Across processes (`--launch deepspeed|torchrun`) every rank trains on its own prompts: rank 0's engine samples
    for all of them (`sample_across_ranks`), each rank rewards its own. The value model's gradients must be
    averaged across ranks exactly like the policy's, so DeepSpeed or DDP wraps one module holding both,
    `PolicyAndValue` (as TRL's old PPOTrainer wrapped its PolicyAndValueWrapper): one wrapper, one backward, one
    gradient reduction and one clip over both. Wrapping the policy alone cannot work under DeepSpeed: its ZeRO
    optimizer is built from this optimizer, value group included, and 0.19.8 refuses a parameter outside the
    wrapped module (KeyError in stage_1_and_2.py's _create_param_mapping); under DDP the value gradients would
    stay per rank. Only the wrapping sees the pair (`_prepare_for_training`); `self.model` stays the policy, which
    checkpoints, the best checkpoint, export, the callbacks and the engine's weight sync read. After every step
    the ranks compare fingerprints of both models' weights and raise if any rank drifted (a config that does not
    average every gradient, e.g. ZeRO stage 0, would otherwise train different value models silently)."""

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
        self.policy_and_value = PolicyAndValue(self.model, self.value_model)
        self.reward_funcs, self.reward_weights = reward_funcs, reward_weights
        self.reference = None if isinstance(model, PeftModel) else copy.deepcopy(model).eval().requires_grad_(False)
        self._pending: dict[str, float] = {}

    # -- optimizer and checkpoints: the value model trains and is saved beside the policy
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """The Trainer's wrapping (DeepSpeed, DDP) applied to PolicyAndValue (see the class docstring); afterwards
        `self.model` and the callbacks' model are the policy again, `self.model_wrapped` the wrapped pair."""
        policy = self.model
        self.model = self.model_wrapped = self.policy_and_value
        try:
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        finally:
            self.model = self.callback_handler.model = policy

    def create_optimizer(self, model=None):
        # the policy's parameter groups (weight decay as for every method), then the value model's own group
        optimizer = super().create_optimizer(model if model is not None else self.policy_and_value.policy)
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
        if not saved.is_dir():  # continuing with the value model's initial weights would not be the same run
            raise FileNotFoundError(f"{saved}: the checkpoint holds no value model, so PPO cannot continue from it")
        self.value_model.load_state_dict(type(self.value_model).from_pretrained(saved).state_dict())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The step's PPO metrics join the Trainer's own log of that step (loss, learning rate)."""
        logs, self._pending = {**logs, **self._pending}, {}
        super().log(logs, start_time)

    # -- across ranks: every collective below is called by every rank at the same point of every step
    @staticmethod
    def _distributed() -> bool:
        return ranks.world_size() > 1 and torch.distributed.is_initialized()

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """(world size, ...) : every rank's `local`, in rank order."""
        parts = [torch.empty_like(local) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, local.contiguous())
        return torch.stack(parts)

    def _sum_ranks(self) -> SumRanks | None:
        def total(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            torch.distributed.all_reduce(t)
            return t

        return total if self._distributed() else None

    def _mean_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over the ranks (each computed on its own rollout), so a logged value describes every
        completion of the step; the logprob gap is the largest of any rank's, being a bound."""
        if not self._distributed():
            return metrics
        keys = sorted(metrics)  # the same order on every rank
        values = self._gather(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64,
                                           device=self.args.device))
        return {k: float(values[:, i].max() if k == "ppo/rollout_logprob_gap" else values[:, i].mean())
                for i, k in enumerate(keys)}

    def _check_ranks_agree(self) -> None:
        """Raises if any rank's policy or value weights differ from rank 0's after the step's updates: a cheap
        permanent guard (one all-gather of two numbers per parameter tensor) that every gradient was averaged.
        Unaveraged value gradients show in the policy too, through the one gradient clip over both."""
        if not self._distributed():
            return
        prints = {"policy": fingerprint(self.model), "value model": fingerprint(self.value_model)}
        gathered = self._gather(torch.cat(list(prints.values())).to(self.args.device))
        drifted, start = [], 0
        for name, local in prints.items():
            differing = ranks_differing(gathered[:, start:start + len(local)])
            start += len(local)
            if differing:
                drifted.append(f"the {name} on rank(s) {differing}")
        if drifted:
            raise RuntimeError(
                f"PPO step {self.state.global_step + 1}: the weights of {' and '.join(drifted)} differ from rank 0's "
                f"after the update, so the ranks' gradients were not all averaged (every trainable parameter must "
                f"be inside the module DeepSpeed or DDP wraps: PolicyAndValue)")

    # -- one step: rollout, score, advantages, PPO epochs
    def _generate(self, rows: list[dict]) -> tuple[Rollout, RolloutStats]:
        """One completion per row from the engine synced with the policy; across processes rank 0 generates every
        rank's (the others hold no engine), unless every rank has its own (`each_rank`). The stats are rank 0's sync
        and generation."""
        s = self.settings
        tokenizer = self.processing_class
        prompt_ids = [render_prompt(tokenizer, r["prompt"]) for r in rows]
        params = GenParams(max_new_tokens=s.max_new_tokens, temperature=s.temperature, seed=s.seed,
                           sample_logprobs=True)
        # the unwrapped policy: the engine loads its state dict, not a DDP or DeepSpeed wrapper's
        completions, stats = sample_across_ranks(self.backend, self.model, prompt_ids, params, s.each_rank,
                                                 step=self.state.global_step)
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
        return rollout, stats

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

    def _forward(self, model, rollout: Rollout, rows: slice | torch.Tensor):
        """Per-token logprobs of the completion tokens (at the sampling temperature, as the samples were drawn),
        the logits, and the values at each position when `model` is PolicyAndValue or its wrapper (else None)."""
        ids, attention = rollout.input_ids[rows], rollout.attention_mask[rows]
        with self.compute_loss_context_manager():
            out = model(input_ids=ids, attention_mask=attention, use_cache=False)
            logits, values = out if isinstance(out, tuple) else (out.logits, None)
            logits = logits[:, :-1].float()
            logprobs = torch.log_softmax(logits / self.settings.temperature, -1)
            logprobs = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)
            if values is not None:
                values = values[:, :-1].float()
        return logprobs, logits, values

    def training_step(self, model, inputs: list[dict], num_items_in_batch=None) -> torch.Tensor:
        s = self.settings
        started = time.perf_counter()
        rollout, rollout_stats = self._generate(inputs)
        t = time.perf_counter()
        scores, reward_means = self._scores(inputs, rollout.texts)
        score_s = time.perf_counter() - t
        mask = rollout.mask
        everything = slice(None)
        t = time.perf_counter()
        model.eval()  # no dropout (policy and value model): the first minibatch's ratio is then exactly 1
        sum_ranks = self._sum_ranks()  # advantages whitened over every rank's tokens (see docs/guides/ppo.md)
        with torch.no_grad():
            # no gradient, so no wrapper: the unwrapped models (only an unwrapped PeftModel has disable_adapter)
            old_logprobs, logits, old_values = self._forward(self.policy_and_value, rollout, everything)
            # the engine's logprobs are of the unscaled distribution: the check that rollouts came from these weights
            raw = torch.log_softmax(logits, -1).gather(-1, rollout.input_ids[:, 1:, None]).squeeze(-1)
            logprob_gap = ((raw - rollout.engine_logprobs).abs() * mask).max().item()
            token_entropy = masked_mean(entropy(logits / s.temperature), mask).item()
            del logits, raw
            # under PEFT the reference is the same base with the adapter switched off
            with self.model.disable_adapter() if self.reference is None else contextlib.nullcontext():
                ref_logprobs, _, _ = self._forward(self.reference or self.model, rollout, everything)
            rewards, kl = token_rewards(scores, old_logprobs, ref_logprobs, mask, s.kl_coef)
            advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            advantages = whiten(advantages, mask, sum_ranks=sum_ranks)
        experience_s = time.perf_counter() - t

        t = time.perf_counter()
        model.train()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clipfrac", "value_clipfrac",
                                                          "approx_kl", "grad_norm", "loss")}
        shuffle = torch.Generator().manual_seed(s.seed + self.state.global_step)  # the same order after a resume
        for _ in range(s.ppo_epochs):
            order = torch.randperm(len(inputs), generator=shuffle).to(mask.device)
            # tensor_split: a short last batch of the data gives smaller (never empty) minibatches
            for rows in (r for r in torch.tensor_split(order, s.num_minibatches) if len(r)):
                # through the wrapper (DDP, DeepSpeed), whose backward averages both models' gradients across ranks
                logprobs, _, values = self._forward(model, rollout, rows)
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
        self._pending = self._mean_over_ranks({
            "ppo/reward": scores.mean().item(), **reward_means,
            "ppo/rlhf_reward": (scores - s.kl_coef * kl.sum(1)).mean().item(),
            "ppo/kl": kl_sum, "ppo/entropy": token_entropy,
            **{f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if k not in ("loss", "grad_norm")},
            # the updates' own norm (before clipping) replaces the Trainer's, taken after they already zeroed it
            "grad_norm": sum(stats["grad_norm"]) / len(stats["grad_norm"]),
            "ppo/explained_variance": explained_variance(old_values, returns, mask, sum_ranks),
            "ppo/value_mean": masked_mean(old_values, mask).item(),
            "ppo/response_length": sum(rollout.lengths) / len(rollout.lengths),
            "ppo/rollout_logprob_gap": logprob_gap,
            **rollout_stats.metrics(),
            "ppo/time/sync_s": rollout_stats.sync_s, "ppo/time/generate_s": rollout_stats.generate_s,
            "ppo/time/score_s": score_s, "ppo/time/experience_s": experience_s, "ppo/time/optimise_s": optimise_s,
            "ppo/time/step_s": step_s,
        })
        self._check_ranks_agree()
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

