"""Sweeps under faults, on the harness's own study code (harness.sweeps.storage): workers SIGKILLed and a PostgreSQL
restart (the `sweep_scale` bench part's fault run, on a fresh cluster), a driver killed the moment its trial is
created, and `--total-trials` counting results."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from harness.commands.bench.sweep_scale import fault_run, postgres_cluster
from harness.paths import REPO_ROOT
from harness.sweeps.storage import DRIVER_ATTR, fail_lost_trials, make_storage, stop_at


@pytest.mark.slow
def test_killed_workers_and_a_postgres_restart_leave_every_trial_ended_once(tmp_path):
    """4 workers until 12 results; 3 of them SIGKILLed at seeded random moments (each replaced), the server
    restarted at 6 results. Which trials fail depends on timing; what every trial ends as does not."""
    with postgres_cluster() as s:
        r = fault_run(s, tmp_path, seed=0, workers=4, target=12, kills=3)
    print(r)  # shown when an assertion fails
    assert r["kills"] == 3 and r["restarts"] == 1 and r["workers_started"] == 7
    assert r["survivors_ok"] == 4  # every worker not killed rode out the restart and exited 0
    # every trial ended once: nothing RUNNING or WAITING, numbers 0..n-1 each once, none started twice or lost
    assert set(r["states"]) <= {"COMPLETE", "PRUNED", "FAIL"}
    assert r["duplicate_numbers"] == r["missing_numbers"] == r["claim_conflicts"] == r["lost"] == 0
    assert r["end_mismatches"] == 0  # no trial ended otherwise than the (live) worker that ran it saw
    results = r["states"].get("COMPLETE", 0) + r["states"].get("PRUNED", 0)
    assert 12 <= results < 12 + r["workers_started"]  # a killed worker's trial does not count toward the total
    fails = r["states"].get("FAIL", 0)
    assert fails == r["fails_by_killed_workers"] <= r["kills"]  # only a killed worker's trial failed
    assert r["unstarted"] <= fails  # a trial whose worker died before it started is one of those
    # MLflow: no run left RUNNING; one run per trial at most, and each result has its run
    assert "RUNNING" not in r["mlflow_runs"]
    assert r["runs_per_trial_max"] == 1 and r["finished_trials_without_run"] == 0
    assert r["mlflow_runs"].get("FINISHED", 0) >= results + 1  # and the parent run


@pytest.mark.slow
def test_a_driver_killed_as_its_trial_is_created_leaves_it_findable(tmp_path):
    """Killed right after `study.ask`, before Optuna's heartbeat thread beat once: the trial was born with its driver
    and a heartbeat, so the next driver fails it at once (same machine) or once the beat is stale (any machine)."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="born", storage=make_storage(url))
    child = subprocess.run(
        [sys.executable, "-c", "import os, signal, optuna; from harness.sweeps.storage import make_storage; "
         f"optuna.load_study(study_name='born', storage=make_storage({url!r}, 1)).ask(); "
         "os.kill(os.getpid(), signal.SIGKILL)"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    storage = make_storage(url, 1)
    study = optuna.load_study(study_name="born", storage=storage)
    (trial,) = study.get_trials()
    assert trial.state == TrialState.RUNNING and trial.user_attrs[DRIVER_ATTR]["pid"] != os.getpid()
    # another machine knows the driver only by its beat: stale once 4 beats of 1 s have passed since the birth
    time.sleep(5.5)  # SQLite keeps whole seconds
    assert storage._get_stale_trial_ids(study._study_id) == [trial._trial_id]
    fail_lost_trials(study)
    assert study.get_trials()[0].state == TrialState.FAIL


def test_total_trials_counts_results_and_stops_on_as_many_failures(tmp_path):
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="total", storage=storage)
    for _ in range(2):  # a killed worker's trials: they do not count toward the total
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    study.optimize(lambda trial: 1.0, callbacks=stop_at(3))
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]

    def crashes(trial):
        raise ValueError("a setting that always crashes")

    crashing = optuna.create_study(study_name="crashing", storage=storage)
    crashing.optimize(crashes, callbacks=stop_at(3), catch=(ValueError,))
    assert [t.state.name for t in crashing.get_trials()] == ["FAIL"] * 3
