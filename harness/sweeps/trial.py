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
from pathlib import Path

import optuna
from transformers import TrainerCallback

from experiments import load_class
from harness.core.files import write_json_atomic
from harness.sweeps.study import fail_trial, make_pruner, make_storage
from harness.training.inloop import EvalReport
from harness.training.overrides import apply_overrides
from harness.training.runner import RunHooks, run_experiment
from harness.training.tracking import Tracker


class TrialMonitor(TrainerCallback):
    """Reports the objective of every eval report to the trial and stops training once the trial is pruned."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None

    def __call__(self, report: EvalReport, _model) -> None:
        self.trial.report(report.metrics[self.metric], report.step)
        if self.pruned_at is None and self.trial.should_prune():
            self.pruned_at = report.step
            print(f"[sweep] trial {self.trial.number} pruned at step {report.step}: "
                  f"{self.metric}={report.metrics[self.metric]:.4f}", flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.pruned_at is not None:
            control.should_training_stop = True


def _stop_on_first_signal() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt once (inside the MLflow run its own SIGTERM handler does the same)
    and are ignored after that: a second signal (Ctrl-C reaches both the driver and this process, then the driver
    forwards SIGTERM) must not cut the process short before it has ended its run KILLED."""
    fired = []

    def handler(signum, frame):
        if not fired:
            fired.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")

    for s in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(s) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
            signal.signal(s, handler)


def _driver_alive(driver_pid: int) -> bool:
    """On Linux, asks the kernel for SIGTERM when the driver dies, even by SIGKILL; False if it died already."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    return os.getppid() == driver_pid


def run_trial(spec_path: str) -> int:
    _stop_on_first_signal()
    spec = json.loads(Path(spec_path).read_text())
    if not _driver_alive(spec["driver_pid"]):
        print(f"[sweep] trial {spec['trial_number']}: its driver died before the trial started", flush=True)
        return 1  # the next driver on the study finds the trial RUNNING with a dead driver and fails it
    result_path = Path(spec["result"])
    exp = apply_overrides(load_class(spec["experiment"]), spec["overrides"], sweep=True)
    pruner = make_pruner(**spec["pruner"])
    study = optuna.load_study(study_name=spec["study"], storage=make_storage(spec["storage"]), pruner=pruner)
    trial = optuna.trial.Trial(study, spec["trial_id"])
    monitor = TrialMonitor(trial, exp.select_metric)

    def on_open(tracker: Tracker) -> None:
        # Recorded at once, so that whoever finds this trial dead can close its run.
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        write_json_atomic(result_path, {"run_id": tracker.run_id})

    hooks = RunHooks(run_name=f"trial-{spec['trial_number']}", monitors=[monitor], on_open=on_open,
                     tags={"mlflow.parentRunId": spec["parent_run_id"], "optuna.study": spec["study"],
                           "optuna.trial.number": str(spec["trial_number"]), "sweep.role": "trial"})
    try:
        summary = run_experiment(exp, hooks)
    except KeyboardInterrupt:
        if os.getppid() != spec["driver_pid"]:  # the kernel's SIGTERM: the driver is gone and cannot fail the trial
            fail_trial(study, spec["trial_id"], "KILLED", "its driver died")
        raise
    last = summary.reports[-1]
    write_json_atomic(result_path, {"run_id": summary.run_id, "value": last.metrics[exp.select_metric],
                                    "step": last.step, "steps_trained": summary.steps_trained,
                                    "pruned": monitor.pruned_at is not None})
    return 0
