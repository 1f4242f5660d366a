"""What a run carries outside the trainer survives a resume: each checkpoint saves the pairwise judge's step-0 answers
(per eval set) and early stopping's best value and count in harness_state.json, before its COMPLETE marker; a
SIGKILLed run resumed from it judges and stops as the uninterrupted run does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from judge_fault_server import FaultServer

from harness.core.errors import ConfigError
from harness.paths import DATA_DIR, REPO_ROOT
from harness.training.early_stop import EarlyStop
from harness.training.inloop import EvalReport
from harness.training.resume import (
    COMPLETE,
    STATE_FILE,
    CheckpointKeeper,
    ResumeState,
    check_restorable,
    mark_complete,
    restore_state,
    stateful_parts,
)

METRIC = "eval/rouge/rougeL"


class _Stateful:
    """An evaluator that carries state (as the pairwise judge does), without a judge server."""

    name = "judge"

    def __init__(self, state: dict | None):
        self.state = state

    def state_dict(self) -> dict | None:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def _stop(values: list[float]) -> EarlyStop:
    stop = EarlyStop(METRIC, "max", 3)
    for step, value in enumerate(values):
        stop(EvalReport(step, {METRIC: value}, {}, {}), None)
    return stop


def test_a_checkpoint_saves_the_state_before_its_marker_and_a_resume_restores_it(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "checkpoint-2").mkdir(parents=True)
    judge, stop = _Stateful({"baselines": {"a": ["x"], "b": ["y", "z"]}}), _stop([0.5, 0.4, 0.3])
    parts = stateful_parts([judge, _Stateful(None)], stop)  # an evaluator without state is not saved
    assert list(parts) == ["evaluator/judge", "early_stop"]
    CheckpointKeeper(2, parts).on_save(SimpleNamespace(output_dir=str(ckpts)), SimpleNamespace(global_step=2), None)
    saved = json.loads((ckpts / "checkpoint-2" / STATE_FILE).read_text())
    assert saved == {"step": 2, "state": {"evaluator/judge": {"baselines": {"a": ["x"], "b": ["y", "z"]}},
                                          "early_stop": {"best": 0.5, "best_step": 0, "since_best": 2}}}
    assert (ckpts / "checkpoint-2" / COMPLETE).is_file()

    # the resumed parts start empty; MLflow has evaluations up to step 3, logged after checkpoint-2 was saved
    judge2, stop2 = _Stateful({"baselines": {}}), EarlyStop(METRIC, "max", 3)
    reports = [EvalReport(s, {METRIC: v}, {}, {}) for s, v in enumerate([0.5, 0.4, 0.3, 0.45])]
    resumed = ResumeState(ckpts / "checkpoint-2", {0, 1, 2, 3}, reports, 3, saved["state"], saved["step"])
    restore_state(resumed, stateful_parts([judge2], stop2), [stop2])
    assert judge2.state == judge.state
    # the checkpoint's count, plus step 3 replayed (not evaluated again): as the uninterrupted run counted
    assert (stop2.best, stop2.best_step, stop2.since_best) == (0.5, 0, 3)

    # no saved state (no checkpoint, or one of an older harness): early stopping replays every logged evaluation
    stop3 = EarlyStop(METRIC, "max", 3)
    restore_state(ResumeState(None, {0, 1, 2, 3}, reports, 3, {}, -1), {"early_stop": stop3}, [stop3])
    assert (stop3.best, stop3.best_step, stop3.since_best) == (0.5, 0, 3)


def test_a_resume_without_the_judges_saved_state_is_refused_before_the_run_opens(tmp_path):
    ckpts = tmp_path / "checkpoints"
    judge = _Stateful({"baselines": {}})
    with pytest.raises(ConfigError, match=r"no complete checkpoint under .*checkpoints \(save_every=0, or killed "
                                          r"before the first save\).*judge.*start a new run"):
        check_restorable(ckpts, [judge])
    (ckpts / "checkpoint-4").mkdir(parents=True)
    mark_complete(ckpts / "checkpoint-4", 4)  # as an older harness left it: no state file
    with pytest.raises(ConfigError, match=rf"checkpoint-4/{STATE_FILE} does not exist \(written by a harness that "
                                          r"did not save evaluator state\)"):
        check_restorable(ckpts, [judge])
    check_restorable(ckpts, [_Stateful(None)])  # nothing to restore: resumable as before
    (ckpts / "checkpoint-4" / STATE_FILE).write_text('{"step": 4, "state": {}}')
    check_restorable(ckpts, [judge])


# ---- the whole run: SIGKILLed after a checkpoint, resumed ----

def _judge_run(server: FaultServer, tmp_path: Path) -> list[str]:
    """sft_qwen judged pairwise by the test server's "longer" judge (the longer answer wins) on two named sets of
    different sizes; early stopping on the judge's score, which that judge keeps at 7: no evaluation after step 0
    improves on it, so patience 4 stops the run at step 4, after the checkpoint the killed run resumes from."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join((DATA_DIR / "eval.jsonl").read_text(encoding="utf-8").splitlines(True)[10:13]),
                     encoding="utf-8")
    return ["run", "sft_qwen", "backend=hf", "max_steps=8", "eval_every=1", "save_every=2", "eval_limit=4",
            "max_new_tokens=8", "max_length=64", "batch_size=2", "learning_rate=1e-3", "evaluators=judge",
            f"judge_base_url={server.base_url}", "judge_model=longer", "judge_cache=false",
            f"eval_data=big:{DATA_DIR / 'eval.jsonl'},small:{small}", "select_metric=eval/big/judge/score",
            "early_stop_patience=4"]


WIN_RATES = ("eval/big/judge/win_rate", "eval/small/judge/win_rate")


def _history(client, run_id: str) -> dict[str, dict[int, float]]:
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
            for k in (*WIN_RATES, "eval/big/judge/score")}


@pytest.mark.slow
def test_a_sigkilled_pairwise_judge_run_resumes_with_the_same_win_rates_and_early_stop(tmp_path, monkeypatch,
                                                                                     capsys):
    from mlflow.tracking import MlflowClient

    from harness.commands.cli import main

    server = FaultServer()
    args = _judge_run(server, tmp_path)
    python = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv").exists() else sys.executable

    # killed: a process of its own, SIGKILLed once checkpoint-2 is complete (step 4 is where it would stop)
    uri = f"sqlite:///{tmp_path / 'killed.db'}"
    out = tmp_path / "killed"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([python, "-m", "harness", *args, f"output_dir={out}"], cwd=REPO_ROOT,
                                env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 400
        while not (marker := next(out.glob(f"sft_qwen/*/checkpoints/checkpoint-2/{COMPLETE}"), None)) and \
                proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    assert marker is not None and proc.returncode == -9, (tmp_path / "killed.log").read_text()[-3000:]
    run_id = marker.parent.parent.parent.name
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["run", "sft_qwen", f"resume={run_id}"]) == 0
    resumed_out = capsys.readouterr().out
    assert "continuing from checkpoint-2" in resumed_out
    killed = MlflowClient(uri)

    # uninterrupted, in this process
    uri = f"sqlite:///{tmp_path / 'whole.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main([*args, f"output_dir={tmp_path / 'whole'}"]) == 0
    whole = MlflowClient(uri)
    (whole_run,) = whole.search_runs([whole.get_experiment_by_name("sft_qwen").experiment_id])
    server.close()

    expected = _history(whole, whole_run.info.run_id)
    assert all(set(expected[k]) == {1, 2, 3, 4} for k in WIN_RATES)  # each set against its own step-0 answers
    # the answers moved away from step 0's (not all ties, 50), so which answers are the baseline matters
    assert {expected[k][3] for k in WIN_RATES} != {50.0}
    assert _history(killed, run_id) == expected
    assert whole_run.data.tags["early_stopped_at"] == killed.get_run(run_id).data.tags["early_stopped_at"] == "4"
    assert "[early stop] step 4: eval/big/judge/score has not improved on 7.0000 (step 0) for 4" in resumed_out
