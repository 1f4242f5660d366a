"""Part `services`: the team set-up (`make services`), started in a temporary directory: one in-loop evaluation's
logging into the SQLite file vs through the MLflow tracking server, then trials/hour of a sweep on PostgreSQL with
one worker and with two."""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.commands import services
from harness.commands.bench.environ import environ
from harness.commands.bench.sweep import SWEEP_ARGS
from harness.core.files import free_port
from harness.paths import REPO_ROOT
from harness.training.tracking.runs import mlflow_run


def services_speed(evaluations: int = 20, trials: int = 4) -> dict:
    """The team set-up (`make services`), started in a temporary directory: what one in-loop evaluation's logging
    costs (40 metrics and a 64-row per-sample table, as the runner logs them) in the embedded SQLite store vs
    through the MLflow tracking server; then trials/hour of the same sweep on PostgreSQL with one worker and with
    two (`trials` in all, each worker an unseeded driver like `make sweep-worker`)."""
    rows = range(64)
    table = {"id": [f"s{i}" for i in rows], "prompt": [f"What is the capital of country number {i}?" for i in rows],
             "prediction": ["An answer of about ten words, as the embedded model writes them." for _ in rows],
             "bleu/bleu": [float(i) for i in rows], "rouge/rougeL": [float(i) / 2 for i in rows]}
    metrics = {f"eval/evaluator{i // 4}/metric{i % 4}": float(i) for i in range(40)}
    result: dict = {"evaluations": evaluations, "trials": trials, "args": SWEEP_ARGS}
    directory = Path(tempfile.mkdtemp(prefix="bench-services-"))
    directory.chmod(0o755)  # the cluster's user (postgres, when we are root) must enter it
    try:
        s = services.start(directory / "services", pg_port=free_port(), mlflow_port=free_port(), quiet=True)
        server = s.mlflow_env()  # as its admin, from the environment as any client
        for store, env in (("sqlite", {"MLFLOW_TRACKING_URI": f"sqlite:///{directory}/mlflow.db"}), ("server", server)):
            with environ(**env), mlflow_run("bench_logging", {}, {}) as tracker:
                times = []
                for step in range(evaluations):
                    start = time.perf_counter()
                    tracker.log_metrics(metrics, step)
                    tracker.log_table(table, f"eval_samples/step_{step:06d}.json")
                    times.append(time.perf_counter() - start)
            result[f"log_{store}_s_median"] = statistics.median(times)
        env = {**os.environ, **server, "OPTUNA_STORAGE": s.optuna_url}  # not on the workers' command lines
        for workers in (1, 2):
            start = time.perf_counter()
            procs = [subprocess.Popen([sys.executable, "-m", "harness", "sweep", "simpo_qwen", *SWEEP_ARGS,
                                       f"output_dir={directory}/out", "--trials", str(trials // workers),
                                       "--study", f"workers{workers}", "--pruner", "none"], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.DEVNULL)
                     for _ in range(workers)]
            if any(p.wait() != 0 for p in procs):
                raise RuntimeError(f"a sweep worker failed ({workers} workers)")
            wall = time.perf_counter() - start
            result[f"workers_{workers}"] = {"wall_s": wall, "trials_per_hour": trials / wall * 3600}
    finally:
        with contextlib.suppress(Exception):
            services.stop(directory / "services", quiet=True)
        shutil.rmtree(directory, ignore_errors=True)
    return result


def run() -> dict:
    sv = services_speed()
    print(f"[bench] services: one evaluation's logging (40 metrics + a 64-row table), median of "
          f"{sv['evaluations']}: SQLite file {sv['log_sqlite_s_median']:.3f}s vs MLflow server "
          f"{sv['log_server_s_median']:.3f}s", flush=True)
    for workers in (1, 2):
        r = sv[f"workers_{workers}"]
        print(f"[bench] services: simpo_qwen {' '.join(sv['args'])}, {sv['trials']} trials on PostgreSQL, "
              f"{workers} worker(s): {r['wall_s']:.0f}s wall -> {r['trials_per_hour']:.0f} trials/hour", flush=True)
    return {"services": sv}
