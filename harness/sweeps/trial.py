"""One sweep trial, in its own process (`python -m harness trial SPEC`, started by harness.sweeps.study).

It runs the experiment like `harness run` does, as a nested MLflow run of the study's parent run, and reports
each in-loop evaluation of the objective to the Optuna trial; when the pruner says stop, training stops at that
step and the run ends normally, so every table logged so far stays.

SIGTERM (from the driver, or from the kernel when the driver dies) and Ctrl-C end the run KILLED; a trial whose
driver died also marks itself FAIL, since no driver is left to do it."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
from pathlib import Path

import optuna
from transformers import TrainerCallback

from experiments import load_class
from harness.core.files import write_json_atomic
from harness.sweeps.storage import fail_trial, make_pruner, make_storage
from harness.training import interrupts
from harness.training.inloop import EvalReport, selection_value
from harness.training.overrides import apply_overrides
from harness.training.runner import RunHooks, run_experiment
from harness.training.tracking.tracker import Tracker


class StopSignal:
    """SIGTERM and SIGINT in a trial process: before its run opens the first raises KeyboardInterrupt, later ones
    are only recorded, so a second signal (Ctrl-C reaches both the driver and this process, then the driver
    forwards SIGTERM) cannot cut the process short before it has ended its run; once the run is open, `hand_over`
    gives the signals to the run's own handling, which stops at the next step or evaluation boundary. A
    KeyboardInterrupt raised where Python drops it (the signal landed in a finalizer or a weakref callback) is
    raised again by `check`, which the trial calls when its run opens and at every training step and eval report."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        """Also inside the MLflow run, over its own SIGTERM handler (which raises but does not record)."""
        for s in (signal.SIGTERM, signal.SIGINT):
            if signal.getsignal(s) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
                signal.signal(s, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt(f"signal {signum}")

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")
        interrupts.check()

    def hand_over(self) -> None:
        """Once the run is open, its own signal handling (harness.training.interrupts) takes the signals, stopping
        at a step or evaluation boundary and never at once on a second signal; outside it, this one's handler."""
        if not interrupts.patient(self.signum):
            self.install()


class TrialMonitor(TrainerCallback):
    """Reports the objective of every eval report to the trial and stops training once the trial is pruned, or
    at once when the process got a stop signal."""

    def __init__(self, trial: optuna.Trial, metric: str, stop: StopSignal):
        self.trial = trial
        self.metric = metric
        self.stop = stop
        self.pruned_at: int | None = None

    def __call__(self, report: EvalReport, _model) -> None:
        self.stop.check()
        value = selection_value(report, self.metric)
        if value is None:  # the evaluation did not produce it (BestCheckpoint warns): nothing to report or prune on
            return
        self.trial.report(value, report.step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = report.step
            print(f"[sweep] trial {self.trial.number} pruned at step {report.step}: "
                  f"{self.metric}={value:.4f}", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self.stop.check()

    def on_step_begin(self, args, state, control, **kwargs):
        self.stop.check()

    def on_step_end(self, args, state, control, **kwargs):
        self.stop.check()
        if self.pruned_at is not None:
            control.should_training_stop = True


def _driver_alive(driver_pid: int) -> bool:
    """On Linux, asks the kernel for SIGTERM when the driver dies, even by SIGKILL; False if it died already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    return os.getppid() == driver_pid


def _orphaned(spec: dict, wait_s: float = 5.0) -> bool:
    """After a stop signal: True if it is the kernel's because the driver died, so that no driver will fail the
    trial. The driver writes the stop file before it sends SIGTERM (and on Ctrl-C, which reaches both, within a
    moment); the kernel's signal can come when only the driver's main thread has gone, its pid a moment longer."""
    deadline = time.time() + wait_s
    while os.getppid() == spec["driver_pid"]:
        if Path(spec["stop"]).exists() or time.time() >= deadline:
            return False
        time.sleep(0.1)
    return True


def run_trial(spec_path: str) -> int:
    stop = StopSignal()
    stop.install()
    spec = json.loads(Path(spec_path).read_text())
    if not _driver_alive(spec["driver_pid"]):
        print(f"[sweep] trial {spec['trial_number']}: its driver died before the trial started", flush=True)
        return 1  # the next driver on the study finds the trial RUNNING with a dead driver and fails it
    result_path = Path(spec["result"])
    exp = apply_overrides(load_class(spec["experiment"]), spec["overrides"], sweep=True)
    pruner = make_pruner(**spec["pruner"])
    study = optuna.load_study(study_name=spec["study"], storage=make_storage(spec["storage"]), pruner=pruner)
    trial = optuna.trial.Trial(study, spec["trial_id"])
    monitor = TrialMonitor(trial, exp.select_metric, stop)

    def on_open(tracker: Tracker) -> None:
        stop.hand_over()
        # Recorded at once, so that whoever finds this trial dead can close its run.
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        write_json_atomic(result_path, {"run_id": tracker.run_id})
        stop.check()  # a signal whose KeyboardInterrupt was lost before the run opened

    hooks = RunHooks(run_name=f"trial-{spec['trial_number']}", monitors=[monitor], on_open=on_open,
                     tags={"mlflow.parentRunId": spec["parent_run_id"], "optuna.study": spec["study"],
                           "optuna.trial.number": str(spec["trial_number"]), "sweep.role": "trial"})
    try:
        summary = run_experiment(exp, hooks)
    except KeyboardInterrupt:
        if _orphaned(spec):
            fail_trial(study, spec["trial_id"], "KILLED", "its driver died")
        raise
    # the objective: the last evaluation that produced it; with none, no value and the driver fails the trial
    measured = [(r, v) for r in summary.reports if (v := selection_value(r, exp.select_metric)) is not None]
    result = {"run_id": summary.run_id, "steps_trained": summary.steps_trained,
              "pruned": monitor.pruned_at is not None}
    if measured:
        result.update(value=measured[-1][1], step=measured[-1][0].step)
    else:
        print(f"[sweep] trial {spec['trial_number']}: no evaluation produced {exp.select_metric}", flush=True)
    write_json_atomic(result_path, result)
    return 0
