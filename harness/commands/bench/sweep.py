"""Part `sweep`: the same seeded simpo_qwen sweep without pruning, with the median pruner and with Hyperband:
training steps spent and best objective. The seed gives every sweep the same sampled values (Optuna's TPE samples
at random for its first 10 trials), so the comparison differs only in what pruning stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from harness.paths import REPO_ROOT

SWEEP_ARGS = ["max_steps=40", "eval_every=5", "eval_limit=32", "select_metric=eval/perplexity/perplexity",
              "select_mode=min"]


def sweep_pruning(trials: int = 10) -> dict:
    """The same seeded simpo_qwen sweep without pruning, with the median pruner and with Hyperband."""
    result = {"trials": trials, "args": SWEEP_ARGS}
    for pruner in ("none", "median", "hyperband"):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "harness", "sweep", "simpo_qwen", *SWEEP_ARGS,
                                  f"output_dir={tmp}/out", "--trials", str(trials), "--seed", "0",
                                  "--pruner", pruner, "--storage", f"sqlite:///{tmp}/optuna.db"],
                                 cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True)
            summary = json.loads(out.stdout.strip().splitlines()[-1])
            result[pruner] = {"steps": summary["steps_trained"], "best_value": summary["best_value"],
                              "trials": summary["trials"], "wall_s": time.perf_counter() - start}
    return result


def run() -> dict:
    sw = sweep_pruning()
    base = sw["none"]
    print(f"[bench] sweep, simpo_qwen {' '.join(sw['args'])}, {sw['trials']} trials, seed 0:")
    for pruner in ("none", "median", "hyperband"):
        r = sw[pruner]
        saved = 100 * (1 - r["steps"] / base["steps"])
        print(f"[bench]   pruner {pruner:<9} {r['steps']:4d} training steps ({saved:3.0f}% fewer), "
              f"best perplexity {r['best_value']:.3f} (vs {base['best_value']:.3f}), trials {r['trials']}, "
              f"{r['wall_s']:.0f}s wall", flush=True)
    return {"sweep": sw}
