"""Part `ddp`: sft_qwen trained in one process vs two DeepSpeed ranks (ZeRO-2, ZeRO-3) at the same global batch."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from mlflow.tracking import MlflowClient

from harness.paths import REPO_ROOT


def _run_timings(client: MlflowClient, run) -> dict:
    evals = client.get_metric_history(run.info.run_id, "eval/time/total_s")
    syncs = client.get_metric_history(run.info.run_id, "eval/time/sync_s")
    gathers = client.get_metric_history(run.info.run_id, "eval/time/gather_s") or syncs[:0]
    return {"train_s": run.data.metrics["train/train_runtime"] - sum(x.value for x in evals + gathers),
            "sync_s_mean": statistics.mean(x.value for x in syncs),
            "gather_s_mean": statistics.mean(x.value for x in gathers) if gathers else 0.0,
            "wall_s": run.data.metrics["run/wall_s"]}


def data_parallel(steps: int = 30) -> dict:
    """sft_qwen for `steps` at the same global batch of 8: one process vs two ranks under DeepSpeed ZeRO-2 and
    ZeRO-3 (4 per rank). Training time excludes the in-loop evaluations; sync is per evaluation (ZeRO-3: gather)."""
    setups = {"single": ["batch_size=8"], "zero2": ["batch_size=4", "--launch", "deepspeed", "deepspeed=zero2"],
              "zero3": ["batch_size=4", "--launch", "deepspeed", "deepspeed=zero3"]}
    result = {"steps": steps}
    for name, args in setups.items():
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"sqlite:///{tmp}/mlflow.db"
            subprocess.run([sys.executable, "-m", "harness", "run", "sft_qwen", f"max_steps={steps}", "eval_every=10",
                            "eval_limit=32", f"output_dir={tmp}/out", *args], cwd=REPO_ROOT, check=True,
                           capture_output=True, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
            client = MlflowClient(uri)
            (run,) = client.search_runs([client.get_experiment_by_name("sft_qwen").experiment_id])
            result[name] = _run_timings(client, run)
    return result


def run() -> dict:
    d = data_parallel()
    for name in ("single", "zero2", "zero3"):
        r = d[name]
        print(f"[bench] sft_qwen {d['steps']} steps, global batch 8, {name:<6}: training {r['train_s']:.1f}s "
              f"({r['train_s'] / d['single']['train_s']:.2f}x single), per eval: gather {r['gather_s_mean']:.3f}s "
              f"+ sync {r['sync_s_mean']:.3f}s, "
              f"wall {r['wall_s']:.1f}s", flush=True)
    return {"ddp": d}
