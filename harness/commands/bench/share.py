"""Part `share`: the share of a default run's wall time spent in in-loop evaluation (a real run, in a subprocess)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile

from mlflow.tracking import MlflowClient

from harness.paths import REPO_ROOT


def eval_share(experiment: str = "simpo_qwen", overrides: list[str] | None = None) -> dict:
    """A default run of `experiment` (with `overrides`, field=value) in its own process and MLflow store; read its
    timings back."""
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        subprocess.run([sys.executable, "-m", "harness", "run", experiment, f"output_dir={tmp}/out",
                        *(overrides or [])],
                       cwd=REPO_ROOT, env=env, check=True, capture_output=True)
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        m = run.data.metrics
        evals = client.get_metric_history(run.info.run_id, "eval/time/total_s")
        return {"evaluations": len(evals), "eval_s": sum(x.value for x in evals), "wall_s": m["run/wall_s"],
                "eval_share": m["run/eval_share"], "train_runtime_s": m.get("train/train_runtime", float("nan")),
                "sync_s_mean": statistics.mean(x.value for x in client.get_metric_history(
                    run.info.run_id, "eval/time/sync_s")),
                "max_steps": int(run.data.params["max_steps"]), "eval_every": int(run.data.params["eval_every"])}


def run() -> dict:
    e = eval_share()
    print(f"[bench] simpo_qwen defaults (max_steps={e['max_steps']}, eval_every={e['eval_every']}): "
          f"{e['evaluations']} evaluations took {e['eval_s']:.1f}s of {e['wall_s']:.1f}s wall "
          f"-> eval share {100 * e['eval_share']:.1f}% (mean sync {e['sync_s_mean']:.3f}s)", flush=True)
    return {"eval_share": e}
