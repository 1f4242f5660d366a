"""`python -m harness sweep`: an Optuna study over an experiment's search space, scored by its in-loop evals.

The driver (this module) samples each trial's fields, starts the trial in its own process (harness.sweeps.trial) and
tells Optuna the outcome; the trial process reports every in-loop evaluation to the study itself and stops
when the pruner says so. A crash or a leak in one trial therefore never takes the sweep down.

Nothing is left RUNNING, whatever signal ends which process (`fail_trial` is the one way a trial ends FAIL):
- driver gets SIGTERM, SIGINT or SIGHUP: the trial process gets SIGTERM and `TRIAL_GRACE_S` to end its run
  KILLED, then SIGKILL; the driver ends what is left (trial FAIL, its run KILLED), then its parent run KILLED,
  and exits 130;
- trial process dies, even by SIGKILL: the driver sees it exit without a result and fails the trial;
- driver dies by SIGKILL: its trial process gets SIGTERM from the kernel (Linux) and fails its trial itself;
  anything still RUNNING is failed by the next driver to start a trial on the study (a resume): at once when the
  dead driver ran on this machine, else once its heartbeat is stale (4 beats); a resume reopens the parent run
  and ends it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna

from experiments import load_class
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.sweeps.storage import (
    PARENT_RUN_ATTR,
    display_url,
    fail_lost_trials,
    fail_trial,
    make_pruner,
    make_storage,
    open_study,
    stop_at,
    study_attr,
)
from harness.training.experiment import Experiment
from harness.training.overrides import apply_overrides, field_types, parse_overrides
from harness.training.tracking.runs import existing_run, mlflow_run
from harness.training.tracking.store import shown_tracking_uri

TRIAL_PID_ATTR = "sweep.trial_pid"
TRIAL_GRACE_S = 30.0  # a stopped driver gives its trial process this long to end its run, then kills it


class TrialFailed(RuntimeError):
    """The trial's process ended without a result: Optuna records the trial FAIL and the sweep goes on."""


@dataclass(frozen=True)
class SweepConfig:
    experiment: str
    overrides: list[str]  # key=value fixed for every trial
    trials: int | None = None  # trials this driver runs; None: until timeout or total_trials
    total_trials: int | None = None  # stop once the study has this many results (all workers together): stop_at
    timeout_s: float | None = None
    storage: str | None = None
    study: str | None = None
    pruner: str = "hyperband"
    warmup_steps: int = 1  # no pruning before this training step: the step-0 baseline is the same for every trial
    startup_trials: int = 2  # no pruning until this many trials have finished
    seed: int | None = None
    heartbeat_s: int = 30
    grace_s: float = TRIAL_GRACE_S


def default_storage() -> str:
    """OPTUNA_STORAGE if set (e.g. a PostgreSQL URL shared by workers), else SQLite at the repository root."""
    return os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{REPO_ROOT / 'optuna.db'}"


def trial_overrides(exp: Experiment, fixed: list[str], values: dict) -> list[str]:
    """The trial's command line: the fixed overrides, then the sampled fields (checked against the experiment)."""
    types = field_types(type(exp))
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"experiments/{exp.name()}.py: search_space returned {unknown}, which are not fields; "
                          f"fields: {', '.join(types)}")
    return [*fixed, *(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items())]


class _Signals:
    """While trials run, SIGTERM, SIGINT and SIGHUP are recorded instead of raised (signals already ignored, as
    under nohup, stay ignored), so that the driver stops where it can end what it started: in `_wait` (the trial
    process gets SIGTERM), before a trial starts, or after one ends (`check`, also an Optuna callback)."""

    NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP"}

    def __init__(self):
        self.received: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():  # only it can set handlers
            for signum in self.NAMES:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = self.received or signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def name(self) -> str:
        return self.NAMES.get(self.received, str(self.received))

    def check(self, *_callback_args) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"{self.name()}: sweep stopped")


def run_sweep(cfg: SweepConfig) -> dict:
    cls = load_class(cfg.experiment)
    exp = apply_overrides(cls, cfg.overrides, sweep=True)
    if type(exp).search_space is Experiment.search_space:
        exp.search_space(None)  # raises the error that says how to declare one
    url = cfg.storage or default_storage()
    storage = make_storage(url, cfg.heartbeat_s)
    pruner_args = dict(kind=cfg.pruner, warmup_steps=cfg.warmup_steps, startup_trials=cfg.startup_trials,
                       eval_every=exp.eval_every, max_steps=exp.max_steps)
    pruner = make_pruner(**pruner_args)
    fixed, _ = parse_overrides(cls, cfg.overrides)
    # Fields fixed on the command line keep their value when the search space suggests them too.
    sampler = optuna.samplers.PartialFixedSampler(fixed, optuna.samplers.TPESampler(seed=cfg.seed))
    study, created = open_study(cfg.study or exp.name(), storage, sampler, pruner, exp.name(), exp.select_metric,
                                "maximize" if exp.select_mode == "max" else "minimize")
    shown_url = display_url(url)
    print(f"[sweep] study '{study.study_name}' in {shown_url}: {'created' if created else 'resumed'}, "
          f"{len(study.trials)} trials so far; objective {exp.select_metric} ({study.direction.name.lower()}), "
          f"pruner {cfg.pruner}", flush=True)
    params = {"sweep.study": study.study_name, "sweep.storage": shown_url, "sweep.pruner": cfg.pruner,
              "sweep.warmup_steps": cfg.warmup_steps, "sweep.startup_trials": cfg.startup_trials,
              "sweep.objective": exp.select_metric, **exp.params()}
    tags = {"optuna.study": study.study_name, "optuna.storage": shown_url, "sweep.role": "parent",
            "sweep.overrides": " ".join(cfg.overrides)}
    # a parent run left RUNNING by a killed driver is reopened here and ends with this driver
    with mlflow_run(exp.name(), params, tags, run_name=f"sweep-{study.study_name}",
                    resume_run_id=study_attr(study, storage, PARENT_RUN_ATTR, wait=not created)) as parent, \
            tempfile.TemporaryDirectory(prefix="sweep-") as scratch, _Signals() as signals:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        print(f"[mlflow] parent run {parent.run_id} at {shown_tracking_uri()}", flush=True)
        objective = _TrialLauncher(exp, cfg.overrides, url, pruner_args, parent.run_id, Path(scratch), signals,
                                   cfg.grace_s)
        callbacks = [signals.check]  # stop between trials once a signal came
        if cfg.total_trials is not None:
            callbacks += stop_at(cfg.total_trials)
        study.optimize(objective, n_trials=cfg.trials, timeout=cfg.timeout_s, catch=(TrialFailed,),
                       callbacks=callbacks)
        signals.check()
        from harness.sweeps.report import log_study

        summary = log_study(study, parent)
        signals.check()
    return {"study": study.study_name, "storage": shown_url, "mlflow_parent_run_id": parent.run_id, **summary}


class _TrialLauncher:
    """The objective Optuna calls: sample the fields, run the trial in a fresh process, return its value."""

    def __init__(self, exp: Experiment, fixed: list[str], storage_url: str, pruner_args: dict, parent_run_id: str,
                 scratch: Path, signals: _Signals, grace_s: float):
        self.exp = exp
        self.fixed = fixed
        self.storage_url = storage_url
        self.pruner_args = pruner_args
        self.parent_run_id = parent_run_id
        self.scratch = scratch
        self.signals = signals
        self.grace_s = grace_s

    def __call__(self, trial: optuna.Trial) -> float:
        self.signals.check()  # a signal during sampling: this trial ends FAIL before it starts
        fail_lost_trials(trial.study)  # on resume, and trials of other workers on this machine that were killed
        overrides = trial_overrides(self.exp, self.fixed, self.exp.search_space(trial))
        result_path = self.scratch / f"trial-{trial.number}.json"
        spec = {"experiment": self.exp.name(), "overrides": overrides, "storage": self.storage_url,
                "study": trial.study.study_name, "trial_id": trial._trial_id, "trial_number": trial.number,
                "pruner": self.pruner_args, "parent_run_id": self.parent_run_id, "result": str(result_path),
                "driver_pid": os.getpid(), "stop": str(self._stop_file(trial.number))}
        spec_path = self.scratch / f"trial-{trial.number}.spec.json"
        spec_path.write_text(json.dumps(spec))
        tuned = " ".join(overrides[len(self.fixed):])
        print(f"\n[sweep] trial {trial.number}: {tuned}", flush=True)
        proc = subprocess.Popen([sys.executable, "-m", "harness", "trial", str(spec_path)], cwd=REPO_ROOT)
        try:
            trial.set_user_attr(TRIAL_PID_ATTR, proc.pid)
            code = self._wait(proc, trial.number)
        except BaseException:  # the driver itself failed while the trial ran: stop the trial, close its run
            if proc.poll() is None:
                self._stop(proc, trial.number)
            with contextlib.suppress(Exception):
                fail_trial(trial.study, trial._trial_id, "KILLED", "its driver failed", tell=False)
            raise
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        run_ids = (result["run_id"],) if "run_id" in result else ()
        if self.signals.received is not None and (code != 0 or "value" not in result):
            fail_trial(trial.study, trial._trial_id, "KILLED", f"stopped by {self.signals.name()}", tell=False,
                       run_ids=run_ids)
            raise KeyboardInterrupt(f"{self.signals.name()}: sweep stopped")
        if code != 0 or "value" not in result:
            # killed by a signal (returncode -N), even SIGKILL, where the process could close nothing itself
            fail_trial(trial.study, trial._trial_id, "KILLED" if code < 0 else "FAILED", f"process exit code {code}",
                       tell=False, run_ids=run_ids)
            raise TrialFailed(f"trial {trial.number}: the trial process exited with code {code} and no result")
        run = existing_run(result["run_id"])
        trial.set_user_attr("steps_trained", result["steps_trained"])
        state = "PRUNED" if result["pruned"] else "COMPLETE"
        run.set_tags({"optuna.trial.state": state})
        run.log_metrics({"sweep/objective": result["value"]}, result["step"])
        print(f"[sweep] trial {trial.number}: {state} {self.exp.select_metric}={result['value']:.4f} "
              f"at step {result['step']} ({result['steps_trained']}/{self.exp.max_steps} steps)", flush=True)
        if result["pruned"]:
            raise optuna.TrialPruned(f"pruned at step {result['step']}")
        return result["value"]

    def _wait(self, proc: subprocess.Popen, number: int) -> int:
        """The trial process's exit code; a signal to the driver meanwhile stops it (`_stop`)."""
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                if self.signals.received is not None:
                    print(f"[sweep] {self.signals.name()}: stopping trial {number}", flush=True)
                    return self._stop(proc, number)

    def _stop_file(self, number: int) -> Path:
        return self.scratch / f"trial-{number}.stop"

    def _stop(self, proc: subprocess.Popen, number: int) -> int:
        """SIGTERM (the trial ends its run KILLED), then SIGKILL after the grace period. The stop file tells the
        trial that its driver is alive and fails the trial (see trial._orphaned)."""
        self._stop_file(number).touch()
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=self.grace_s)
        except subprocess.TimeoutExpired:
            print(f"[sweep] trial {number} still running {self.grace_s:.0f}s after SIGTERM: SIGKILL", flush=True)
            proc.kill()
            return proc.wait()
