"""The MLflow SQLite store under concurrency and after crashes (tracking/store.py): fresh stores opened by several
processes at once, stores an interrupted schema upgrade left half-done, and where a SQLite store's artifacts go."""

import getpass
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from harness.paths import REPO_ROOT

pytestmark = pytest.mark.slow  # each test creates a real MLflow store (seconds); one runs two processes

# Opens a run on a fresh store per round, both workers released at the same instant by a file barrier.
WORKER = r"""
import os, sys, time
from pathlib import Path
from harness.training.tracking.runs import mlflow_run
tmp, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(rounds):
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / f'round{i}' / 'mlflow.db'}"
    (tmp / f"ready-{i}-{me}").touch()
    deadline = time.monotonic() + 30
    while len(list(tmp.glob(f"ready-{i}-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.002)
    with mlflow_run("race", {"worker": me}, {"round": str(i)}, run_name=f"{me}-{i}") as tracker:
        tracker.log_metrics({"m": float(i)}, step=0)
"""


def test_case1_two_runs_on_a_fresh_sqlite_store(tmp_path):
    """Two processes open runs on the same fresh store at once, three times over (a fresh store per round): MLflow
    migrates the schema of every fresh store, and unserialised, one or both processes died and the store could
    stay broken. Both must succeed each time, and every store must end readable with both runs FINISHED."""
    rounds = 3
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    logs = [tmp_path / f"{name}.log" for name in ("a", "b")]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), log.stem, str(rounds)], cwd=tmp_path,
                                # an account for a team server in the environment is not who ran a local run
                                env={**env, "PYTHONPATH": str(REPO_ROOT), "MLFLOW_TRACKING_USERNAME": "teammate"},
                                stdout=log.open("w"),
                                stderr=subprocess.STDOUT) for log in logs]
    deadline = time.monotonic() + 120
    try:  # the first worker to fail fails the test at once (its partner would wait for it at the barrier)
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            for w, log in zip(workers, logs, strict=True):
                assert w.poll() in (None, 0), log.read_text()[-3000:]
            time.sleep(0.1)
        for w, log in zip(workers, logs, strict=True):
            assert w.poll() == 0, log.read_text()[-3000:]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for i in range(rounds):
        client = MlflowClient(f"sqlite:///{tmp_path / f'round{i}' / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
        assert sorted(r.info.run_name for r in runs) == [f"a-{i}", f"b-{i}"]
        own = [{k: v for k, v in r.data.metrics.items() if not k.startswith("system/")} for r in runs]
        assert all(r.info.status == "FINISHED" for r in runs) and own == [{"m": float(i)}] * 2, own
        assert {r.info.user_id for r in runs} == {getpass.getuser()}  # a local store: the system user
    assert not list(tmp_path.rglob("_alembic_tmp*"))


@pytest.fixture
def fresh_store(tmp_path_factory):
    """A store file MLflow created at its current schema (made once, copied by each use)."""
    path = tmp_path_factory.getbasetemp() / "template-store" / "mlflow.db"
    if not path.exists():
        MlflowClient(f"sqlite:///{path}")
    return path


def _sql(db, *statements):
    con = sqlite3.connect(db)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()


def _store_copy(fresh_store, directory, *statements):
    directory.mkdir()
    db = directory / "mlflow.db"
    shutil.copy(fresh_store, db)
    _sql(db, *statements)
    return db


def test_case1_a_half_migrated_store_is_reported_with_the_way_out(tmp_path, monkeypatch, fresh_store):
    from harness.training.tracking.runs import mlflow_run
    from harness.training.tracking.store import TrackingStoreError

    def open_run():
        with mlflow_run("half", {}, {}) as tracker:
            tracker.log_metrics({"m": 1.0}, step=0)

    # what an upgrade interrupted in the middle of a table rebuild leaves (or a concurrent one that failed)
    db = _store_copy(fresh_store, tmp_path / "tmp-table", "CREATE TABLE _alembic_tmp_metrics (key VARCHAR(250))")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(TrackingStoreError) as error:
        open_run()
    message = str(error.value)
    assert str(db) in message and "half-migrated" in message and "_alembic_tmp_metrics" in message
    assert "DROP TABLE _alembic_tmp_metrics;" in message and f"mlflow db upgrade sqlite:///{db}" in message
    assert "back it up" in message.lower() and "holds 0 run(s)" in message
    _sql(db, "DROP TABLE _alembic_tmp_metrics")  # the way out the message names
    open_run()  # now the store opens

    behind = _store_copy(fresh_store, tmp_path / "behind", "UPDATE alembic_version SET version_num = '451aebb31d03'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{behind}")
    with pytest.raises(TrackingStoreError, match=r"schema revision 451aebb31d03, behind MLflow [0-9.]+'s \w+") as e:
        open_run()
    assert str(behind) in str(e.value) and f"mlflow db upgrade sqlite:///{behind}" in str(e.value)

    unversioned = _store_copy(fresh_store, tmp_path / "unversioned", "DROP TABLE alembic_version")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{unversioned}")
    with pytest.raises(TrackingStoreError, match="no schema version: its creation was interrupted"):
        open_run()

    newer = _store_copy(fresh_store, tmp_path / "newer", "UPDATE alembic_version SET version_num = 'ffffffffffff'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{newer}")
    with pytest.raises(TrackingStoreError, match="a newer MLflow wrote it"):
        open_run()


def test_case10_sqlite_store_keeps_artifacts_beside_its_file(tmp_path, monkeypatch):
    from harness.training.tracking.runs import mlflow_run
    from harness.training.tracking.store import sqlite_path

    store, elsewhere, source = tmp_path / "store", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    source.mkdir()
    (source / "model-card.md").write_text("card")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    with mlflow_run("artifacts-here", {}, {}) as tracker:
        tracker.log_text("hello", "notes/hello.txt")
        tracker.log_artifact(str(source / "model-card.md"))
    assert [p.read_text() for p in (store / "mlruns").rglob("hello.txt")] == ["hello"]
    assert len(list((store / "mlruns").rglob("model-card.md"))) == 1
    assert os.listdir(elsewhere) == []  # MLflow's default would have been ./mlruns here
    # the default store (mlflow.db at the repository root) keeps the repository's mlruns/, as before
    assert sqlite_path(f"sqlite:///{REPO_ROOT / 'mlflow.db'}").parent / "mlruns" == REPO_ROOT / "mlruns"
    assert sqlite_path("sqlite:///rel/x.db") == elsewhere / "rel" / "x.db"  # as SQLite opens it
    assert sqlite_path("http://127.0.0.1:5000") is None and sqlite_path("sqlite://") is None


def test_a_run_shorter_than_a_sample_has_system_metrics_and_its_columns_join_the_view(tmp_path, monkeypatch):
    import json

    from harness.training.tracking.runs import mlflow_run
    from harness.training.tracking.view import VIEW_TAG

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow_run("short", {}, {}, shown=(["eval/rouge/rougeL"], ["learning_rate", "seed"])) as first:
        pass  # well under the monitor's 5 s: its one sample is logged at the end
    with mlflow_run("short", {}, {}, shown=(["eval/rouge/rougeL"], ["beta", "seed"])):
        pass
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    metrics = client.get_run(first.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
    view = json.loads(client.get_experiment(first.experiment_id).tags[VIEW_TAG])
    assert view["selectedColumns"] == ["attributes.`Dataset`", "metrics.`eval/rouge/rougeL`", "params.`learning_rate`",
                                       "params.`seed`", "params.`beta`"]  # the second run's beta added, nothing twice
    assert first.experiment_url().endswith(f"/#/experiments/{first.experiment_id}/runs?"
                                           "workflowType=machine_learning&viewStateShareKey=harness")


def test_case1_first_opening_of_a_store_waits_for_its_lock(tmp_path, monkeypatch):
    """While another process holds `<db>.lock` (here: another open file, which flock treats alike), opening a run
    does not touch the store; it goes on once the lock is released."""
    import fcntl
    import threading

    from harness.training.tracking.runs import mlflow_run

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    lock = open(tmp_path / "mlflow.db.lock", "a")  # noqa: SIM115 - released by the thread below
    fcntl.flock(lock, fcntl.LOCK_EX)
    seen = []

    def release():
        time.sleep(3.0)
        seen.append(db.exists())
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()

    threading.Thread(target=release).start()
    with mlflow_run("locked", {}, {}) as tracker:
        tracker.log_metrics({"m": 1.0}, step=0)
    assert seen == [False]  # not even created while the lock was held
