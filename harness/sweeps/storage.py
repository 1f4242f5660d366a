"""What every sweep worker shares through the study's database: the storage (heartbeats, reconnection), opening
the study, the pruner, the total-trials stop, and failing the trials whose driver is gone.

It imports Optuna and SQLAlchemy only (MLflow once a trial's run must be closed), so that a worker which trains
nothing, as the `sweep_scale` bench part runs sixty-four of, starts in under a second on the same code as
`harness sweep` (harness.sweeps.study), whose driver imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._rdb import models
from optuna.trial import TrialState

from harness.core.errors import ConfigError

PRUNERS = ("median", "hyperband", "none")
# Heartbeats and PartialFixedSampler are marked experimental by Optuna; their warnings would repeat every trial.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PARENT_RUN_ATTR = "mlflow_parent_run_id"
DRIVER_ATTR = "sweep.driver"  # on each trial: the driver process that runs it, so a later driver can tell it died
RECONNECT_S = 60.0  # a database server restart or failover takes seconds; past this a storage call fails
RECONNECT_PAUSE_S = 0.5


def display_url(url: str) -> str:
    """The storage URL without its password: what may be printed and logged."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class _Storage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, where a trial asked for (`study.ask`: the asking process is its driver) is created with
    its driver's identity (DRIVER_ATTR) and, with heartbeats on, its first heartbeat, in the transaction that creates
    it. Optuna records the first beat from a thread it starts once the trial is committed, and the driver would record
    itself later still: a driver killed in between (milliseconds) would leave a trial RUNNING with no beat, which
    Optuna never takes for stale, and no driver to find gone, so that nothing would ever end it."""

    def _get_prepared_new_trial(self, study_id, template_trial, session):
        trial = super()._get_prepared_new_trial(study_id, template_trial, session)
        if template_trial is None:  # asked for, not enqueued or copied
            session.add(models.TrialUserAttributeModel(trial_id=trial.trial_id, key=DRIVER_ATTR,
                                                       value_json=json.dumps(process_identity(os.getpid()))))
            if self.heartbeat_interval is not None:
                session.add(models.TrialHeartbeatModel(trial_id=trial.trial_id))
        return trial


def _connection_lost(e: BaseException | None) -> bool:
    """The server was unreachable or dropped the connection (restart, failover, network): the transaction did not
    happen, so it can be sent again. Optuna wraps SQLAlchemy's error in StorageInternalError; where it catches one
    itself and goes on (the fallback query of `_get_trials`), the next statement fails on the dropped connection,
    and the lost connection is that error's context."""
    while isinstance(e, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError)):
        if isinstance(e, sqlalchemy.exc.DBAPIError) and (
                e.connection_invalidated or isinstance(e, sqlalchemy.exc.OperationalError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _until_reachable(what: str, call, *args, **kwargs):
    """`call`, sent again while the database is unreachable, for up to RECONNECT_S."""
    deadline = time.monotonic() + RECONNECT_S
    said = False
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as e:
            if not _connection_lost(e) or time.monotonic() >= deadline:
                raise
            if not said:
                print(f"[sweep] the study's database is unreachable ({what}): retrying for up to {RECONNECT_S:.0f}s",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(RECONNECT_PAUSE_S)


def _reconnecting(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        return _until_reachable(method.__name__, method, self, *args, **kwargs)

    return call


class _ReconnectingStorage(_Storage):
    """On a database server, every storage call waits out a lost connection (up to RECONNECT_S) instead of failing:
    the driver's, its heartbeat thread's and the trial's calls alike. `pool_pre_ping` replaces a pooled connection
    the server dropped, but a call made while the server is down (a restart) still fails, and a failed call ends
    the driver (Optuna re-raises storage errors) or, in the heartbeat thread, the heartbeat of a trial that runs on."""


# every call that reaches the database: the storage interface, the heartbeat's, and the private calls of the cache
# that Optuna puts in front of an RDB storage (optuna 5.0's _CachedStorage)
for _name in optuna.storages.BaseStorage.__abstractmethods__ | {
        "record_heartbeat", "_get_stale_trial_ids", "_create_new_trial", "_get_best_trial_id", "_get_trials",
        "_set_trial_param"}:
    setattr(_ReconnectingStorage, _name, _reconnecting(getattr(_Storage, _name)))


def make_storage(url: str, heartbeat_s: int | None = None) -> optuna.storages.RDBStorage:
    """The study's storage; with `heartbeat_s`, the driver's: its running trial beats every `heartbeat_s` seconds and
    a trial silent for 4 beats is failed (`fail_lost_trials`), its MLflow run closed (`fail_trial`)."""
    # SQLite allows one writer at a time; trial processes and other workers write too, so wait for the lock
    # instead of failing at once. A database server can drop a pooled connection (restart, idle timeout, network):
    # each connection is tested before use and replaced if dropped (Optuna does that for MySQL only). One pooled
    # connection per process, not SQLAlchemy's 5 (Optuna's construction alone kept 2): every connection is a server
    # process under max_connections, which then bounds the workers one server carries; the driver's heartbeat
    # thread seldom overlaps its main thread, and an overlap opens a connection for that moment only.
    # A worker started while the server restarts waits for it as a running one does.
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {"pool_pre_ping": True, "pool_size": 1}
    make = functools.partial(_Storage if sqlite else _ReconnectingStorage, url, engine_kwargs=engine_kwargs,
                             heartbeat_interval=heartbeat_s, grace_period=heartbeat_s * 4 if heartbeat_s else None,
                             heartbeat_stale_trial_callback=_on_stale_trial if heartbeat_s else None)
    for attempt in range(3):
        try:
            return make() if sqlite else _until_reachable("connect", make)
        except Exception as e:  # a bad scheme, a missing driver, a server that refuses: say which storage
            # Workers started together on a new database race to create its tables; the loser finds them made.
            if ("already exists" in str(e) or "alembic_version" in str(e)) and attempt < 2:
                time.sleep(1)
                continue
            raise ConfigError(f"--storage {display_url(url)}: {e}") from None


def make_pruner(kind: str, warmup_steps: int, startup_trials: int, eval_every: int,
                max_steps: int) -> optuna.pruners.BasePruner:
    """The same pruner is rebuilt in each trial process from these arguments (Optuna does not store it)."""
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    if kind == "hyperband":
        # max_steps=0 trains for num_train_epochs: Optuna then takes the steps the first trials reach
        return optuna.pruners.HyperbandPruner(min_resource=max(eval_every, warmup_steps),
                                              max_resource=max_steps if max_steps > 0 else "auto")
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {kind!r}: choose one of {', '.join(PRUNERS)}")


def open_study(name: str, storage, sampler, pruner, experiment: str, objective: str,
               direction: str) -> tuple[optuna.Study, bool]:
    """The study `name`, created (True) or joined; a study created for another experiment, objective or direction
    is refused."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=direction)
        study.set_user_attr("experiment", experiment)
        study.set_user_attr("objective", objective)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    recorded = study_attr(study, storage, "experiment", True), study_attr(study, storage, "objective", True)
    if recorded != (experiment, objective) or study.direction.name.lower() != direction:
        raise ConfigError(f"--study {name}: the study was created for experiment {recorded[0]!r} optimising "
                          f"{recorded[1]!r} ({study.direction.name.lower()}), not {experiment!r} "
                          f"{objective!r} ({direction}); choose another --study name")
    return study, False


def study_attr(study: optuna.Study, storage, key: str, wait: bool) -> str | None:
    """A study attribute that the driver which created the study sets right after creating it. A driver that
    joined at the same moment waits briefly for it, so that concurrent workers share one parent run."""
    deadline = time.time() + (30 if wait else 0)
    while True:
        value = optuna.load_study(study_name=study.study_name, storage=storage).user_attrs.get(key)
        if value or time.time() >= deadline:
            return value
        time.sleep(1)


def stop_at(total_trials: int) -> list[optuna.study.MaxTrialsCallback]:
    """`--total-trials N`: every worker stops once the study has N results (COMPLETE or PRUNED), all workers
    together. A trial that ended FAIL (its worker killed, a crash) does not count, so a sweep that loses workers
    still delivers N; N FAIL trials stop it too, so a setting that always crashes does not loop. Trials already
    running when the count is reached finish: up to one more per worker."""
    return [optuna.study.MaxTrialsCallback(total_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)),
            optuna.study.MaxTrialsCallback(total_trials, states=(TrialState.FAIL,))]


def fail_trial(study: optuna.Study, trial_id: int, run_status: str, why: str, *, tell: bool = True,
               run_ids: tuple[str, ...] = ()) -> None:
    """The one way a trial ends FAIL, whoever finds it failed (its driver, the trial process, a later driver): the
    Optuna trial FAIL if still RUNNING (`tell=False`: the objective is about to raise inside `study.optimize`,
    which tells Optuna itself), and its MLflow run ended `run_status` if still RUNNING (KILLED: its process was
    killed or lost; FAILED: it exited on an error) and tagged `optuna.trial.state=FAIL`. The run is found by
    `run_ids`, the trial's `mlflow_run_id` attribute, or its tags (a process killed before it recorded the id)."""
    trial = study._storage.get_trial(trial_id)
    attrs = study.user_attrs
    parent = attrs.get(PARENT_RUN_ATTR)
    tags = {"mlflow.parentRunId": parent, "optuna.trial.number": str(trial.number)} if parent else None
    run_ids = (*run_ids, *filter(None, [trial.user_attrs.get("mlflow_run_id")]))
    # The runs first, then the trial: a worker killed in between leaves the trial RUNNING, and the next driver that
    # finds it does it all again (a closed run stays as it is); the other order would leave the run RUNNING.
    if run_ids or tags:  # else the trial has no run to look for, and no MLflow store is opened
        # here, not at the top: a worker imports MLflow (2 s, 180 MB) only once it has a run to close
        from harness.training.tracking.runs import end_runs, existing_run

        try:
            for run_id in end_runs(run_status, run_ids, attrs.get("experiment"), tags):
                existing_run(run_id).set_tags({"optuna.trial.state": "FAIL"})
        except Exception as e:  # the MLflow store is unreachable: the Optuna state below is what counts
            print(f"[sweep] trial {trial.number}: could not close its MLflow run: {e}", file=sys.stderr, flush=True)
    if tell and trial.state == TrialState.RUNNING:
        with contextlib.suppress(UpdateFinishedTrialError):  # another worker failed it at the same moment
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    print(f"[sweep] trial {trial.number}: FAIL ({why})", flush=True)


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose driver stopped beating: Optuna has marked it FAIL; close its MLflow run the same way."""
    fail_trial(study, trial._trial_id, "KILLED", "its driver stopped beating: lost")


def process_identity(pid: int) -> dict | None:
    """What identifies a live process for a later driver: this kernel boot and PID namespace (where the same pid
    means the same process), the pid and its start time (a reused pid has another). None off Linux."""
    try:
        machine = Path("/proc/sys/kernel/random/boot_id").read_text().strip() + "/" + os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    started = _start_time(pid)
    return {"machine": machine, "pid": pid, "start": started} if started else None


def _start_time(pid: int) -> str | None:
    """The process's start time from /proc/PID/stat; None when it is gone or a zombie (dead, not yet waited for)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # fields[0] is field 3 (state); starttime is field 22


def _is_gone(identity: dict | None) -> bool:
    """True only when the process certainly ended: it ran on this machine and is no longer there."""
    here = process_identity(os.getpid())
    if not identity or here is None or identity.get("machine") != here["machine"]:
        return False
    return _start_time(identity["pid"]) != identity["start"]


def fail_lost_trials(study: optuna.Study) -> None:
    """Trials that a dead driver left RUNNING: those whose driver ran on this machine and is gone (at once), and
    those whose heartbeat is stale (any machine; Optuna fails them and calls `_on_stale_trial`)."""
    optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        driver = trial.user_attrs.get(DRIVER_ATTR)
        if _is_gone(driver):
            fail_trial(study, trial._trial_id, "KILLED", f"its driver (pid {driver['pid']}) is gone")

