"""Online-RL rollouts from the run's one vLLM engine: the engine the evaluators use, synced with the live
policy before every rollout, so RL pays for no second engine and no checkpoint round trip.

In a multi-process run only rank 0 holds the engine. `sample_across_ranks` is the one collective every rank calls
with its own prompts: rank 0 gathers them, syncs the engine with its copy of the policy (the same weights as every
other rank's under DDP or ZeRO-1/2) and generates for all ranks in one batch, then scatters each rank its own
completions. Each rank rewards only its own completions, so every completion is rewarded exactly once.
With `rollout_engines=each_rank` every rank holds an engine of its own instead and generates its own share (no
collective): faster where the ranks have compute of their own, at one engine's memory per rank
(`make bench PARTS=rollout_ranks` measures both)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from harness.core import ranks
from harness.core.generation import Completion, GenParams
from harness.core.prompts import render_prompt
from harness.engines.vllm_engine import VLLMBackend


@dataclass(frozen=True)
class RolloutStats:
    """What one rollout call cost, over all ranks: logged as `rollout/*` beside the trainer's own metrics."""

    completions: int  # completions the engine generated for every rank together
    ranks: int  # processes whose prompts went into the batch
    sync_s: float  # syncing the engine with the policy, on rank 0
    generate_s: float  # generation on rank 0

    def metrics(self) -> dict[str, float]:
        return {"rollout/completions": self.completions, "rollout/ranks": self.ranks,
                "rollout/sync_s": self.sync_s, "rollout/generate_s": self.generate_s}


def _sync_and_generate(backend: VLLMBackend, model: torch.nn.Module, prompt_ids: list[list[int]],
                       params: GenParams, step: int, first_index: int = 0) -> tuple[list[Completion], float, float]:
    """The engine synced with `model`, then its completions of `prompt_ids` (numbered from `first_index` for their
    seeds, see VLLMBackend.generate), with the seconds of each part (PPO's step breakdown reports them apart)."""
    start = time.perf_counter()
    backend.sync_weights(model)
    synced = time.perf_counter()
    indices = range(first_index, first_index + len(prompt_ids))
    completions = backend.generate(prompt_ids, params, step=step, indices=indices)
    return completions, synced - start, time.perf_counter() - synced


def sample_across_ranks(backend: VLLMBackend | None, model: torch.nn.Module, prompt_ids: list[list[int]],
                        params: GenParams, each_rank: bool = False,
                        step: int = 0) -> tuple[list[Completion], RolloutStats]:
    """`params.n` samples (with `params.sample_logprobs`, their logprobs) of every prompt in `prompt_ids` from the
    engine, synced with `model` first; each prompt seeded by (params.seed, `step`, its place in the batch of all
    ranks). Every rank must call it at the same point with its own prompts: rank 0
    passes the engine, the others None (see the module's docstring). In one process, or with `each_rank` (every
    rank passes its own engine), it is a sync and a generate of this rank's prompts."""
    distributed = ranks.world_size() > 1 and torch.distributed.is_initialized()
    if not distributed or each_rank:
        if backend is None:
            raise RuntimeError(f"rank {ranks.rank()} has no rollout engine (rollout_engines=each_rank builds one on "
                               f"every rank)")
        # with each_rank, rank r's prompts are numbered after the lower ranks' (equal shares), as when gathered
        first = ranks.rank() * len(prompt_ids) if distributed else 0
        completions, sync_s, generate_s = _sync_and_generate(backend, model, prompt_ids, params, step, first)
        return completions, RolloutStats(sum(len(c.texts) for c in completions), 1, sync_s, generate_s)
    gathered = [None] * ranks.world_size() if ranks.is_main() else None
    torch.distributed.gather_object(prompt_ids, gathered, dst=0)
    parts = None
    if ranks.is_main():
        if backend is None:
            raise RuntimeError("rank 0 has no rollout engine: it must pass the in-loop vLLM engine")
        completions, sync_s, generate_s = _sync_and_generate(
            backend, model, [p for part in gathered for p in part], params, step)
        stats = RolloutStats(sum(len(c.texts) for c in completions), len(gathered), sync_s, generate_s)
        parts, offset = [], 0
        for part in gathered:
            parts.append((completions[offset:offset + len(part)], stats))
            offset += len(part)
    received = [None]
    torch.distributed.scatter_object_list(received, parts, src=0)
    return received[0]


def log_stats(trainer, stats: RolloutStats) -> None:
    """Adds `stats` to the TRL trainer's step metrics (averaged over the logging window, logged as train/...)."""
    for key, value in stats.metrics().items():
        trainer._metrics["train"][key].append(value)


def group_heads(prompts: list, group: int) -> list:
    """The distinct prompts of a batch in which TRL (GRPO, RLOO) hands each prompt `group` times in a row: the
    engine then samples `group` completions from one request, which keeps the samples distinct."""
    unique = prompts[::group]
    if len(prompts) != len(unique) * group or any(p != unique[i // group] for i, p in enumerate(prompts)):
        raise RuntimeError(f"rollout expected each prompt repeated {group} times in a row (TRL's grouping)")
    return unique


class VLLMRollout:
    """A TRL GRPO `rollout_func`: G sampled completions per prompt, with the sampling logprobs. On a rank other
    than 0 of a multi-process run `backend` is None: rank 0 generates this rank's share (sample_across_ranks), unless
    `each_rank` (every rank passes its own engine)."""

    def __init__(self, backend: VLLMBackend | None, tokenizer, max_new_tokens: int, temperature: float, seed: int,
                 each_rank: bool = False):
        self.backend = backend
        self.each_rank = each_rank
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed

    def __call__(self, prompts: list[str], trainer) -> dict:
        group = trainer.num_generations
        prompt_ids = [render_prompt(self.tokenizer, p) for p in group_heads(prompts, group)]
        completions = self.sample(prompt_ids, group, trainer)
        return {"prompt_ids": [ids for ids in prompt_ids for _ in range(group)],
                "completion_ids": [ids for c in completions for ids in c.token_ids],
                "logprobs": [lps for c in completions for lps in c.logprobs]}

    def sample_groups(self, prompt_ids: list[list[int]], group: int, trainer) -> list[Completion]:
        """`sample` for a TRL batch that holds each prompt `group` times in a row (see group_heads)."""
        return self.sample(group_heads(prompt_ids, group), group, trainer)

    def sample(self, prompt_ids: list[list[int]], n: int, trainer) -> list[Completion]:
        """`n` samples of each prompt from the engine synced with `trainer.model`, across ranks, each prompt seeded
        by (seed, step, its index) (so each step's samples differ, and each prompt's from the others'); the cost is
        added to the trainer's metrics. RLOO and GKD call this from their own generation hooks
        (harness.training.methods)."""
        params = GenParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=n, seed=self.seed,
                           sample_logprobs=True)
        completions, stats = sample_across_ranks(self.backend, trainer.model, prompt_ids, params, self.each_rank,
                                                 step=trainer.state.global_step)
        log_stats(trainer, stats)
        return completions
