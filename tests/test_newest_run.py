""""The newest run" has one resolver (tracking/queries.py newest_run) and each use its own rule: `run:latest:X` as a
model (model=, reward_model=, export, serve/chat/sample by experiment name) takes the newest FINISHED run with a
complete best checkpoint; `resume=latest` the newest run that is not FINISHED. Runs that a use passes over are
named, with why, on a `[latest]` line. On a real SQLite store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.commands.model_ref import resolve_ref
from harness.core.errors import ConfigError
from harness.training import lineage
from harness.training.resume import resolve_run
from harness.training.tracking import queries


def _run(client: MlflowClient, experiment_id: str, start: int, status: str, best: Path | None) -> str:
    run_id = client.create_run(experiment_id, start_time=start).info.run_id
    client.log_param(run_id, "output_dir", str(best.parent.parent if best else "nowhere"))
    if best is not None:
        best.mkdir(parents=True)
        (best / "selection.json").write_text(json.dumps({"metric": "eval/rouge/rougeL", "mode": "max", "step": start,
                                                         "value": 70.0}))
        client.set_tag(run_id, "best_checkpoint", str(best))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A store file MLflow created at its current schema (its migrations take seconds: made once, copied)."""
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}")
    return path


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch) -> tuple[MlflowClient, dict[str, str]]:
    """sft_qwen's runs, oldest first: finished with a best checkpoint, killed with one, finished without one,
    failed without one (the newest)."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(queries, "SEARCH_PAGE", 2)  # the search goes past its first page
    client = MlflowClient(uri)
    exp = client.create_experiment("sft_qwen")
    runs = {"finished": _run(client, exp, 1000, "FINISHED", tmp_path / "a" / "best"),
            "killed": _run(client, exp, 2000, "KILLED", tmp_path / "b" / "best"),
            "no_best": _run(client, exp, 3000, "FINISHED", None),
            "failed": _run(client, exp, 4000, "FAILED", None)}
    return client, runs


def test_a_model_is_the_newest_finished_run_with_a_best_checkpoint(store, tmp_path, capsys):
    _, runs = store
    found = lineage.find_checkpoint("run:latest:sft_qwen")
    assert (found.run_id, found.path, found.step) == (runs["finished"], tmp_path / "a" / "best", 1000)
    out = capsys.readouterr().out
    assert (f"[latest] run:latest:sft_qwen: run {runs['finished']} (FINISHED); skipped newer run(s) of 'sft_qwen': "
            f"{runs['failed']} (FAILED: not FINISHED; name it as run:{runs['failed']} to use its best checkpoint "
            f"anyway); {runs['no_best']} (FINISHED: no best checkpoint in ") in out
    assert f"{runs['killed']} (KILLED: not FINISHED; name it as run:{runs['killed']}" in out
    # an experiment's name as a model (serve, chat, sample) is the same reference
    assert resolve_ref("sft_qwen").run_id == runs["finished"]
    # named by its id, a killed run's best checkpoint is used as asked
    assert lineage.find_checkpoint(f"run:{runs['killed']}").path == tmp_path / "b" / "best"


def test_resume_latest_takes_the_newest_run_that_is_not_finished(store, capsys):
    client, runs = store
    assert resolve_run("sft_qwen", "latest").run_id == runs["failed"]  # a crashed run is what resume is for
    assert "[latest]" not in capsys.readouterr().out  # the newest run itself: nothing passed over
    client.set_terminated(runs["failed"], "FINISHED")
    assert resolve_run("sft_qwen", "latest").run_id == runs["killed"]
    out = capsys.readouterr().out
    assert (f"[latest] resume=latest: run {runs['killed']} (KILLED); skipped newer run(s) of 'sft_qwen': "
            f"{runs['failed']} (FINISHED: already FINISHED; start a new run instead); {runs['no_best']} (FINISHED: "
            "already FINISHED") in out


def test_no_run_that_will_do_is_refused_naming_each(store):
    client, runs = store
    client.set_terminated(runs["failed"], "FINISHED")
    client.set_terminated(runs["killed"], "FINISHED")
    with pytest.raises(ConfigError, match=rf"resume=latest: no run of the MLflow experiment 'sft_qwen' in sqlite:.* "
                                          rf"will do: {runs['failed']} \(FINISHED: already FINISHED; start a new run "
                                          rf"instead\); {runs['no_best']} .*{runs['killed']} .*{runs['finished']}"):
        resolve_run("sft_qwen", "latest")
    running = client.create_experiment("dpo_qwen")
    run_id = _run(client, running, 1000, "RUNNING", None)
    with pytest.raises(ConfigError, match=rf"run:latest:dpo_qwen: no run .* will do: {run_id} \(RUNNING: not "
                                          "FINISHED"):
        lineage.find_checkpoint("run:latest:dpo_qwen")
    with pytest.raises(ConfigError, match="resume=latest: the MLflow experiment 'simpo_qwen' has no run in sqlite:"):
        resolve_run("simpo_qwen", "latest")
