"""Part `ppo`: PPO's rollouts from the shared in-loop engine vs the trainer's own HF `generate`, then where the time
of a ppo_qwen step goes."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from harness.commands.bench.common import bench_model, prompts, tokens_per_s
from harness.core.generation import GenParams
from harness.core.models import load_tokenizer
from harness.core.prompts import render_prompt
from harness.embedded.tiny_qwen2 import ensure_tiny_model
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend
from harness.paths import REPO_ROOT


def ppo_speed(texts: list[str], new_tokens: int = 64, steps: int = 10) -> dict:
    """PPO's rollouts: sampled generation (temperature 1) from the shared in-loop engine vs the trainer's own HF
    `generate` on the same ~25M-parameter model and prompts; then a ppo_qwen run of `steps` steps in its own
    process, and the mean share of a step (after the first, which warms up) spent syncing, generating, scoring,
    computing the experience (old/reference logprobs, values, GAE) and optimising."""
    params = GenParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)
    result = {"prompts": len(texts), "new_tokens": new_tokens, "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(ensure_tiny_model(), Path(tmp))
        model.generation_config.eos_token_id = None  # HF runs to new_tokens; the engine stops at an EOS, rarely
        tokenizer = load_tokenizer(tmp)
        prompt_ids = [render_prompt(tokenizer, p) for p in texts]
        hf = HFBackend(tokenizer, batch_size=32)
        hf.sync_weights(model)
        result["hf_rollout_tok_s"] = tokens_per_s(
            lambda ids: sum(c.num_tokens for c in hf.generate(ids, params)), prompt_ids)
        engine = VLLMBackend(tmp, max_model_len=512)
        engine.sync_weights(model)
        result["vllm_rollout_tok_s"] = tokens_per_s(
            lambda ids: sum(c.num_tokens for c in engine.generate(ids, params)), prompt_ids)
        engine.close()
        uri = f"sqlite:///{tmp}/mlflow.db"
        subprocess.run([sys.executable, "-m", "harness", "run", "ppo_qwen", f"max_steps={steps}",
                        f"eval_every={steps}", f"output_dir={tmp}/out"], cwd=REPO_ROOT,
                       env={**os.environ, "MLFLOW_TRACKING_URI": uri}, check=True, capture_output=True)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("ppo_qwen").experiment_id])
        for part in ("sync", "generate", "score", "experience", "optimise", "step"):
            values = [m.value for m in client.get_metric_history(run.info.run_id, f"train/ppo/time/{part}_s")
                      if m.step > 1]
            result[f"{part}_s_mean"] = statistics.mean(values)
    return result


def run() -> dict:
    p = ppo_speed(prompts("rl.jsonl", 64))
    print(f"[bench] PPO rollouts, {p['prompts']} prompts x {p['new_tokens']} sampled tokens, ~25M-param Qwen2: "
          f"shared vLLM engine {p['vllm_rollout_tok_s']:.0f} tok/s vs the trainer's HF generate "
          f"{p['hf_rollout_tok_s']:.0f} tok/s -> {p['vllm_rollout_tok_s'] / p['hf_rollout_tok_s']:.2f}x",
          flush=True)
    step = p["step_s_mean"]
    shares = ", ".join(f"{part} {100 * p[f'{part}_s_mean'] / step:.0f}%"
                       for part in ("sync", "generate", "score", "experience", "optimise"))
    print(f"[bench] ppo_qwen, {p['steps']} steps: mean step {step:.2f}s (steps 2-{p['steps']}): {shares}",
          flush=True)
    return {"ppo": p}
