"""One rank of a part `rollout_ranks` launch (`python -m harness.commands.bench.rollout_rank_child SIDE MODEL_DIR
SIZE_JSON OUT`, with RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment): rank 0 writes both ranks'
measurements to OUT."""

from __future__ import annotations

import json
import pickle
import sys
import time
from pathlib import Path

import torch

from harness.commands.bench.common import median_s
from harness.core.generation import GenParams
from harness.core.models import load_model, load_tokenizer
from harness.core.prompts import render_prompt
from harness.core.ranks import rank as this_rank
from harness.engines.vllm_engine import VLLMBackend
from harness.paths import DATA_DIR
from harness.rl.rollouts import sample_across_ranks


def _memory_gib() -> dict[str, float]:
    """This process's resident memory now and its peak, from /proc/self/status (kB)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_gib": int(status["VmRSS"].split()[0]) / 2**20, "peak_rss_gib": int(status["VmHWM"].split()[0]) / 2**20}


def rollout_rank(side: str, model_dir: str, size: dict, out: str) -> None:
    """One of the two ranks of a `rollout_ranks` launch (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment).
    `shared`: rank 0 builds the in-loop engine and every step is the harness's own `sample_across_ranks` (gather the
    prompts, sync, generate both ranks' prompts in one batch, scatter). `own`: each rank builds an engine and syncs
    and generates its own prompts. As in a training run, the engine is built before the ranks' gloo group."""
    rank, k = this_rank(), size["prompts_per_rank"]
    tokenizer = load_tokenizer(model_dir)
    rows = (DATA_DIR / "rl.jsonl").read_text().splitlines()[rank * k:(rank + 1) * k]
    prompt_ids = [render_prompt(tokenizer, json.loads(row)["prompt"]) for row in rows]
    model = load_model(model_dir).eval()
    backend, result = None, {"rank": rank}
    if side == "own" or rank == 0:
        start = time.perf_counter()
        backend = VLLMBackend(model_dir, max_model_len=256, dtype="float32")
        result["engine_start_s"] = time.perf_counter() - start
        result["sync_s"] = median_s(lambda: backend.sync_weights(model), 3)
    result.update(_memory_gib())  # with its engine, before any rollout
    torch.distributed.init_process_group("gloo")

    def rollout(seed: int) -> tuple[list, float]:
        """This rank's completions and the seconds rank 0 (shared) or this rank (own) spent syncing and generating."""
        params = GenParams(max_new_tokens=size["new_tokens"], temperature=1.0, n=size["samples"], seed=seed,
                           sample_logprobs=True)
        if side == "shared":
            completions, stats = sample_across_ranks(backend, model, prompt_ids, params)
            return completions, stats.sync_s + stats.generate_s
        start = time.perf_counter()
        backend.sync_weights(model)
        return backend.generate(prompt_ids, params), time.perf_counter() - start

    rollout(size["repeats"])  # warm-up, with a seed no timed step uses
    result["steps"] = []
    for seed in range(size["repeats"]):
        torch.distributed.barrier()  # both ranks start the step together; it ends when both have their completions
        start = time.perf_counter()
        completions, generate_s = rollout(seed)
        torch.distributed.barrier()
        result["steps"].append({"step_s": time.perf_counter() - start, "generate_s": generate_s,
                                "tokens": sum(c.num_tokens for c in completions)})
    # what gather_object and scatter_object_list pickle for this rank in the shared design
    result["prompt_bytes"] = len(pickle.dumps(prompt_ids))
    result["completion_bytes"] = len(pickle.dumps(completions))
    result["peak_rss_gib"] = _memory_gib()["peak_rss_gib"]
    result["threads"] = torch.get_num_threads()
    gathered = [None, None] if rank == 0 else None
    torch.distributed.gather_object(result, gathered, dst=0)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    torch.distributed.destroy_process_group()
    if backend is not None:
        backend.close()


if __name__ == "__main__":
    rollout_rank(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
