"""One simulated sweep worker of the `sweep_scale` part: `python -m harness.commands.bench.sweep_scale_child SPEC`.

A driver like `harness sweep`'s, on the harness's own study code (harness.sweeps.storage: the reconnecting storage
with heartbeats, joining the study, Hyperband, failing the trials of dead drivers before each trial, the total-trials
stop), whose trials sleep and report instead of training. As a trial process does, each trial reports through a
storage of its own (one more engine and connection, opened and closed per trial); the trial process's start (its
imports, seconds per trial) is left out. Every trial's start and end go to the worker's events file as JSON lines,
so that the part can compare what the workers ran with what the database holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import optuna

from harness.sweeps.storage import (
    PARENT_RUN_ATTR,
    fail_lost_trials,
    make_pruner,
    make_storage,
    open_study,
    stop_at,
)

EXPERIMENT = "sweep_scale"  # the MLflow experiment of the fault run, and the study's recorded experiment
OBJECTIVE = "sim/loss"


def _value(x: float, step: int) -> float:
    """A loss that falls with the steps and is lowest at x = 0.3: Hyperband prunes the trials far from it."""
    return (x - 0.3) ** 2 + 1.0 / step


class SleepTrials:
    """The objective: fail lost trials, sample x, then `steps` reports `step_s` apart, stopping when pruned."""

    def __init__(self, spec: dict, events: TextIO):
        self.spec = spec
        self.events = events
        self.pruner = make_pruner("hyperband", warmup_steps=1, startup_trials=2, eval_every=1, max_steps=spec["steps"])

    def record(self, event: str, trial: optuna.Trial, **fields) -> None:
        self.events.write(json.dumps({"event": event, "trial": trial.number, "id": trial._trial_id,
                                      "pid": os.getpid(), "t": time.time(), **fields}) + "\n")
        self.events.flush()

    def __call__(self, trial: optuna.Trial) -> float:
        fail_lost_trials(trial.study)  # as the harness's driver does before each trial
        x = trial.suggest_float("x", 0.0, 1.0)
        self.record("start", trial)
        storage = make_storage(self.spec["storage"])  # the trial process's own, without heartbeat
        try:
            reporter = optuna.trial.Trial(optuna.load_study(study_name=self.spec["study"], storage=storage,
                                                            pruner=self.pruner), trial._trial_id)
            with self._run(trial, x) as run:
                pruned_at = None
                for step in range(1, self.spec["steps"] + 1):
                    time.sleep(self.spec["step_s"])
                    value = _value(x, step)
                    reporter.report(value, step)
                    if reporter.should_prune():
                        pruned_at = step
                        break
                state = "PRUNED" if pruned_at else "COMPLETE"
                if run is not None:
                    run.set_tags({"optuna.trial.state": state})
        finally:
            storage.remove_session()
            storage.engine.dispose()
        self.record("end", trial, state=state, slept_s=step * self.spec["step_s"])
        if pruned_at:
            raise optuna.TrialPruned(f"pruned at step {pruned_at}")
        return value

    @contextlib.contextmanager
    def _run(self, trial: optuna.Trial, x: float):
        """With `mlflow` in the spec, the trial's MLflow run as harness.sweeps.trial opens it (nested in the study's
        parent run, its id recorded on the trial at once), so that the harness closes a killed trial's run."""
        if not self.spec.get("mlflow"):
            yield None
            return
        from harness.training.tracking.runs import mlflow_run

        parent = trial.study.user_attrs[PARENT_RUN_ATTR]
        tags = {"mlflow.parentRunId": parent, "optuna.study": self.spec["study"],
                "optuna.trial.number": str(trial.number), "sweep.role": "trial"}
        with mlflow_run(EXPERIMENT, {"x": x}, tags, run_name=f"trial-{trial.number}") as run:
            trial.set_user_attr("mlflow_run_id", run.run_id)
            yield run


def main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(spec["storage"], spec["heartbeat_s"])
    sampler = optuna.samplers.TPESampler()  # unseeded, as `make sweep-worker` runs each worker
    with open(spec["events"], "a") as events:
        objective = SleepTrials(spec, events)
        study, _ = open_study(spec["study"], storage, sampler, objective.pruner, EXPERIMENT, OBJECTIVE, "minimize")
        if spec.get("mlflow"):  # MLflow's import and the store's check (2 s) before the trials, not in the first
            from harness.training.tracking.store import open_client

            open_client()
        events.write(json.dumps({"event": "ready", "pid": os.getpid(), "t": time.time(),
                                 "cpu_s": time.process_time()}) + "\n")
        events.flush()
        go = Path(spec["go"])
        while not go.exists():  # all workers start their trials together, once every one has started
            time.sleep(0.05)
        study.optimize(objective, timeout=spec.get("timeout_s"),
                       callbacks=stop_at(spec["total_trials"]) if spec.get("total_trials") else None)
        events.write(json.dumps({"event": "done", "pid": os.getpid(), "t": time.time(),
                                 "cpu_s": time.process_time()}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
