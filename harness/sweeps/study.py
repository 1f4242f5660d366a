"""`python -m harness sweep`: an Optuna study over an experiment's search space, scored by its in-loop evals.

The driver (this module) samples each trial's fields, starts the trial in its own process (harness.sweeps.trial) and
tells Optuna the outcome; the trial process reports every in-loop evaluation to the study itself and stops
when the pruner says so. A crash or a leak in one trial therefore never takes the sweep down, and a driver
that dies leaves a trial whose heartbeat stops: the next driver on the study marks it FAIL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

from experiments import load_class
from harness.core.errors import ConfigError
from harness.core.paths import REPO_ROOT
from harness.training.experiment import Experiment
from harness.training.overrides import apply_overrides, field_types, parse_overrides
from harness.training.tracking import existing_run, mlflow_run, tracking_uri

PRUNERS = ("median", "hyperband", "none")
# Heartbeats and PartialFixedSampler are marked experimental by Optuna; their warnings would repeat every trial.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
PARENT_RUN_ATTR = "mlflow_parent_run_id"


class TrialFailed(RuntimeError):
    """The trial's process ended without a result: Optuna records the trial FAIL and the sweep goes on."""


@dataclass(frozen=True)
class SweepConfig:
    experiment: str
    overrides: list[str]  # key=value fixed for every trial
    trials: int | None = None  # trials this driver runs; None: until timeout or total_trials
    total_trials: int | None = None  # stop once the study has this many finished trials (all workers together)
    timeout_s: float | None = None
    storage: str | None = None
    study: str | None = None
    pruner: str = "hyperband"
    warmup_steps: int = 1  # no pruning before this training step: the step-0 baseline is the same for every trial
    startup_trials: int = 2  # no pruning until this many trials have finished
    seed: int | None = None
    heartbeat_s: int = 30


def default_storage() -> str:
    """OPTUNA_STORAGE if set (e.g. a PostgreSQL URL shared by workers), else SQLite at the repository root."""
    return os.environ.get("OPTUNA_STORAGE") or f"sqlite:///{REPO_ROOT / 'optuna.db'}"


def display_url(url: str) -> str:
    """The storage URL without its password: what may be printed and logged."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def make_storage(url: str, heartbeat_s: int | None = None, on_stale=None) -> optuna.storages.RDBStorage:
    # SQLite allows one writer at a time; trial processes and other workers write too, so wait for the lock
    # instead of failing at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                              grace_period=heartbeat_s * 4 if heartbeat_s else None,
                                              heartbeat_stale_trial_callback=on_stale)
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
        return optuna.pruners.HyperbandPruner(min_resource=max(eval_every, warmup_steps), max_resource=max_steps)
    if kind == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"--pruner {kind!r}: choose one of {', '.join(PRUNERS)}")


def trial_overrides(exp: Experiment, fixed: list[str], values: dict) -> list[str]:
    """The trial's command line: the fixed overrides, then the sampled fields (checked against the experiment)."""
    types = field_types(type(exp))
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"experiments/{exp.name()}.py: search_space returned {unknown}, which are not fields; "
                          f"fields: {', '.join(types)}")
    return [*fixed, *(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in values.items())]


def _on_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose driver died: Optuna marks it FAIL; close its MLflow run the same way."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    print(f"[sweep] trial {trial.number} lost its process (no heartbeat): marked FAIL", flush=True)
    if run_id:
        run = existing_run(run_id)
        run.fail_if_running()
        run.set_tags({"optuna.trial.state": "FAIL"})


def _open_study(cfg: SweepConfig, exp: Experiment, storage, sampler, pruner) -> tuple[optuna.Study, bool]:
    name = cfg.study or exp.name()
    direction = "maximize" if exp.select_mode == "max" else "minimize"
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction=direction)
        study.set_user_attr("experiment", exp.name())
        study.set_user_attr("objective", exp.select_metric)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    recorded = _study_attr(study, storage, "experiment", True), _study_attr(study, storage, "objective", True)
    if recorded != (exp.name(), exp.select_metric) or study.direction.name.lower() != direction:
        raise ConfigError(f"--study {name}: the study was created for experiment {recorded[0]!r} optimising "
                          f"{recorded[1]!r} ({study.direction.name.lower()}), not {exp.name()!r} "
                          f"{exp.select_metric!r} ({direction}); choose another --study name")
    return study, False


def _study_attr(study: optuna.Study, storage, key: str, wait: bool) -> str | None:
    """A study attribute that the driver which created the study sets right after creating it. A driver that
    joined at the same moment waits briefly for it, so that concurrent workers share one parent run."""
    deadline = time.time() + (30 if wait else 0)
    while True:
        value = optuna.load_study(study_name=study.study_name, storage=storage).user_attrs.get(key)
        if value or time.time() >= deadline:
            return value
        time.sleep(1)


def run_sweep(cfg: SweepConfig) -> dict:
    cls = load_class(cfg.experiment)
    exp = apply_overrides(cls, cfg.overrides, sweep=True)
    if type(exp).search_space is Experiment.search_space:
        exp.search_space(None)  # raises the error that says how to declare one
    url = cfg.storage or default_storage()
    storage = make_storage(url, cfg.heartbeat_s, _on_stale_trial)
    pruner_args = dict(kind=cfg.pruner, warmup_steps=cfg.warmup_steps, startup_trials=cfg.startup_trials,
                       eval_every=exp.eval_every, max_steps=exp.max_steps)
    pruner = make_pruner(**pruner_args)
    fixed, _ = parse_overrides(cls, cfg.overrides)
    # Fields fixed on the command line keep their value when the search space suggests them too.
    sampler = optuna.samplers.PartialFixedSampler(fixed, optuna.samplers.TPESampler(seed=cfg.seed))
    study, created = _open_study(cfg, exp, storage, sampler, pruner)
    shown_url = display_url(url)
    print(f"[sweep] study '{study.study_name}' in {shown_url}: {'created' if created else 'resumed'}, "
          f"{len(study.trials)} trials so far; objective {exp.select_metric} ({study.direction.name.lower()}), "
          f"pruner {cfg.pruner}", flush=True)
    params = {"sweep.study": study.study_name, "sweep.storage": shown_url, "sweep.pruner": cfg.pruner,
              "sweep.warmup_steps": cfg.warmup_steps, "sweep.startup_trials": cfg.startup_trials,
              "sweep.objective": exp.select_metric, **exp.params()}
    tags = {"optuna.study": study.study_name, "optuna.storage": shown_url, "sweep.role": "parent",
            "sweep.overrides": " ".join(cfg.overrides)}
    with mlflow_run(exp.name(), params, tags, run_name=f"sweep-{study.study_name}",
                    resume_run_id=_study_attr(study, storage, PARENT_RUN_ATTR, wait=not created)) as parent, \
            tempfile.TemporaryDirectory(prefix="sweep-") as scratch:
        study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
        print(f"[mlflow] parent run {parent.run_id} at {tracking_uri()}", flush=True)
        objective = _TrialLauncher(exp, cfg.overrides, url, pruner_args, parent.run_id, Path(scratch))
        callbacks = []
        if cfg.total_trials is not None:
            callbacks.append(optuna.study.MaxTrialsCallback(
                cfg.total_trials, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)))
        study.optimize(objective, n_trials=cfg.trials, timeout=cfg.timeout_s, catch=(TrialFailed,),
                       callbacks=callbacks)
        from harness.sweeps.report import log_study

        summary = log_study(study, parent)
    return {"study": study.study_name, "storage": shown_url, "mlflow_parent_run_id": parent.run_id, **summary}


class _TrialLauncher:
    """The objective Optuna calls: sample the fields, run the trial in a fresh process, return its value."""

    def __init__(self, exp: Experiment, fixed: list[str], storage_url: str, pruner_args: dict, parent_run_id: str,
                 scratch: Path):
        self.exp = exp
        self.fixed = fixed
        self.storage_url = storage_url
        self.pruner_args = pruner_args
        self.parent_run_id = parent_run_id
        self.scratch = scratch

    def __call__(self, trial: optuna.Trial) -> float:
        overrides = trial_overrides(self.exp, self.fixed, self.exp.search_space(trial))
        result_path = self.scratch / f"trial-{trial.number}.json"
        spec = {"experiment": self.exp.name(), "overrides": overrides, "storage": self.storage_url,
                "study": trial.study.study_name, "trial_id": trial._trial_id, "trial_number": trial.number,
                "pruner": self.pruner_args, "parent_run_id": self.parent_run_id, "result": str(result_path)}
        spec_path = self.scratch / f"trial-{trial.number}.spec.json"
        spec_path.write_text(json.dumps(spec))
        tuned = " ".join(overrides[len(self.fixed):])
        print(f"\n[sweep] trial {trial.number}: {tuned}", flush=True)
        code = subprocess.run([sys.executable, "-m", "harness", "trial", str(spec_path)], cwd=REPO_ROOT).returncode
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
        run = existing_run(result["run_id"]) if "run_id" in result else None
        if code != 0 or "value" not in result:
            if run is not None:
                run.fail_if_running()
                run.set_tags({"optuna.trial.state": "FAIL"})
            print(f"[sweep] trial {trial.number}: FAIL (process exit code {code})", flush=True)
            raise TrialFailed(f"trial {trial.number}: the trial process exited with code {code} and no result")
        trial.set_user_attr("steps_trained", result["steps_trained"])
        state = "PRUNED" if result["pruned"] else "COMPLETE"
        run.set_tags({"optuna.trial.state": state})
        run.log_metrics({"sweep/objective": result["value"]}, result["step"])
        print(f"[sweep] trial {trial.number}: {state} {self.exp.select_metric}={result['value']:.4f} "
              f"at step {result['step']} ({result['steps_trained']}/{self.exp.max_steps} steps)", flush=True)
        if result["pruned"]:
            raise optuna.TrialPruned(f"pruned at step {result['step']}")
        return result["value"]
