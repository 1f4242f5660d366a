"""Periodic checkpoints and `resume=RUN_ID`: continuing a run killed at any point from its last complete checkpoint,
in the same MLflow run, with each eval step and each train step logged once.

A checkpoint is the trainer's own `checkpoint-N` directory (weights or adapter, optimizer, scheduler, RNG, trainer
state with the step). The trainer writes it in place, so a kill while saving leaves a half-written one: a directory
counts as complete only once CheckpointKeeper has written COMPLETE into it, after the trainer wrote every file
(transformers calls on_save after _save_checkpoint returns). Incomplete ones are never resumed from.

What the run carries outside the trainer goes into the same directory, before the marker: STATE_FILE holds the
state of every stateful evaluator (the pairwise judge's step-0 answers, per eval set) and of early stopping.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from transformers import TrainerCallback

from harness.core import ranks
from harness.core.errors import ConfigError
from harness.training import distributed
from harness.training.experiment import Experiment
from harness.training.inloop import EvalReport
from harness.training.overrides import _evaluator_option, apply_overrides, field_types
from harness.training.tracking import queries
from harness.training.tracking.store import shown_tracking_uri
from harness.training.tracking.tracker import Tracker

COMPLETE = "COMPLETE"  # the marker file, written last
STATE_FILE = "harness_state.json"  # evaluator and early-stopping state, written just before the marker
CHECKPOINT = re.compile(r"checkpoint-(\d+)$")


def checkpoints(directory: Path) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoint-N directory under `directory`, in step order."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [(step, p, (p / COMPLETE).is_file()) for step, p in sorted(found)]


def last_complete(directory: Path) -> Path | None:
    """The newest complete checkpoint under `directory`, or None."""
    complete = [p for _, p, ok in checkpoints(directory) if ok]
    return complete[-1] if complete else None


def discard_incomplete(directory: Path) -> list[Path]:
    """Deletes the half-written checkpoints (a kill while saving); returns them."""
    gone = [p for _, p, ok in checkpoints(directory) if not ok]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _write_json_atomically(path: Path, obj) -> None:
    """Temporary name, fsync, rename: the file exists only whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(checkpoint: Path, step: int) -> None:
    """Writes the marker atomically, so it exists only whole."""
    _write_json_atomically(checkpoint / COMPLETE, {"step": step})


class Stateful(Protocol):
    """A part of the run that carries state from one evaluation to the next (an Evaluator, EarlyStop)."""

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict) -> None: ...


def stateful_parts(evaluators: list, early_stop: Stateful | None = None) -> dict[str, Stateful]:
    """The parts whose state a checkpoint saves, by their key in STATE_FILE: each evaluator that carries state
    (Evaluator.state_dict is not None) and early stopping, when the run has it."""
    parts = {f"evaluator/{e.name}": e for e in evaluators if e.state_dict() is not None}
    if early_stop is not None:
        parts["early_stop"] = early_stop
    return parts


def save_state(checkpoint: Path, step: int, parts: dict[str, Stateful]) -> None:
    """STATE_FILE of a checkpoint: each part's state as of `step`, the checkpoint's step."""
    _write_json_atomically(checkpoint / STATE_FILE,
                           {"step": step, "state": {key: part.state_dict() for key, part in parts.items()}})


class CheckpointKeeper(TrainerCallback):
    """After each periodic save: writes the state of the run's stateful `parts` into it and marks it complete, then
    keeps the newest `limit` complete ones and deletes the older ones (the trainer's own save_total_limit is off: it
    would delete the previous complete checkpoint before the new one is marked, leaving a window with none). In a
    multi-process run every rank has one: all wait until each has written its part of the checkpoint, then rank 0
    alone marks and rotates."""

    def __init__(self, limit: int, parts: dict[str, Stateful] | None = None):
        self.limit = limit
        self.parts = parts or {}

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()
        if not ranks.is_main():
            return
        directory = Path(args.output_dir)
        saved = directory / f"checkpoint-{state.global_step}"
        if saved.is_dir():
            save_state(saved, state.global_step, self.parts)
            mark_complete(saved, state.global_step)
        complete = [p for _, p, ok in checkpoints(directory) if ok]
        for old in complete[: -self.limit]:
            shutil.rmtree(old, ignore_errors=True)


def claim_run_dir(out_dir: Path):
    """An exclusive lock on OUTPUT_DIR/NAME/RUN_ID/run.lock for as long as the returned file is open (the OS drops
    it when the process dies, SIGKILL included): a resume of a run whose process is still alive is refused."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / "run.lock", "a")  # noqa: SIM115 (held open for the run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"{out_dir}: another process is running this run (it holds run.lock); wait for it or stop "
                          "it before resuming") from None
    return f


def _param(value) -> str:
    """A value as MLflow holds the run's params (see tracking.runs.mlflow_run)."""
    return value if isinstance(value, str) else json.dumps(value)


def _not_resumable(state: queries.RunState) -> str | None:
    """Why a run cannot be resumed: a FINISHED one is done. RUNNING (its process killed), KILLED and FAILED runs
    continue from their last complete checkpoint; one whose process still lives is refused by its run.lock."""
    return "already FINISHED; start a new run instead" if state.status == "FINISHED" else None


def resolve_run(name: str, resume: str) -> queries.RunState:
    """The run `resume` names (an id, or `latest`: the experiment's newest run that is not FINISHED), checked to be
    resumable."""
    if resume == "latest":
        return queries.newest_run(name, _not_resumable, "resume=latest")
    state = queries.run_state(resume)
    if state is None:
        raise ConfigError(f"resume={resume}: no run {resume} in {shown_tracking_uri()}")
    if state.experiment != name:
        raise ConfigError(f"resume={resume}: run {resume} belongs to experiment '{state.experiment}', not '{name}'")
    if why := _not_resumable(state):
        raise ConfigError(f"resume={resume}: run {resume} {why}")
    return state


def resumed_experiment(cls: type[Experiment], overrides: list[str], launch: str | None = None) -> Experiment:
    """The experiment for `python -m harness run NAME ... resume=RUN_ID|latest`: the run's own configuration (its
    MLflow params) with `resume` set to the run's id. An override that differs from the run's params is refused
    (a resumed run keeps its configuration; MLflow cannot change a param either)."""
    return resumed_config(cls, overrides, launch)[0]


def resumed_config(cls: type[Experiment], overrides: list[str],
                   launch: str | None = None) -> tuple[Experiment, list[str]]:
    """resumed_experiment, and the overrides that build it again: what a launch passes its ranks, which do not look
    the run up themselves."""
    resume = next(v for k, _, v in (o.partition("=") for o in overrides) if k == "resume")
    given = [o for o in overrides if o.partition("=")[0] != "resume"]
    run = resolve_run(cls.name(), resume)
    types = field_types(cls)
    known = [f"{k}={v}" for k, v in run.params.items()
             if k != "resume" and (k in types or _evaluator_option(k) is not None)]
    full = [*known, *given, f"resume={run.run_id}"]
    exp = apply_overrides(cls, full, launch=launch)
    check_same_config(exp, run.params)
    return exp, full


def check_same_config(exp: Experiment, run_params: dict[str, str]) -> None:
    """Refuses a resume whose configuration differs from the run's params (`resume` itself aside)."""
    changed = [(k, run_params[k], _param(v)) for k, v in exp.params().items()
               if k != "resume" and k in run_params and run_params[k] != _param(v)]
    if changed:
        diff = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, old, new in changed)
        raise ConfigError(f"resume={exp.resume}: {diff}. A resumed run continues with the configuration it was "
                          "started with: drop these overrides, or start a new run")


def check_restorable(directory: Path, evaluators: list) -> None:
    """Before a resumed run reopens: a stateful evaluator's state (the pairwise judge's step-0 answers) comes only
    from the checkpoint the run resumes from, the newest complete one under `directory`, so that checkpoint must
    exist and hold STATE_FILE (a checkpoint of an older harness does not). Early stopping needs neither: without
    its saved state it replays the evaluations MLflow has (restore_state)."""
    stateful = [e.name for e in evaluators if e.state_dict() is not None]
    if not stateful:
        return
    checkpoint = last_complete(directory)
    if checkpoint is None:
        why = f"there is no complete checkpoint under {directory} (save_every=0, or killed before the first save)"
    elif not (checkpoint / STATE_FILE).is_file():
        why = f"{checkpoint / STATE_FILE} does not exist (written by a harness that did not save evaluator state)"
    else:
        return
    raise ConfigError(f"resume: {why}, so the state of the evaluator(s) {', '.join(stateful)} (the pairwise judge's "
                      "step-0 answers) cannot be restored and later win rates would be against another baseline; "
                      "start a new run")


@dataclass
class ResumeState:
    checkpoint: Path | None  # the checkpoint the trainer resumes from; None = from step 0
    eval_steps: set[int]  # steps already evaluated and logged
    reports: list[EvalReport]  # their reports (tables of the first and last only), for the summary
    train_logged_through: int  # the last step train/* metrics were logged at; -1 = none
    state: dict[str, dict]  # the checkpoint's STATE_FILE: part key -> its state; {} = none saved
    state_step: int  # the step that state is as of; -1 = none


def restore_state(resumed: ResumeState, parts: dict[str, Stateful],
                  listeners: list[Callable[[EvalReport, object], None]]) -> None:
    """Gives each part its state saved with the checkpoint, then replays to `listeners` (early stopping) the reports
    MLflow has from after that step: a run killed after logging an evaluation but before the next checkpoint does
    not evaluate that step again, yet the uninterrupted run's early stopping counted it. Without a saved state they
    are all replayed, the step-0 baseline included."""
    for key, part in parts.items():
        if key in resumed.state:
            part.load_state_dict(resumed.state[key])
    for report in resumed.reports:
        if report.step > resumed.state_step:
            for listener in listeners:
                listener(report, None)


def load_resume(tracker: Tracker, out_dir: Path) -> ResumeState:
    """What a resumed run continues from: its last complete checkpoint (half-written ones are deleted), the eval
    steps and train steps MLflow already has."""
    ckpt_dir = out_dir / "checkpoints"
    for gone in discard_incomplete(ckpt_dir):
        print(f"[resume] {gone.name} was half-written (killed while saving): deleted", flush=True)
    checkpoint = last_complete(ckpt_dir)
    evals = tracker.histories("eval/")
    steps = sorted({s for s, _ in evals.get("eval/time/total_s", [])})
    reports = []
    for i, step in enumerate(steps):
        metrics = {k: v for k, hist in evals.items() for s, v in hist if s == step}
        table = ((queries.load_table(tracker.run_id, f"eval_samples/step_{step:06d}.json") or {})
                 if i in (0, len(steps) - 1) else {})
        reports.append(EvalReport(step, metrics, table, {}))
    losses = tracker.histories("train/")
    logged = max((s for hist in losses.values() for s, _ in hist), default=-1)
    where = f"{checkpoint.name}" if checkpoint else "step 0 (no complete checkpoint)"
    print(f"[resume] run {tracker.run_id}: continuing from {where}; evaluated before at steps "
          f"{', '.join(map(str, steps)) or 'none'} (not evaluated again)", flush=True)
    saved = json.loads((checkpoint / STATE_FILE).read_text()) if checkpoint and (checkpoint / STATE_FILE).is_file() \
        else {"step": -1, "state": {}}
    return ResumeState(checkpoint, set(steps), reports, logged, saved["state"], saved["step"])


def restore_best(best, directory: Path) -> None:
    """The best checkpoint's step and value from its selection.json, so later evaluations compete with it."""
    selection = directory / "selection.json"
    if selection.is_file():
        data = json.loads(selection.read_text())
        best.step, best.value = data["step"], data["value"]
