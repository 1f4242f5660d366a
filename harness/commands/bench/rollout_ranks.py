"""Part `rollout_ranks`: rollouts in a 2-process RL run, rank 0's one engine generating both ranks' prompts (the
harness's `sample_across_ranks`) vs each rank its own engine; each rank is a process of rollout_rank_child."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen2ForCausalLM

from harness.core.files import free_port
from harness.core.models import load_tokenizer
from harness.embedded.tiny_qwen2 import ensure_tiny_model
from harness.paths import REPO_ROOT


@dataclass(frozen=True)
class RankRolloutSize:
    """The `rollout_ranks` workload: GRPO-like rollouts (grpo_qwen's 4 samples per prompt at temperature 1) of
    `prompts_per_rank` data/rl.jsonl prompts on each of two ranks; each side is launched `rounds` times, alternating
    with the other, and times `repeats` rollout steps per launch after one warm-up step."""

    prompts_per_rank: int = 32
    new_tokens: int = 64
    samples: int = 4
    rounds: int = 2
    repeats: int = 3


# BENCH_RANKS_TINY=1: a quick end-to-end check of the part's machinery, not a measurement
RANK_ROLLOUT_TINY = RankRolloutSize(prompts_per_rank=4, new_tokens=8, samples=2, rounds=1, repeats=2)
RANK_SIDES = {"shared": "rank 0's engine for both ranks", "own": "each rank its own engine"}


def _launch_ranks(side: str, model_dir: Path, size: RankRolloutSize, out: Path) -> list[dict]:
    """Both ranks of one side started at the same moment; each rank's measurements (see rollout_rank_child)."""
    command = [sys.executable, "-m", "harness.commands.bench.rollout_rank_child", side, str(model_dir),
               json.dumps(asdict(size)), str(out)]
    base = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    if side == "own":
        # two engines generate at once: each gets half the cores, as one engine per device would. With the in-loop
        # default (threads = all cores) in both, their threads would oversubscribe the cores.
        base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))
    logs = [out.with_suffix(f".rank{rank}.log") for rank in (0, 1)]
    procs = []
    for rank, log in enumerate(logs):
        with log.open("w") as f:
            procs.append(subprocess.Popen(command, cwd=REPO_ROOT, stdout=f,
                                          stderr=subprocess.STDOUT,
                                          env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    # a rank that failed leaves the other blocked in a collective until gloo's 30-minute timeout: end it at once
    while True:
        codes = [proc.poll() for proc in procs]
        failed = next((rank for rank, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None or None not in codes:
            break
        time.sleep(0.5)
    if failed is not None:
        for proc in procs:
            proc.kill()
            proc.wait()
        # the other rank's output too: a rank that dies in a collective often only echoes the first one's failure
        tails = "\n".join(f"--- rank {rank}'s output ends:\n{log.read_text()[-3000:]}" for rank, log in enumerate(logs))
        raise RuntimeError(f"rollout_ranks: rank {failed} of side {side!r} exited with {codes[failed]}\n{tails}")
    return json.loads(out.read_text())


def rollout_ranks(size: RankRolloutSize) -> dict:
    """Rollouts in a 2-process RL run: rank 0's one engine generating both ranks' prompts in one batch (the harness's
    design, `sample_across_ranks`) vs each rank its own engine for its own half. Same prompts, seeds and
    float32 engine settings (VLLMBackend's, KV cache VLLM_CPU_KVCACHE_SPACE as it sets it) on both sides; the sides'
    launches alternate, and step times are medians over every timed step of every launch."""
    with tempfile.TemporaryDirectory() as tmp:
        # The embedded model's architecture and tokenizer with random weights: the trained weights end most
        # completions after a few tokens, random ones run to new_tokens, so both sides generate the full amount.
        tiny = ensure_tiny_model()
        torch.manual_seed(0)
        Qwen2ForCausalLM(AutoConfig.from_pretrained(tiny)).save_pretrained(tmp)
        load_tokenizer(str(tiny)).save_pretrained(tmp)
        launches = {side: [] for side in RANK_SIDES}
        for round_ in range(size.rounds):
            for side in RANK_SIDES:
                launches[side].append(_launch_ranks(side, Path(tmp), size, Path(tmp, f"{side}-{round_}.json")))
    return summarise_rank_rollouts(size, launches)


def summarise_rank_rollouts(size: RankRolloutSize, launches: dict[str, list[list[dict]]]) -> dict:
    """Per side, medians over every timed step of every launch (`launches[side]`: one [rank 0's, rank 1's]
    rollout_rank result per launch). A step's time is rank 0's: both ranks leave the step's barrier together."""
    result = {**asdict(size), "ranks": 2}
    for side, runs in launches.items():
        # one entry per timed step of every launch: (rank 0's, rank 1's)
        steps = [step for pair in runs for step in zip(pair[0]["steps"], pair[1]["steps"], strict=True)]
        engines = [rank for pair in runs for rank in pair if "engine_start_s" in rank]
        r = result[side] = {
            "step_s": statistics.median(s[0]["step_s"] for s in steps),
            "tok_s": statistics.median(sum(x["tokens"] for x in s) / s[0]["step_s"] for s in steps),
            "generate_s": statistics.median(max(x["generate_s"] for x in s) for s in steps),
            "engine_start_s": statistics.median(e["engine_start_s"] for e in engines),
            "sync_s": statistics.median(e["sync_s"] for e in engines),
            "engines": len(engines) // len(runs),
            "rss_gib": [statistics.median(pair[i]["rss_gib"] for pair in runs) for i in (0, 1)],
            "peak_rss_gib": [statistics.median(pair[i]["peak_rss_gib"] for pair in runs) for i in (0, 1)],
            "threads": runs[0][0]["threads"]}
        if side == "shared":  # the step beyond rank 0's sync + generate: gather, scatter, waiting
            r["comm_s"] = statistics.median(s[0]["step_s"] - s[0]["generate_s"] for s in steps)
            r["prompt_bytes"] = sum(x["prompt_bytes"] for x in runs[0])
            r["completion_bytes"] = sum(x["completion_bytes"] for x in runs[0])
    return result


def print_rollout_ranks(r: dict) -> None:
    cores = os.cpu_count()
    print(f"[bench] rollout_ranks, 2 ranks x {r['prompts_per_rank']} data/rl.jsonl prompts x {r['samples']} samples x "
          f"{r['new_tokens']} tokens (temperature 1), embedded model's architecture, float32, {r['rounds']} launch(es) "
          f"per side alternating, medians of {r['rounds'] * r['repeats']} steps:")
    for side, label in RANK_SIDES.items():
        s = r[side]
        comm = f", gather/scatter {s['comm_s']:.3f}s" if "comm_s" in s else ""
        print(f"[bench]   {label:<31} step {s['step_s']:.2f}s ({s['tok_s']:.0f} tok/s; sync + generate "
              f"{s['generate_s']:.2f}s{comm}); {s['engines']} engine(s), start {s['engine_start_s']:.1f}s, sync "
              f"{s['sync_s']:.3f}s; RSS rank 0 {s['rss_gib'][0]:.2f} GiB, rank 1 {s['rss_gib'][1]:.2f} GiB "
              f"(peak {s['peak_rss_gib'][0]:.2f}/{s['peak_rss_gib'][1]:.2f}); {s['threads']} threads per process",
              flush=True)
    shared, own = r["shared"], r["own"]
    ratio = own["step_s"] / shared["step_s"]
    memory = sum(own["rss_gib"]) - sum(shared["rss_gib"])
    print(f"[bench]   shared engine: {shared['prompt_bytes'] / 1024:.1f} KiB of prompts gathered, "
          f"{shared['completion_bytes'] / 1024:.1f} KiB of completions scattered per step; "
          f"own/shared step time = {ratio:.2f}x, own engines hold {memory:+.2f} GiB more", flush=True)
    if ratio >= 1:
        verdict = (f"rank 0 generating for all ranks: {ratio:.2f}x faster per step, with one engine start and one KV "
                   "cache instead of two")
    else:
        verdict = (f"each rank its own engine: {1 / ratio:.2f}x faster per step, at the price of a second engine's "
                   f"start ({own['engine_start_s']:.1f}s) and {memory:+.2f} GiB")
    print(f"[bench]   on this machine the numbers favour {verdict}. Here both designs draw on the same {cores} CPU "
          "cores, so two engines add no compute, only overlap; on GPUs with one engine per GPU (as TRL's vLLM "
          "colocate mode runs) each rank's engine has a device of its own and they generate in parallel, so the "
          "balance there can differ.", flush=True)


def run() -> dict:
    tiny = os.environ.get("BENCH_RANKS_TINY") == "1"
    result = rollout_ranks(RANK_ROLLOUT_TINY if tiny else RankRolloutSize())
    print_rollout_ranks(result)
    return {"rollout_ranks": result}
