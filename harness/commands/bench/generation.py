"""Parts `generation` and `sync` (one measurement): tokens/s of vLLM vs HF `generate` on the ~25M-parameter Qwen2,
and a weight sync into the live engine vs building one."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from harness.commands.bench.common import bench_model, median_s, prompts, tokens_per_s, vllm_generate_counting
from harness.core.generation import GenParams
from harness.core.models import load_tokenizer
from harness.core.prompts import render_prompt
from harness.embedded.tiny_qwen2 import ensure_tiny_model
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend, resolve_dtype


def generation_speed(model_dir: Path, model, texts: list[str], new_tokens: int) -> dict:
    """HF generate and vLLM in float32 and bfloat16; every call produces exactly `new_tokens` per prompt."""
    tokenizer = load_tokenizer(str(model_dir))
    prompt_ids = [render_prompt(tokenizer, p) for p in texts]
    model.generation_config.eos_token_id = None  # no early stop: equal token counts on both sides
    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "prompts": len(texts),
              "new_tokens": new_tokens}
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        hf = HFBackend(tokenizer, batch_size=32)
        hf.sync_weights(model.to(torch_dtype))
        params = GenParams(max_new_tokens=new_tokens)
        result[f"hf_{dtype}_tok_s"] = tokens_per_s(
            lambda ids, hf=hf, params=params: sum(c.num_tokens for c in hf.generate(ids, params)), prompt_ids)
    model.to(torch.float32)

    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for dtype in ("float32", "bfloat16"):
        t = time.perf_counter()
        vllm = VLLMBackend(str(model_dir), max_model_len=512, dtype=dtype)
        result[f"engine_build_{dtype}_s"] = time.perf_counter() - t
        result[f"vllm_{dtype}_tok_s"] = tokens_per_s(vllm_generate_counting(vllm, sp), prompt_ids)
        result[f"sync_{dtype}_s_median"] = median_s(lambda vllm=vllm: vllm.sync_weights(model), 5)
        vllm.close()
    return result


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = bench_model(ensure_tiny_model(), Path(tmp))
        g = generation_speed(Path(tmp), model, prompts("eval.jsonl", 128), new_tokens=128)
    print(f"[bench] generation, {g['params_m']:.1f}M-param Qwen2, {g['prompts']} prompts x {g['new_tokens']} "
          f"new tokens each, tokens/s:")
    for dtype in ("float32", "bfloat16"):
        hf, vllm = g[f"hf_{dtype}_tok_s"], g[f"vllm_{dtype}_tok_s"]
        print(f"[bench]   {dtype:<8}  HF generate {hf:6.0f}   vLLM {vllm:6.0f}   vLLM/HF = {vllm / hf:.2f}x")
    default = resolve_dtype("auto")
    print(f"[bench]   in-loop default here: vLLM {default} vs HF generate on the float32 weights being trained: "
          f"{g[f'vllm_{default}_tok_s'] / g['hf_float32_tok_s']:.2f}x; opt-in vLLM bfloat16 vs the same: "
          f"{g['vllm_bfloat16_tok_s'] / g['hf_float32_tok_s']:.2f}x")
    first, rebuild = g["engine_build_float32_s"], g["engine_build_bfloat16_s"]
    sync = max(g["sync_float32_s_median"], g["sync_bfloat16_s_median"])
    print(f"[bench] weight sync into the live engine: {sync:.3f}s (median of 5, slower dtype) vs building an "
          f"engine: {first:.1f}s first in a process, {rebuild:.1f}s for another -> sync is {rebuild / sync:.0f}x "
          "faster than even the cheaper rebuild", flush=True)
    return {"generation": g}
