"""One process of part `lora` (`python -m harness.commands.bench.lora_child`, a JSON request on stdin: model_dir,
prompts, lora_rank): six in-loop evaluations of a rank-16 LoRA model, each a training step's worth of change to
the adapter, a weight sync and greedy generation; prints the median seconds of the last five (the first warms up).
lora_rank null folds the adapter into the synced weights, 16 serves it as a vLLM LoRA request."""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.engines.vllm_engine import VLLMBackend


def evaluation_s(model_dir: str, prompts: list[str], lora_rank: int | None) -> float:
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in prompts]
    model = get_peft_model(load_model(model_dir), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    engine = VLLMBackend(model_dir, max_model_len=256, lora_rank=lora_rank)
    times = []
    for _ in range(6):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.01 * torch.randn_like(p))  # a training step's worth of change
        start = time.perf_counter()
        engine.sync_weights(model)
        engine.generate(prompt_ids, GenParams(max_new_tokens=48))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


if __name__ == "__main__":
    request = json.load(sys.stdin)
    print(json.dumps(evaluation_s(request["model_dir"], request["prompts"], request["lora_rank"])))
