"""Periodic checkpoints and `resume=RUN_ID`: continuing a run killed at any point from its last complete checkpoint,
in the same MLflow run, with each eval step and each train step logged once.

A checkpoint is the trainer's own `checkpoint-N` directory (weights or adapter, optimizer, scheduler, RNG, trainer
state with the step). The trainer writes it in place, so a kill while saving leaves a half-written one: a directory
counts as complete only once CheckpointKeeper has written COMPLETE into it, after the trainer wrote every file
(transformers calls on_save after _save_checkpoint returns). Incomplete ones are never resumed from.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from harness.core.errors import ConfigError
from harness.training.experiment import Experiment
from harness.training.inloop import EvalReport
from harness.training.overrides import _evaluator_option, apply_overrides, field_types
from harness.training.tracking import queries
from harness.training.tracking.store import shown_tracking_uri
from harness.training.tracking.tracker import Tracker

COMPLETE = "COMPLETE"  # the marker file, written last
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


def mark_complete(checkpoint: Path, step: int) -> None:
    """Writes the marker atomically (temporary name, fsync, rename), so it exists only whole."""
    tmp = checkpoint / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        json.dump({"step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / COMPLETE)


class CheckpointKeeper(TrainerCallback):
    """After each periodic save: marks the new checkpoint complete, then keeps the newest `limit` complete ones and
    deletes the older ones (the trainer's own save_total_limit is off: it would delete the previous complete
    checkpoint before the new one is marked, leaving a window with none)."""

    def __init__(self, limit: int):
        self.limit = limit

    def on_save(self, args, state, control, **kwargs):
        directory = Path(args.output_dir)
        saved = directory / f"checkpoint-{state.global_step}"
        if saved.is_dir():
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
    resume = next(v for k, _, v in (o.partition("=") for o in overrides) if k == "resume")
    given = [o for o in overrides if o.partition("=")[0] != "resume"]
    run = resolve_run(cls.name(), resume)
    types = field_types(cls)
    known = [f"{k}={v}" for k, v in run.params.items()
             if k != "resume" and (k in types or _evaluator_option(k) is not None)]
    exp = apply_overrides(cls, [*known, *given, f"resume={run.run_id}"], launch=launch)
    check_same_config(exp, run.params)
    return exp


def check_same_config(exp: Experiment, run_params: dict[str, str]) -> None:
    """Refuses a resume whose configuration differs from the run's params (`resume` itself aside)."""
    changed = [(k, run_params[k], _param(v)) for k, v in exp.params().items()
               if k != "resume" and k in run_params and run_params[k] != _param(v)]
    if changed:
        diff = ", ".join(f"{k}={new!r} (the run has {old!r})" for k, old, new in changed)
        raise ConfigError(f"resume={exp.resume}: {diff}. A resumed run continues with the configuration it was "
                          "started with: drop these overrides, or start a new run")


@dataclass
class ResumeState:
    checkpoint: Path | None  # the checkpoint the trainer resumes from; None = from step 0
    eval_steps: set[int]  # steps already evaluated and logged
    reports: list[EvalReport]  # their reports (tables of the first and last only), for the summary
    train_logged_through: int  # the last step train/* metrics were logged at; -1 = none


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
    return ResumeState(checkpoint, set(steps), reports, logged)


def restore_best(best, directory: Path) -> None:
    """The best checkpoint's step and value from its selection.json, so later evaluations compete with it."""
    selection = directory / "selection.json"
    if selection.is_file():
        data = json.loads(selection.read_text())
        best.step, best.value = data["step"], data["value"]

