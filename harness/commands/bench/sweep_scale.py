"""Part `sweep_scale`: one PostgreSQL study driven by 1, 4, 16 and 64 simulated sweep workers (`sweep_scale_child`:
the harness's study code, trials that only sleep and report), then a fault run on the same cluster.

Each worker count gets its own study: the workers start and join it, then run trials together for a fixed window.
Measured: trials/min finished in the window; duplicate or missing trial numbers; claim conflicts (a trial that two
workers started) and trials whose end a worker saw otherwise than the database; PostgreSQL's connections and
sessions waiting on a lock, sampled every 0.25 s from pg_stat_activity, against max_connections; deadlocks and
rolled-back transactions from pg_stat_database; the workers' start time and memory.

The fault run (also tests/test_sweep_faults.py): four workers on one study with an MLflow store, three of them
SIGKILLed at seeded random moments (each replaced), PostgreSQL restarted once in the middle; it ends when the study
has its results, and counts what every trial and MLflow run ended as.

BENCH_SWEEP_WORKERS=4,16 runs other worker counts; BENCH_SWEEP_MAX_CONNECTIONS=100 sets the cluster's max_connections
(PostgreSQL's default; `make services` sets 300).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import optuna
import psycopg
from optuna.trial import TrialState

from harness.commands import services
from harness.commands.bench.environ import environ
from harness.commands.bench.sweep_scale_child import EXPERIMENT, OBJECTIVE
from harness.core.files import free_port
from harness.paths import REPO_ROOT
from harness.sweeps.storage import DRIVER_ATTR, PARENT_RUN_ATTR, fail_lost_trials, make_storage, open_study

WORKER_COUNTS = (1, 4, 16, 64)
WINDOW_S = 20.0
STEPS, STEP_S = 4, 0.25  # a trial: 4 reports 0.25 s apart, 1 s of sleep unless pruned
SAMPLE_S = 0.25
START_TIMEOUT_S = 240.0  # 64 workers importing Optuna on 2 busy cores
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


@contextlib.contextmanager
def postgres_cluster() -> Iterator[services.Services]:
    """A fresh cluster set up by `make services`' own code (initdb, SCRAM password, max_connections, Optuna's
    tables) in a temporary directory on a free port; no MLflow server, which nothing here logs to."""
    directory = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    directory.chmod(0o755)  # the cluster's user (postgres, when we are root) must enter it
    try:
        s = services._settings(directory, "127.0.0.1", free_port(), free_port())
        services._start_postgres(s)
        yield s
    finally:
        with contextlib.suppress(Exception):
            services.stop(directory, quiet=True)
        shutil.rmtree(directory, ignore_errors=True)


def restart_postgres(s: services.Services) -> float:
    """`pg_ctl stop -m fast`, then start, as `make services` does them; returns the seconds it took."""
    started = time.time()
    services.stop(s.dir, quiet=True)
    services._start_postgres(s)
    return time.time() - started


def _sql(s: services.Services, query: str, *args) -> list[tuple]:
    with psycopg.connect(host=s.client_host, port=s.pg_port, user=services.DB_USER, password=s.password,
                         dbname="optuna", autocommit=True, connect_timeout=10) as con:
        cursor = con.execute(query, args)
        return cursor.fetchall() if cursor.description else []  # ALTER SYSTEM returns no rows


class Sampler(threading.Thread):
    """pg_stat_activity every SAMPLE_S: the optuna database's connections and those waiting on a lock (the study
    row that trial creation locks, a trial's row); with `pids`, the workers' resident memory."""

    QUERY = ("SELECT wait_event_type IS NOT DISTINCT FROM 'Lock', q FROM (SELECT wait_event_type, "
             "regexp_replace(query, '\\s+', ' ', 'g') AS q FROM pg_stat_activity WHERE datname = 'optuna' "
             "AND pid <> pg_backend_pid()) a")

    def __init__(self, s: services.Services, pids: Callable[[], Iterable[int]] = lambda: ()):
        super().__init__(daemon=True)
        self.s, self.pids = s, pids
        self.connections: list[int] = []
        self.waiting: list[int] = []
        self.rss_mib: list[float] = []
        self.waiting_on: Counter = Counter()  # the statements of the sessions found waiting
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            with contextlib.suppress(psycopg.OperationalError):  # the server is down (the fault run's restart)
                sessions = _sql(self.s, self.QUERY)
                self.connections.append(len(sessions))
                self.waiting.append(sum(waits for waits, _ in sessions))
                self.waiting_on.update(f"{q[:40]} ... {q[-40:]}" for waits, q in sessions if waits)
            self.rss_mib.append(sum(_rss_kib(pid) for pid in self.pids()) / 1024)

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        return {"connections_peak": max(self.connections, default=0),
                "lock_waiting_peak": max(self.waiting, default=0),
                "lock_waiting_share": sum(w > 0 for w in self.waiting) / max(len(self.waiting), 1),
                "workers_rss_mib_peak": max(self.rss_mib, default=0.0),
                "waiting_on": self.waiting_on.most_common(1)[0][0] if self.waiting_on else None}


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError, StopIteration):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])
    return 0


def _db_counters(s: services.Services) -> dict:
    """pg_stat_database's counters, the CPU seconds of the server's ended backends (the postmaster's children once it
    reaped them: a worker's connections end with it), and the connections it refused over max_connections."""
    ((commits, rollbacks, deadlocks),) = _sql(s, "SELECT xact_commit, xact_rollback, deadlocks FROM "
                                                 "pg_stat_database WHERE datname = 'optuna'")
    postmaster = (s.dir / "pg" / "postmaster.pid").read_text().split()[0]
    fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = sum(int(f) for f in fields[13:17]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime
    refused = (s.dir / "postgres.log").read_text(errors="replace").count("too many clients already")
    return {"commits": commits, "rollbacks": rollbacks, "deadlocks": deadlocks, "cpu_s": cpu_s, "refused": refused}


class Workers:
    """Simulated workers of one study, each a `sweep_scale_child` process with its spec, events and log in
    `directory`; they start their trials together once `release` is called."""

    def __init__(self, s: services.Services, directory: Path, study: str, env: dict | None = None, **spec):
        self.directory = directory
        self.directory.mkdir(parents=True)
        self.go = directory / "go"
        self.spec = {"storage": s.optuna_url, "study": study, "go": str(self.go), "steps": STEPS,
                     "step_s": STEP_S, "heartbeat_s": 30, **spec}
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def start(self) -> subprocess.Popen:
        n = len(self.procs)
        spec_path = self.directory / f"worker-{n}.json"
        spec_path.write_text(json.dumps({**self.spec, "events": str(self.directory / f"events-{n}.jsonl")}))
        with open(self.directory / f"worker-{n}.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "harness.commands.bench.sweep_scale_child",
                                     str(spec_path)], cwd=REPO_ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def reconnect_waits(self) -> int:
        """Storage calls that found the database unreachable and waited for it (harness.sweeps.storage says so)."""
        return sum(log.read_text(errors="replace").count("database is unreachable")
                   for log in self.directory.glob("worker-*.log"))

    def events(self) -> list[dict]:
        return [json.loads(line) for path in sorted(self.directory.glob("events-*.jsonl"))
                for line in path.read_text().splitlines()]

    def wait_ready(self, count: int, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.time() + timeout_s
        while sum(e["event"] == "ready" for e in self.events()) < count:
            self.check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"{count} workers did not start within {timeout_s:.0f}s")
            time.sleep(0.2)

    def check_alive(self, killed: set[int] = frozenset()) -> None:
        failed = [p for p in self.procs if p.pid not in killed and p.poll() not in (None, 0)]
        if failed:
            n = self.procs.index(failed[0])
            raise RuntimeError(f"worker {n} exited with {failed[0].returncode}:\n"
                               f"{(self.directory / f'worker-{n}.log').read_text()[-3000:]}")

    def release(self) -> float:
        self.go.touch()
        return time.time()

    def wait(self, timeout_s: float, killed: set[int] = frozenset()) -> None:
        deadline = time.time() + timeout_s
        while any(p.poll() is None for p in self.procs):
            self.check_alive(killed)
            if time.time() > deadline:
                raise RuntimeError(f"workers still running after {timeout_s:.0f}s")
            time.sleep(0.2)
        self.check_alive(killed)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def audit(trials: list[optuna.trial.FrozenTrial], events: list[dict], killed: set[int] = frozenset()) -> dict:
    """What the database holds against what the workers ran: trial numbers duplicated or missing, trials two
    workers started (claim conflicts), trials no worker started, ends a worker saw otherwise than the database. A
    `killed` worker's last end does not count: it may have died before telling Optuna, and its trial ended FAIL."""
    numbers = [t.number for t in trials]
    starts = Counter(e["id"] for e in events if e["event"] == "start")
    ends = {e["id"]: e["state"] for e in events if e["event"] == "end" and e["pid"] not in killed}
    states = {t._trial_id: t.state.name for t in trials}
    return {"trials": len(trials), "states": dict(Counter(states.values())),
            "duplicate_numbers": len(numbers) - len(set(numbers)),
            "missing_numbers": len(set(range(max(numbers, default=-1) + 1)) - set(numbers)),
            "claim_conflicts": sum(n > 1 for n in starts.values()),
            "unstarted": sum(i not in starts for i in states),
            "lost": sum(i not in states for i in starts),
            "end_mismatches": sum(states.get(i) != state for i, state in ends.items())}


def scale_run(s: services.Services, directory: Path, workers: int, window_s: float = WINDOW_S) -> dict:
    """`workers` workers on a new study for `window_s` seconds of trials (no new trial starts after it)."""
    study_name = f"scale{workers}"
    storage = make_storage(s.optuna_url)
    study, _ = open_study(study_name, storage, None, None, EXPERIMENT, OBJECTIVE, "minimize")
    storage.engine.dispose()  # its connection closed, so that the samples count the workers' only
    pool = Workers(s, directory / study_name, study_name, timeout_s=window_s)
    started = time.time()
    for _ in range(workers):
        pool.start()
    sampler = Sampler(s, lambda: [p.pid for p in pool.procs if p.poll() is None])
    sampler.start()
    try:
        pool.wait_ready(workers)
        startup_s = time.time() - started
        before = _db_counters(s)
        go = pool.release()
        pool.wait(window_s + 120)
        drain_s = time.time() - go - window_s
    finally:
        pool.stop()
        figures = sampler.stop()
    time.sleep(1.0)  # pg_stat_database counts what backends report at most once a second
    after = _db_counters(s)
    trials = study.get_trials(deepcopy=False)
    storage.engine.dispose()
    events = pool.events()
    in_window = [e for e in events if e["event"] == "end" and e["t"] <= go + window_s]
    worker_cpu_s = sum(e["cpu_s"] for e in events if e["event"] == "done") - sum(
        e["cpu_s"] for e in events if e["event"] == "ready")
    slept_s = sum(e["slept_s"] for e in in_window) / max(len(in_window), 1)
    finished = sum(t.state.name in FINISHED for t in trials)
    (max_connections,) = _sql(s, "SHOW max_connections")[0]
    return {"workers": workers, "startup_s": startup_s, "window_s": window_s, "drain_s": drain_s,
            "trials_per_min": len(in_window) / window_s * 60, "finished": finished, "slept_s_per_trial": slept_s,
            # what a trial took beyond its sleep, each worker's time shared out over the trials it ran in the window
            "overhead_s_per_trial": workers * window_s / max(len(in_window), 1) - slept_s,
            "commits_per_trial": (after["commits"] - before["commits"]) / max(finished, 1),
            "worker_cpu_s_per_trial": worker_cpu_s / max(finished, 1),
            "postgres_cpu_s_per_trial": (after["cpu_s"] - before["cpu_s"]) / max(finished, 1),
            "rollbacks": after["rollbacks"] - before["rollbacks"],
            "deadlocks": after["deadlocks"] - before["deadlocks"],
            "refused_connections": after["refused"] - before["refused"], "reconnect_waits": pool.reconnect_waits(),
            "max_connections": int(max_connections), **figures, **audit(trials, events)}


def _results(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def fault_run(s: services.Services, directory: Path, seed: int = 0, workers: int = 4, target: int = 30,
              kills: int = 3, heartbeat_s: int = 3, timeout_s: float = 240.0) -> dict:
    """`workers` workers until the study has `target` results (`--total-trials`), with an MLflow store (SQLite in
    `directory`). At `kills` random result counts (seeded) below half the target a random worker is SIGKILLed at a
    random moment and a new one started; at half the target PostgreSQL restarts. After the workers, what a kill
    left RUNNING is failed as the next worker would (`fail_lost_trials`), waiting the heartbeat's grace at most.
    Returns the audit, the MLflow runs' statuses, the kills and the restart's downtime."""
    from mlflow.tracking import MlflowClient

    from harness.training.tracking.runs import mlflow_run

    rng = random.Random(seed)
    study_name = f"faults{seed}"
    tracking = f"sqlite:///{directory / 'mlflow.db'}"
    # kills below half the target and the restart at half, each within a step of its count: no worker can have
    # reached the target by then (each result takes a step's sleep at least)
    schedule = sorted(rng.sample(range(2, target // 2), kills))
    restart_at = target // 2
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONUNBUFFERED": "1"}
    pool = Workers(s, directory / study_name, study_name, env=env, total_trials=target, heartbeat_s=heartbeat_s,
                   mlflow=True)
    killed: dict[int, int] = {}  # pid -> the result count at which it was killed
    downtime_s = None
    started = time.time()
    with environ(MLFLOW_TRACKING_URI=tracking):
        storage = make_storage(s.optuna_url, heartbeat_s)  # the next driver's, for what the workers left
        study, _ = open_study(study_name, storage, None, None, EXPERIMENT, OBJECTIVE, "minimize")
        with mlflow_run(EXPERIMENT, {}, {"optuna.study": study_name, "sweep.role": "parent"},
                        run_name=f"sweep-{study_name}") as parent:
            study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
            try:
                for _ in range(workers):
                    pool.start()
                pool.wait_ready(workers)
                pool.release()
                kill_at = None  # when the next kill is due
                while any(p.poll() is None for p in pool.procs):
                    pool.check_alive(set(killed))
                    if time.time() - started > timeout_s:
                        raise RuntimeError(f"the fault run did not end within {timeout_s:.0f}s")
                    done = _results(study)
                    if downtime_s is None and done >= restart_at:
                        downtime_s = restart_postgres(s)
                    elif kill_at is not None and time.time() >= kill_at:
                        victim = rng.choice([p for p in pool.procs if p.poll() is None])
                        victim.send_signal(signal.SIGKILL)
                        victim.wait()
                        killed[victim.pid] = done
                        pool.start()
                        kill_at = None
                    elif kill_at is None and schedule and done >= schedule[0]:
                        schedule.pop(0)
                        kill_at = time.time() + rng.uniform(0, STEP_S)  # somewhere in the victim's trial
                    time.sleep(0.05)
                pool.check_alive(set(killed))
            finally:
                pool.stop()
            deadline = time.time() + heartbeat_s * 4 + 5
            while study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
                fail_lost_trials(study)
                if time.time() > deadline:
                    break
                time.sleep(0.5)
        trials = study.get_trials(deepcopy=False)
        storage.engine.dispose()
        client = MlflowClient(tracking)
        runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    trial_runs = Counter(r.data.tags.get("optuna.trial.number") for r in runs
                         if r.data.tags.get("sweep.role") == "trial")
    fail_drivers = [t.user_attrs.get(DRIVER_ATTR) for t in trials if t.state == TrialState.FAIL]
    return {"seed": seed, "workers": workers, "target": target, "kills": len(killed),
            "kill_points": sorted(killed.values()), "restarts": int(downtime_s is not None), "downtime_s": downtime_s,
            "workers_started": len(pool.procs), "survivors_ok": sum(p.returncode == 0 for p in pool.procs),
            "reconnect_waits": pool.reconnect_waits(),
            "wall_s": time.time() - started, **audit(trials, pool.events(), set(killed)),
            "fails_by_killed_workers": sum(d is not None and d["pid"] in killed for d in fail_drivers),
            "mlflow_runs": dict(Counter(r.info.status for r in runs)),
            "runs_per_trial_max": max(trial_runs.values(), default=0),
            "finished_trials_without_run": sum(str(t.number) not in trial_runs for t in trials
                                               if t.state in (TrialState.COMPLETE, TrialState.PRUNED))}


def run() -> dict:
    counts = [int(n) for n in os.environ.get("BENCH_SWEEP_WORKERS", ",".join(map(str, WORKER_COUNTS))).split(",")]
    result: dict = {"steps": STEPS, "step_s": STEP_S, "window_s": WINDOW_S, "runs": []}
    directory = Path(tempfile.mkdtemp(prefix="bench-sweep-scale-"))
    try:
        with postgres_cluster() as s:
            limit = os.environ.get("BENCH_SWEEP_MAX_CONNECTIONS")
            if limit:  # e.g. PostgreSQL's default, 100, where `make services` sets 300
                _sql(s, f"ALTER SYSTEM SET max_connections = {int(limit)}")
                restart_postgres(s)
            for workers in counts:
                r = scale_run(s, directory, workers)
                result["runs"].append(r)
                print(f"[bench] sweep_scale: {workers:2d} workers: {r['trials_per_min']:5.0f} trials/min, "
                      f"{r['overhead_s_per_trial']:.2f}s per trial beyond its {r['slept_s_per_trial']:.2f}s of sleep; "
                      f"{r['finished']} trials {r['states']}; duplicates {r['duplicate_numbers']}, missing "
                      f"{r['missing_numbers']}, claim conflicts {r['claim_conflicts']}, unstarted {r['unstarted']}, "
                      f"end mismatches {r['end_mismatches']}; connections peak {r['connections_peak']}/"
                      f"{r['max_connections']} ({r['connections_peak'] / workers:.1f} per worker), "
                      f"{r['refused_connections']} refused, {r['reconnect_waits']} calls waited to reconnect; lock "
                      f"waits peak "
                      f"{r['lock_waiting_peak']} ({r['lock_waiting_share']:.0%} of samples), deadlocks "
                      f"{r['deadlocks']}, {r['rollbacks'] / max(r['finished'], 1):.1f} rollbacks and "
                      f"{r['commits_per_trial']:.0f} commits per trial; CPU per trial: workers "
                      f"{r['worker_cpu_s_per_trial']:.2f}s, PostgreSQL {r['postgres_cpu_s_per_trial']:.2f}s; start "
                      f"{r['startup_s']:.1f}s, workers' memory {r['workers_rss_mib_peak']:.0f} MiB, drain "
                      f"{r['drain_s']:.1f}s; most waiting: {r['waiting_on']}", flush=True)
            f = fault_run(s, directory)
            result["faults"] = f
            print(f"[bench] sweep_scale: fault run, {f['workers']} workers, target {f['target']} results, "
                  f"{f['kills']} SIGKILLs (at {f['kill_points']} results), {f['restarts']} PostgreSQL restart "
                  f"({f['downtime_s']:.1f}s down): {f['trials']} trials {f['states']}; duplicates "
                  f"{f['duplicate_numbers']}, missing {f['missing_numbers']}, claim conflicts "
                  f"{f['claim_conflicts']}, end mismatches {f['end_mismatches']}, FAIL by killed workers "
                  f"{f['fails_by_killed_workers']}; workers started {f['workers_started']}, exited 0 "
                  f"{f['survivors_ok']}, {f['reconnect_waits']} calls waited to reconnect; MLflow runs "
                  f"{f['mlflow_runs']}; {f['wall_s']:.0f}s", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"sweep_scale": result}
