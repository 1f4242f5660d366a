"""What several bench parts share: the ~25M-parameter model, timing helpers, the shipped prompts."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from harness.core.models import load_tokenizer
from harness.paths import DATA_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the engine precisions the bench compares


def bench_model(tokenizer_dir: Path, out_dir: Path) -> Qwen2ForCausalLM:
    """hidden 512, 8 layers, 8 heads of 64: about 25M parameters with the embedded 2k vocabulary."""
    tokenizer = load_tokenizer(str(tokenizer_dir))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=1408, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def prompts(file: str, count: int) -> list[str]:
    """The first `count` prompts of data/`file`."""
    return [json.loads(line)["prompt"] for line in (DATA_DIR / file).read_text().splitlines()[:count]]


def tokens_per_s(generate: Callable[[list[list[int]]], int], prompt_ids: list[list[int]]) -> float:
    """Tokens/s of `generate` (which returns the number of tokens it generated) on `prompt_ids`, after a warm-up."""
    generate(prompt_ids[:4])
    t = time.perf_counter()
    tokens = generate(prompt_ids)
    return tokens / (time.perf_counter() - t)


def vllm_generate_counting(engine, sampling_params) -> Callable[[list[list[int]]], int]:
    """`generate` for tokens_per_s: the engine's vLLM LLM on token-id prompts, returning the tokens it generated."""
    from vllm.inputs import TokensPrompt

    def generate(prompt_ids: list[list[int]]) -> int:
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sampling_params,
                                   use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return generate


def median_s(call: Callable[[], object], repeats: int) -> float:
    """Median wall seconds of `repeats` calls of `call` (e.g. a weight sync into a live engine)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
