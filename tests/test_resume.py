"""Periodic checkpoints and `resume=RUN_ID`: a run SIGKILLed mid-training continues from its last complete
checkpoint in the same MLflow run, each eval step and train step logged once; half-written checkpoints are never
resumed from; a resume with another configuration is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from experiments.sft_qwen import SftQwen
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.training import resume as resume_mod
from harness.training.resume import (
    COMPLETE,
    CheckpointKeeper,
    check_same_config,
    claim_run_dir,
    discard_incomplete,
    last_complete,
    mark_complete,
    resumed_experiment,
)
from harness.training.tracking import queries

RUN = ["run", "sft_qwen", "backend=hf", "max_steps=8", "eval_every=2", "save_every=2", "eval_limit=4",
       "max_new_tokens=4", "max_length=64", "batch_size=2"]


def _checkpoint(directory: Path, step: int, complete: bool) -> Path:
    path = directory / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(f'{{"global_step": {step}')  # cut short, as a kill leaves it
    if complete:
        mark_complete(path, step)
    return path


def test_only_a_checkpoint_marked_complete_is_resumed_from_and_rotation_keeps_the_newest(tmp_path):
    ckpts = tmp_path / "checkpoints"
    assert last_complete(ckpts) is None  # no directory yet: a resume starts from step 0
    _checkpoint(ckpts, 2, True)
    _checkpoint(ckpts, 4, True)
    half = _checkpoint(ckpts, 6, False)  # killed while the trainer wrote it: files there, no marker
    assert last_complete(ckpts) == ckpts / "checkpoint-4"
    assert discard_incomplete(ckpts) == [half] and not half.exists()
    # the keeper marks what the trainer just saved, then keeps the newest `limit` complete ones
    _checkpoint(ckpts, 8, False)
    CheckpointKeeper(limit=2).on_save(SimpleNamespace(output_dir=str(ckpts)), SimpleNamespace(global_step=8), None)
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-4", "checkpoint-8"]
    assert json.loads((ckpts / "checkpoint-8" / COMPLETE).read_text()) == {"step": 8}


def test_a_run_directory_is_held_by_one_process(tmp_path):
    held = claim_run_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match="another process is running this run"):
        claim_run_dir(tmp_path / "run")
    held.close()
    claim_run_dir(tmp_path / "run").close()


@pytest.fixture
def stored_run(monkeypatch):
    """A run of sft_qwen as the store would hold it (params as mlflow_run logs them), without a store."""
    params = {k: v if isinstance(v, str) else json.dumps(v)
              for k, v in SftQwen(max_steps=8, eval_every=2, save_every=2).params().items()}
    state = queries.RunState("abc123", "sft_qwen", "KILLED", params)
    monkeypatch.setattr(queries, "run_state", lambda run_id: state if run_id == "abc123" else None)
    monkeypatch.setattr(queries, "newest_run", lambda name, refusal, ref: state)
    return state


def test_resume_takes_the_runs_configuration_and_refuses_a_different_one(stored_run):
    exp = resumed_experiment(SftQwen, ["resume=latest"])
    assert (exp.resume, exp.max_steps, exp.eval_every, exp.save_every) == ("abc123", 8, 2, 2)
    assert resumed_experiment(SftQwen, ["resume=abc123", "max_steps=8"]).max_steps == 8  # the same value: fine
    with pytest.raises(ConfigError, match=r"max_steps='10' \(the run has '8'\).*start a new run"):
        resumed_experiment(SftQwen, ["resume=abc123", "max_steps=10"])
    with pytest.raises(ConfigError, match="no run nope"):
        resumed_experiment(SftQwen, ["resume=nope"])
    with pytest.raises(ConfigError, match="learning_rate"):
        check_same_config(SftQwen(max_steps=8, eval_every=2, save_every=2, learning_rate=1.0, resume="abc123"),
                          stored_run.params)


def test_a_finished_run_is_not_resumed(stored_run, monkeypatch):
    finished = queries.RunState("abc123", "sft_qwen", "FINISHED", stored_run.params)
    monkeypatch.setattr(queries, "run_state", lambda run_id: finished)
    with pytest.raises(ConfigError, match="already FINISHED"):
        resume_mod.resolve_run("sft_qwen", "abc123")


def _complete_beyond(out: Path, step: int) -> Path | None:
    for marker in out.glob(f"sft_qwen/*/checkpoints/checkpoint-*/{COMPLETE}"):
        if int(marker.parent.name.rsplit("-", 1)[1]) > step:
            return marker.parent
    return None


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_a_sigkilled_run_resumes_in_the_same_mlflow_run_with_each_step_once(tmp_path, peft, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from harness.commands.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "out"
    python = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").exists() else sys.executable
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([python, "-m", "harness", *RUN, f"peft={peft}", f"output_dir={out}"], cwd=REPO_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 400
    while (checkpoint := _complete_beyond(out, 2)) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, the MLflow run stays RUNNING
    proc.wait()
    log.close()
    assert checkpoint is not None, (tmp_path / "first.log").read_text()[-3000:]
    run_dir = checkpoint.parent.parent
    run_id = run_dir.name
    client = MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    _checkpoint(run_dir / "checkpoints", 99, False)  # as if killed while saving: never resumed from

    # the resume through the CLI's entry point in this process: only the killed run needs a process of its own
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = main(["run", "sft_qwen", f"resume={run_id}"])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert proc.returncode == -9  # killed mid-run, not finished before the kill
    assert "continuing from checkpoint-" in stdout and "checkpoint-99 was half-written" in stdout
    assert "[eval] step 0:" not in stdout  # the baseline is in MLflow already: not evaluated again
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1  # continued, not a new run
    for key in ("eval/rouge/rougeL", "eval/time/total_s"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [0, 2, 4, 6, 8], key
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 9))
    assert (run_dir / "best" / "selection.json").is_file()
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-6",
                                                                                         "checkpoint-8"]
