"""Part `judge`: judged samples/s with the concurrency limit vs one request at a time, against the same local vLLM
judge server."""

from __future__ import annotations

import json
import time

from evaluators.judge import Judge
from evaluators.judge_server import LocalJudgeServer
from harness.paths import DATA_DIR


def judge_speed(samples: int = 32) -> dict:
    rows = [json.loads(line) for line in (DATA_DIR / "eval.jsonl").read_text().splitlines()[:samples]]
    prompts, refs = [r["prompt"] for r in rows], [r["reference"] for r in rows]
    server = LocalJudgeServer()
    result = {"samples": samples}
    try:
        for label, concurrency in (("sequential", 1), ("concurrent", 8)):
            judge = Judge(base_url=server.base_url, pairwise=False, cache=False, max_concurrency=concurrency)
            start = time.perf_counter()
            metrics = judge.judge(prompts, refs, refs).metrics
            result[f"{label}_per_s"] = samples / (time.perf_counter() - start)
            result[f"{label}_parse_failures"] = metrics["parse_failures"]
            judge.close()
    finally:
        server.close()
    result["concurrency"] = 8
    return result


def run() -> dict:
    j = judge_speed()
    print(f"[bench] judge, {j['samples']} pointwise samples against the local vLLM judge: one at a time "
          f"{j['sequential_per_s']:.1f}/s, {j['concurrency']} concurrent {j['concurrent_per_s']:.1f}/s -> "
          f"{j['concurrent_per_s'] / j['sequential_per_s']:.2f}x", flush=True)
    return {"judge": j}
