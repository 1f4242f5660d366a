"""Online-RL rollouts from the run's one vLLM engine: the engine the evaluators use, synced with the live
policy before every rollout, so RL pays for no second engine and no checkpoint round trip."""

from __future__ import annotations

from harness.core.generation import GenParams
from harness.core.prompts import render_prompt
from harness.engines.vllm_engine import VLLMBackend


class VLLMRollout:
    """A TRL GRPO `rollout_func`: G sampled completions per prompt, with the sampling logprobs."""

    def __init__(self, backend: VLLMBackend, tokenizer, max_new_tokens: int, temperature: float, seed: int):
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed

    def __call__(self, prompts: list[str], trainer) -> dict:
        group = trainer.num_generations
        # TRL hands each prompt G times in a row; sampling G from one request keeps the samples distinct
        unique = prompts[::group]
        if len(prompts) != len(unique) * group or any(p != unique[i // group] for i, p in enumerate(prompts)):
            raise RuntimeError(f"rollout expected each prompt repeated {group} times in a row (TRL's grouping)")
        self.backend.sync_weights(trainer.model)
        prompt_ids = [render_prompt(self.tokenizer, p) for p in unique]
        params = GenParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=group,
                           seed=self.seed + trainer.state.global_step, sample_logprobs=True)
        completions = self.backend.generate(prompt_ids, params)
        return {"prompt_ids": [ids for ids in prompt_ids for _ in range(group)],
                "completion_ids": [ids for c in completions for ids in c.token_ids],
                "logprobs": [lps for c in completions for lps in c.logprobs]}
