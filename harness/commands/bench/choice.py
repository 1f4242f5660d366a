"""Part `choice`: multiple choice by log-likelihood (the `choice` evaluator) on SmolLM2, the in-loop vLLM engine's
prompt log-probs vs the HF backend's forward pass, side by side in one run; and the scoring's share of an evaluation
of a default sft_smollm2 run."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from evaluators import EvalContext
from evaluators.choice import Choice
from experiments.sft_smollm2 import SftSmollm2
from harness.core.models import load_model, load_tokenizer
from harness.engines.hf_engine import HFBackend
from harness.paths import DATA_DIR
from harness.training.overrides import apply_overrides
from harness.training.runner import eval_suite, make_backend, prepare_evaluation


@dataclass(frozen=True)
class ChoiceBenchSize:
    """The `choice` workload: `questions` 4-choice questions scored by each backend `rounds` times, the backends
    alternating; and one evaluation of sft_smollm2's default evaluators on its first `eval_prompts` eval prompts
    (`new_tokens` each), as a run's eval step, on `model`."""

    model: str = "smollm2"
    questions: int = 400
    rounds: int = 2
    eval_prompts: int = 32
    new_tokens: int = 32


# BENCH_CHOICE_TINY=1: a quick end-to-end check of the part's machinery on the embedded model, not a measurement
CHOICE_TINY = ChoiceBenchSize(model="tiny-qwen2", questions=8, rounds=1, eval_prompts=4, new_tokens=8)


def write_questions(count: int, path: Path) -> None:
    """`count` distinct 4-choice questions in the plain shape, made deterministically from data/choice_eval.jsonl's
    4-choice questions: pass k takes each again with its choices rotated k places (the gold answer moves with them)
    and numbers it ("Question 61. ..."), so no two contexts are equal and the lengths stay those of the real set."""
    source = [json.loads(line) for line in (DATA_DIR / "choice_eval.jsonl").read_text().splitlines()]
    source = [r for r in source if len(r["choices"]) == 4]
    with path.open("w") as f:
        for i in range(count):
            r, k = source[i % len(source)], i // len(source)
            choices = r["choices"][k % 4:] + r["choices"][:k % 4]
            f.write(json.dumps({"id": str(i), "prompt": f"Question {i + 1}. {r['prompt']}", "choices": choices,
                                "answer": (r["answer"] - k) % 4}) + "\n")


def _timed(evaluator: Choice, backend, tokenizer) -> tuple[float, dict]:
    """Seconds of one evaluation by `evaluator` on `backend` (its requests tokenized beforehand, as a run's first
    evaluation leaves them), and its rows."""
    evaluator.requests(tokenizer)
    t = time.perf_counter()
    result = evaluator.evaluate(EvalContext([], backend=backend, tokenizer=tokenizer))
    return time.perf_counter() - t, result.table


def choice_speed(size: ChoiceBenchSize, engine=None) -> dict:
    """Questions/s of the `choice` evaluator on `size.questions` questions through the HF backend and the in-loop
    vLLM engine (a run's own: `make_backend` for sft_smollm2 on `size.model`, or `engine` when given, a live one on
    the same model), the backends alternating over `size.rounds` rounds after a warm-up of 8 questions each; the
    two backends' answers and log-likelihoods compared; then one eval step of sft_smollm2's default evaluators on the
    engine, beside the `choice` evaluator's default set and the bench set on the same engine."""
    exp = apply_overrides(SftSmollm2, [f"model={size.model}", f"eval_limit={size.eval_prompts}",
                                       f"max_new_tokens={size.new_tokens}"])
    eval_sets, model_path = prepare_evaluation(exp, verbose=False)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path).eval()
    hf = HFBackend(tokenizer)  # the in-loop HF backend as a run makes it (make_backend with backend=hf)
    hf.sync_weights(model)
    t = time.perf_counter()
    vllm = engine if engine is not None else make_backend(exp, model_path, tokenizer)
    engine_s = time.perf_counter() - t
    vllm.sync_weights(model)
    backends = {"hf": hf, "vllm": vllm}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "questions.jsonl"
        write_questions(size.questions, path)
        evaluator, warm = Choice(data=str(path)), Choice(data=str(path), limit=8)
        times: dict[str, list[float]] = {name: [] for name in backends}
        rows: dict[str, dict] = {}
        for backend in backends.values():
            _timed(warm, backend, tokenizer)
        for _ in range(size.rounds):
            for name, backend in backends.items():
                seconds, rows[name] = _timed(evaluator, backend, tokenizer)
                times[name].append(seconds)
    gap = max(abs(a - b) for qa, qb in zip(rows["hf"]["loglik"], rows["vllm"]["loglik"], strict=True)
              for a, b in zip(qa, qb, strict=True))
    result = {"size": asdict(size), "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "questions": size.questions, "requests": sum(len(c) for c in rows["hf"]["choices"]),
              "engine_build_s": engine_s, "max_loglik_gap": gap,
              "same_answers": rows["hf"]["pred"] == rows["vllm"]["pred"],
              **{f"{name}_acc": statistics.mean(rows[name]["acc"]) for name in backends}}
    for name in backends:
        result[f"{name}_s_median"] = statistics.median(times[name])
        result[f"{name}_questions_per_s"] = size.questions / result[f"{name}_s_median"]
    result["vllm_over_hf"] = result["vllm_questions_per_s"] / result["hf_questions_per_s"]
    result.update(eval_share(exp, eval_sets, model, vllm, tokenizer, evaluator))
    if engine is None:
        vllm.close()
    return result


def eval_share(exp, eval_sets: list, model, engine, tokenizer, bench_set: Choice) -> dict:
    """One eval step of `exp`'s default evaluators on the engine after a first one (sync, generation, scoring,
    error bars: what a run logs as eval/time/total_s at each later eval step), then the `choice` evaluator with its
    default set (data/choice_eval.jsonl) and with the bench set on the same engine: each one's share of an evaluation
    that adds it."""
    suite = eval_suite(exp, eval_sets, exp.make_evaluators(), engine, tokenizer)
    suite.run(model, 0)  # a warm-up: a run's first eval step also loads the scorers (jieba's dictionary for ROUGE)
    report = suite.run(model, 0)
    rest = report.metrics["eval/time/total_s"]
    default = Choice()
    default_s, _ = _timed(default, engine, tokenizer)
    bench_s, _ = _timed(bench_set, engine, tokenizer)
    return {"eval_evaluators": ",".join(exp.evaluators), "eval_prompts": len(eval_sets[0].samples),
            "eval_s": rest, "eval_generate_s": report.metrics["eval/time/generate_s"],
            "default_choice_questions": len(default.questions), "default_choice_s": default_s,
            "default_choice_share": default_s / (default_s + rest), "bench_choice_s": bench_s,
            "bench_choice_share": bench_s / (bench_s + rest)}


def print_choice(r: dict) -> None:
    size = r["size"]
    print(f"[bench] choice on {size['model']} ({r['params_m']:.1f}M params), {r['questions']} questions x 4 choices "
          f"({r['requests']} log-likelihood requests), backends alternating, medians of {size['rounds']}: HF backend "
          f"{r['hf_questions_per_s']:.1f} questions/s ({r['hf_s_median']:.1f}s), vLLM engine "
          f"{r['vllm_questions_per_s']:.1f} questions/s ({r['vllm_s_median']:.1f}s) -> vLLM/HF "
          f"{r['vllm_over_hf']:.2f}x; same answers: {r['same_answers']} (acc {r['hf_acc']:.1f} vs {r['vllm_acc']:.1f}),"
          f" max log-likelihood gap {r['max_loglik_gap']:.1e}; engine build {r['engine_build_s']:.1f}s", flush=True)
    print(f"[bench] choice's share of an evaluation: sft_smollm2's default eval step ({r['eval_evaluators']} on "
          f"{r['eval_prompts']} prompts x {size['new_tokens']} new tokens, vLLM) {r['eval_s']:.1f}s (generation "
          f"{r['eval_generate_s']:.1f}s); + choice on its default {r['default_choice_questions']} questions "
          f"{r['default_choice_s']:.1f}s -> {100 * r['default_choice_share']:.0f}% of the evaluation; + choice on "
          f"{r['questions']} questions {r['bench_choice_s']:.1f}s -> {100 * r['bench_choice_share']:.0f}%",
          flush=True)


def run() -> dict:
    tiny = os.environ.get("BENCH_CHOICE_TINY") == "1"
    result = choice_speed(CHOICE_TINY if tiny else ChoiceBenchSize())
    print_choice(result)
    return {"choice": result}
