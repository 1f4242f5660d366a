"""Part `lora`: one in-loop evaluation of a rank-16 LoRA model, the adapter folded into the synced weights vs served
as a vLLM LoRA request, each engine in its own process (lora_child)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from harness.commands.bench.common import prompts
from harness.embedded.tiny_qwen2 import ensure_tiny_model
from harness.paths import REPO_ROOT


def lora_serving(model_dir: Path, texts: list[str]) -> dict:
    """One in-loop evaluation (sync + greedy generation of `texts`) per serving mode, each in a fresh process."""
    result = {"prompts": len(texts)}
    for mode, rank in (("merge", None), ("request", 16)):
        request = json.dumps({"model_dir": str(model_dir), "prompts": texts, "lora_rank": rank})
        out = subprocess.run([sys.executable, "-m", "harness.commands.bench.lora_child"], input=request,
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        result[f"{mode}_s"] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run() -> dict:
    lo = lora_serving(ensure_tiny_model(), prompts("eval.jsonl", 64))
    print(f"[bench] LoRA rank 16 on the embedded model, one evaluation (sync + {lo['prompts']} prompts x 48 "
          f"tokens): folded into the weights {lo['merge_s']:.3f}s vs served as a LoRA request "
          f"{lo['request_s']:.3f}s -> merge/request = {lo['merge_s'] / lo['request_s']:.2f}x", flush=True)
    return {"lora": lo}
