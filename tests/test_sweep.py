"""Sweeps: `python -m harness sweep` against a real SQLite Optuna storage and MLflow store, its trials in their own
processes; the driver too where a test signals or kills it (elsewhere it runs in this process: `sweep_here`)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from experiments import load_class
from harness.commands.cli import main
from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.sweeps.study import (
    TRIAL_PID_ATTR,
    SweepConfig,
    _Signals,
    _TrialLauncher,
    display_url,
    fail_trial,
    make_storage,
    run_sweep,
    trial_overrides,
)

EXTRA = str(Path(__file__).parent / "experiments_extra")
# Small and fast: 8 eval samples, 8 new tokens. The HF backend skips the vLLM engine start in each trial process
# (vLLM's in-loop path is covered by test_experiment_run); the scripted trials evaluate after every step.
SCRIPTED = ["max_steps=4", "eval_every=1", "eval_limit=8", "max_new_tokens=8", "backend=hf"]


@pytest.fixture
def stores(tmp_path, tiny_model_dir):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONUNBUFFERED": "1",
           "HARNESS_EXPERIMENTS_PATH": EXTRA}
    return env, f"sqlite:///{tmp_path / 'optuna.db'}", MlflowClient(env["MLFLOW_TRACKING_URI"]), tmp_path


@pytest.fixture
def sweep_here(stores, monkeypatch, capsys):
    """`python -m harness sweep` through the CLI's entry point in this process, saving a driver's start (imports)
    where the test sends it no signal; its trials still run in their own processes. Returns the summary it printed
    last and its whole stdout. The signal tests start the driver as a subprocess."""
    env, storage, _, tmp = stores
    for key in ("MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED", "HARNESS_EXPERIMENTS_PATH"):
        monkeypatch.setenv(key, env[key])  # the trial processes inherit them
    import experiments

    # what HARNESS_EXPERIMENTS_PATH does when `experiments` is first imported, for this process
    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, EXTRA])

    def sweep(*args) -> tuple[dict, str]:
        capsys.readouterr()
        code = main(["sweep", *args, f"output_dir={tmp / 'outputs'}", "--storage", storage])
        out, err = capsys.readouterr()
        assert code == 0, out[-2000:] + err[-3000:]
        return json.loads(out.strip().splitlines()[-1]), out

    return sweep


def _runs(client, experiment):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    trials = {int(r.data.tags["optuna.trial.number"]): r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    return parents, trials


def test_sweep_logs_nested_runs_best_params_plots_and_resumes(stores, sweep_here, capsys):
    env, storage, client, tmp = stores
    common = ["simpo_qwen", "max_steps=2", "eval_every=2", "eval_limit=8", "max_new_tokens=8", "beta=3.0", "backend=hf",
              "--seed", "0", "--study", "s1", "--pruner", "none"]
    first, stdout = sweep_here(*common, "--trials", "2")

    study = optuna.load_study(study_name="s1", storage=storage)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    assert all(t.params["beta"] == 3.0 for t in trials)  # fixed by the override, not sampled
    assert all(1e-6 <= t.params["learning_rate"] <= 1e-3 and 0.3 <= t.params["gamma"] <= 2.0 for t in trials)
    assert [sorted(t.intermediate_values) for t in trials] == [[0, 2], [0, 2]]
    best = max(trials, key=lambda t: t.value)
    assert first["study"] == "s1" and first["trials"] == {"COMPLETE": 2} and first["steps_trained"] == 4
    assert first["best_value"] == best.value and first["best_params"] == best.params
    assert first["best_trial"] == best.number

    (parent,), runs = _runs(client, "simpo_qwen")
    assert parent.info.run_id == first["mlflow_parent_run_id"] and parent.info.status == "FINISHED"
    assert sorted(runs) == [0, 1]
    for number, run in runs.items():
        trial = trials[number]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.run_name == f"trial-{number}"
        assert run.data.tags["optuna.trial.state"] == "COMPLETE" and run.info.status == "FINISHED"
        assert float(run.data.params["learning_rate"]) == trial.params["learning_rate"]
        assert float(run.data.params["gamma"]) == trial.params["gamma"] and run.data.params["beta"] == "3.0"
        rouge = client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")
        assert [m.step for m in rouge] == [0, 2] and rouge[-1].value == trial.value
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    tags = parent.data.tags
    assert tags["best.trial"] == str(best.number) and tags["best.run_id"] == runs[best.number].info.run_id
    assert float(tags["best.params.learning_rate"]) == best.params["learning_rate"]
    assert parent.data.metrics["sweep/best_value"] == best.value
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep/plots")}
    assert plots == {f"sweep/plots/{p}.png" for p in
                     ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")}
    summary_path = client.download_artifacts(parent.info.run_id, "sweep/summary.json", str(tmp))
    summary = json.loads(Path(summary_path).read_text())
    assert summary["best_params"] == best.params
    # whether the best is real, from the trials' own tables (tests/test_sweep_report.py checks the numbers)
    assert "paired over the same 8 eval samples" in stdout and f"  verdict: {first['verdict']}" in stdout
    assert tags["sweep.verdict"] == summary["verdict"] == first["verdict"] and tags["sweep.verdict.tests"] == "3"
    assert tags["sweep.runner_up.trial"] == str(1 - best.number) and "sweep.best_vs_baseline.p_holm" in tags
    assert first["verdict"].startswith("the best trial is ")

    second, _ = sweep_here(*common, "--trials", "1")
    assert second["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    assert second["trials"] == {"COMPLETE": 3} and second["steps_trained"] == 6
    (parent,), runs = _runs(client, "simpo_qwen")
    assert parent.data.tags["sweep.verdict.tests"] == "4"  # the third trial joins the family
    assert sorted(runs) == [0, 1, 2] and parent.info.status == "FINISHED"
    assert runs[2].data.tags["mlflow.parentRunId"] == parent.info.run_id

    # harness compare on two of the trial runs: values straight from their metric histories, plot logged to each
    ids = [runs[0].info.run_id, runs[1].info.run_id]
    assert main(["compare", *ids, "--out", str(tmp / "c.png")]) == 0  # test_services runs it as a subprocess
    stdout = capsys.readouterr().out
    line = next(ln for ln in stdout.splitlines() if ln.startswith("eval/rouge/rougeL"))
    for run in (runs[0], runs[1]):
        history = client.get_metric_history(run.info.run_id, "eval/rouge/rougeL")
        assert f"{history[0].value:.3f} -> {history[-1].value:.3f}" in line
        assert [a.path for a in client.list_artifacts(run.info.run_id, "compare")] == ["compare/c.png"]
    assert "learning_rate" in stdout.split("params that differ:")[1]
    assert (tmp / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_trial_is_recorded_and_a_clearly_worse_trial_is_pruned(stores, sweep_here):
    env, storage, client, tmp = stores
    # 8 steps: the median pruner compares a trial's best value so far (here its step 0, the same for every trial)
    # with the others' at the step, so it can prune only once the sound trials beat their start, at step 4 here
    longer = [a for a in SCRIPTED if not a.startswith("max_steps=")] + ["max_steps=8"]
    summary, _ = sweep_here("scripted_simpo", *longer, "--trials", "4", "--pruner", "median", "--startup-trials", "2")
    assert summary["trials"] == {"COMPLETE": 2, "FAIL": 1, "PRUNED": 1}
    trials = optuna.load_study(study_name="scripted_simpo", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    pruned = trials[3]
    assert pruned.params["learning_rate"] == 5e-2 and pruned.last_step < 8
    assert pruned.user_attrs["steps_trained"] < 8  # training stopped, not just the trial's label
    assert summary["steps_trained"] == 16 + pruned.user_attrs["steps_trained"]

    _, runs = _runs(client, "scripted_simpo")
    assert runs[2].info.status == "FAILED" and runs[2].data.tags["optuna.trial.state"] == "FAIL"
    assert runs[3].info.status == "FINISHED" and runs[3].data.tags["optuna.trial.state"] == "PRUNED"
    steps = [m.step for m in client.get_metric_history(runs[3].info.run_id, "eval/perplexity/perplexity")]
    assert steps == list(range(pruned.last_step + 1))
    tables = {a.path for a in client.list_artifacts(runs[3].info.run_id, "eval_samples")}
    assert tables == {f"eval_samples/step_{s:06d}.json" for s in steps}  # the pruned run's tables stay


def test_two_workers_share_one_study_without_running_a_trial_twice(stores):
    env, storage, client, tmp = stores
    args = ["scripted_simpo", *SCRIPTED, "max_steps=1", "--study", "shared", "--pruner", "none", "--trials", "2"]
    cmd = [sys.executable, "-m", "harness", "sweep", *args, f"output_dir={tmp / 'outputs'}", "--storage", storage]
    # the first worker creates the study; the second joins it while the first is running its first trial
    workers = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    summaries = []
    for worker in workers:
        stdout, stderr = worker.communicate(timeout=900)
        assert worker.returncode == 0, stderr[-3000:]
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    # trials 2 and 3 repeat the script's crash and ruin rows; without pruning a ruined trial still completes
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    (parent,), runs = _runs(client, "scripted_simpo")
    assert {s["mlflow_parent_run_id"] for s in summaries} == {parent.info.run_id}
    assert sorted(runs) == [0, 1, 2, 3]
    assert len({r.info.run_id for r in runs.values()}) == 4
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs.values()}


def test_a_trial_whose_worker_died_is_marked_failed_and_the_study_goes_on(stores, sweep_here):
    env, storage, client, tmp = stores
    args = ["scripted_simpo", *SCRIPTED, "--study", "dies", "--heartbeat", "1", "--trials", "1", "--pruner", "none"]
    cmd = [sys.executable, "-m", "harness", "sweep", *args, "max_steps=400", f"output_dir={tmp / 'outputs'}",
           "--storage", storage]
    worker = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # until the trial is training: its MLflow run has an eval metric
            exp = client.get_experiment_by_name("scripted_simpo")
            runs = client.search_runs([exp.experiment_id], "tags.`sweep.role` = 'trial'") if exp else []
            if runs and runs[0].data.metrics:
                break
            time.sleep(1)
        else:
            pytest.fail("the trial never started training")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # the driver and its trial process, with no chance to clean up
        worker.wait()
    (trial,) = optuna.load_study(study_name="dies", storage=storage).get_trials()
    assert trial.state.name == "RUNNING"
    time.sleep(5)  # past the grace period of 4 heartbeats

    summary, _ = sweep_here(*args)
    assert summary["trials"] == {"FAIL": 1, "COMPLETE": 1}
    trials = optuna.load_study(study_name="dies", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    _, runs = _runs(client, "scripted_simpo")
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["optuna.trial.state"] == "FAIL"


def test_search_space_values_must_be_fields_and_an_experiment_must_declare_one():
    exp = load_class("simpo_qwen")()
    assert trial_overrides(exp, ["max_steps=3"], {"beta": 2.0, "evaluators": ["bleu", "rouge"]}) == \
        ["max_steps=3", "beta=2.0", "evaluators=bleu,rouge"]
    with pytest.raises(ConfigError, match=r"search_space returned \['betta'\], which are not fields"):
        trial_overrides(exp, [], {"betta": 2.0})
    from harness.training.experiment import Experiment

    with pytest.raises(ConfigError, match="declares no search space"):
        Experiment.search_space(exp, None)
    with pytest.raises(ConfigError, match=r"deepspeed=zero2: a sweep runs each trial as one process"):
        run_sweep(SweepConfig("simpo_qwen", ["deepspeed=zero2"], trials=1))


def test_storage_password_is_never_shown_and_a_bad_storage_is_named():
    assert display_url("postgresql://alice:s3cret@db.example:5432/optuna") == \
        "postgresql://alice:***@db.example:5432/optuna"
    with pytest.raises(ConfigError, match=r"--storage nosuchdb://alice:\*\*\*@host/x") as error:
        make_storage("nosuchdb://alice:s3cret@host/x")
    assert "s3cret" not in str(error.value)


def test_resuming_a_study_with_another_objective_is_refused(stores, sweep_here, capsys):
    env, storage, client, tmp = stores
    optuna_study = optuna.create_study(study_name="taken", storage=storage, direction="maximize")
    optuna_study.set_user_attr("experiment", "simpo_qwen")
    optuna_study.set_user_attr("objective", "eval/rouge/rougeL")
    # the CLI in this process (sweep_here set the environment up); a refusal starts no trial
    assert main(["sweep", "scripted_simpo", "--study", "taken", "--trials", "1", f"output_dir={tmp / 'outputs'}",
                 "--storage", storage]) == 2
    assert "--study taken: the study was created for experiment 'simpo_qwen' optimising 'eval/rouge/rougeL'" \
        in capsys.readouterr().err
    assert client.get_experiment_by_name("scripted_simpo") is None  # nothing was logged


# Case 2: signals. No MLflow run and no Optuna trial stays RUNNING when the driver or a trial process dies.


def _start_driver(env, storage, tmp, *args):
    """A driver in its own process group (so the test can kill it with its trial), with Ctrl-C's default
    disposition as from a terminal (see test_experiment_run), its output in a file."""
    cmd = [sys.executable, "-m", "harness", "sweep", *args, f"output_dir={tmp / 'outputs'}", "--storage", storage]
    log = open(tmp / "driver.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.log = log
    return proc


def _wait_for(what, check, driver, tmp, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        assert driver.poll() is None, f"the driver exited before {what}:\n" + (tmp / "driver.log").read_text()[-3000:]
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout}s")


def _running_trial_run(client, number):
    exp = client.get_experiment_by_name("scripted_simpo")
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.trial.number` = '{number}'") if exp else []
    return runs[0] if runs and runs[0].info.status == "RUNNING" else None


def _all_runs(client):
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl_c"])
def test_case2_sigterm_to_the_driver_leaves_nothing_running(stores, ctrl_c):
    """SIGTERM to the driver alone; or Ctrl-C in a terminal, SIGINT to the driver and its trial process at once
    (the trial then gets the driver's SIGTERM too, and must still end its run KILLED)."""
    env, storage, client, tmp = stores
    driver = _start_driver(env, storage, tmp, "scripted_simpo", *SCRIPTED, "max_steps=400", "--study", "term",
                           "--trials", "2", "--pruner", "none")
    try:
        run = _wait_for("trial run RUNNING", lambda: _running_trial_run(client, 0), driver, tmp)
        started = time.time()
        if ctrl_c:
            os.killpg(driver.pid, signal.SIGINT)
        else:
            driver.send_signal(signal.SIGTERM)
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        driver.log.close()
    log = (tmp / "driver.log").read_text()
    assert code == 130, log[-3000:]
    assert time.time() - started < 60  # the trial ended within its grace period, not at the SIGKILL
    assert f"{'SIGINT' if ctrl_c else 'SIGTERM'}: stopping trial 0" in log and "SIGKILL" not in log
    (trial,) = optuna.load_study(study_name="term", storage=storage).get_trials()
    assert trial.state.name == "FAIL"
    assert not _alive(trial.user_attrs[TRIAL_PID_ATTR])
    runs = {r.info.run_id: r for r in _all_runs(client)}
    assert {r.info.status for r in runs.values()} == {"KILLED"}, {r.info.run_name: r.info.status
                                                                 for r in runs.values()}
    (parent,), trial_runs = _runs(client, "scripted_simpo")
    assert list(trial_runs) == [0] and trial_runs[0].info.run_id == run.info.run_id
    assert trial_runs[0].data.tags["optuna.trial.state"] == "FAIL"
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id


@pytest.mark.slow
def test_case2_sigkilled_trial_and_resume(stores, sweep_here):
    env, storage, client, tmp = stores
    # trials 0 and 1 train long; trial 2 (the resume's) is the script's crash, so the resume is short
    args = ["scripted_simpo", *SCRIPTED, "max_steps=400", "--study", "kill", "--pruner", "none"]
    driver = _start_driver(env, storage, tmp, *args, "--trials", "2")
    try:
        _wait_for("trial 0 run RUNNING", lambda: _running_trial_run(client, 0), driver, tmp)
        (trial,) = optuna.load_study(study_name="kill", storage=storage).get_trials()
        os.kill(trial.user_attrs[TRIAL_PID_ATTR], signal.SIGKILL)  # nothing can run in the trial process
        # the driver fails trial 0 itself and goes on with trial 1
        _wait_for("trial 1 run RUNNING", lambda: _running_trial_run(client, 1), driver, tmp)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and trial 1's process, with no chance to clean up
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        driver.log.close()
    log = (tmp / "driver.log").read_text()
    assert "trial 0: FAIL (process exit code -9)" in log, log[-3000:]
    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING"]
    (parent,), runs = _runs(client, "scripted_simpo")
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["optuna.trial.state"] == "FAIL"
    assert runs[1].info.status == "RUNNING" and parent.info.status == "RUNNING"  # what only a resume can end

    # resumed at once: the dead driver ran on this machine, so its trial is failed without waiting for the
    # heartbeat's grace period (30 s x 4 here)
    summary, stdout = sweep_here(*args, "--trials", "1")
    assert "trial 1: FAIL (its driver (pid" in stdout
    assert summary["trials"] == {"FAIL": 3}
    trials = optuna.load_study(study_name="kill", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "FAIL", "FAIL"]
    (parent,), runs = _runs(client, "scripted_simpo")
    assert [runs[n].info.status for n in range(3)] == ["KILLED", "KILLED", "FAILED"]
    assert all(r.data.tags["optuna.trial.state"] == "FAIL" for r in runs.values())
    assert parent.info.status == "FINISHED"
    assert "RUNNING" not in {r.info.status for r in _all_runs(client)}


def test_case2_a_trial_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    signals = _Signals()
    launcher = _TrialLauncher(None, [], "", {}, "", tmp_path, signals, grace_s=1.0)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
           "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        signals.received = signal.SIGTERM  # as the driver's handler records it
        started = time.time()
        assert launcher._wait(proc, 0) == -signal.SIGKILL
        assert 1.0 <= time.time() - started < 10
        assert (tmp_path / "trial-0.stop").exists()  # told the trial its driver is alive
    finally:
        proc.kill()
        proc.wait()


def test_case2_fail_trial_closes_a_run_whose_id_was_never_recorded(tmp_path, monkeypatch):
    """A trial process killed between opening its MLflow run and recording the run's id: the run is found by its
    tags. And failing a trial twice (its driver, then a later one) changes nothing the second time."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("scripted_simpo")
    parent = client.create_run(exp_id, tags={"sweep.role": "parent"})
    other = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id, "optuna.trial.number": "1"})
    run = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id, "optuna.trial.number": "0"})
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.set_user_attr("experiment", "scripted_simpo")
    study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
    trial = study.ask()
    for _ in range(2):
        fail_trial(study, trial._trial_id, "KILLED", "test")
        assert study.get_trials()[0].state.name == "FAIL"
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "KILLED" and closed.data.tags["optuna.trial.state"] == "FAIL"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"


@pytest.mark.slow
def test_case2_sigkilled_driver_takes_its_trial_down(stores):
    env, storage, client, tmp = stores
    driver = _start_driver(env, storage, tmp, "scripted_simpo", *SCRIPTED, "max_steps=400", "--study", "orphan",
                           "--trials", "1", "--pruner", "none")
    try:
        run = _wait_for("trial run RUNNING", lambda: _running_trial_run(client, 0), driver, tmp)
        (trial,) = optuna.load_study(study_name="orphan", storage=storage).get_trials()
        driver.kill()  # the driver alone: the kernel sends its trial process SIGTERM (Linux)
        driver.wait()
        pid = trial.user_attrs[TRIAL_PID_ATTR]
        deadline = time.time() + 60
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.log.close()
    log = (tmp / "driver.log").read_text()
    assert not _alive(pid), log[-3000:]
    assert "trial 0: FAIL (its driver died)" in log, log[-3000:]
    (trial,) = optuna.load_study(study_name="orphan", storage=storage).get_trials()
    assert trial.state.name == "FAIL"
    (parent,), runs = _runs(client, "scripted_simpo")
    assert runs[0].info.run_id == run.info.run_id and runs[0].info.status == "KILLED"
    assert runs[0].data.tags["optuna.trial.state"] == "FAIL"
    assert parent.info.status == "RUNNING"  # only the next driver on the study can end it (see the test above)
