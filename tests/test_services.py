"""The team set-up against real servers: a PostgreSQL cluster and an MLflow tracking server (artifacts served
through it), both started by `harness.commands.services` in a temporary directory on free ports, once for this
module. Sweeps run against them in subprocesses as `make sweep-worker` runs them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from test_sweep import EXTRA, SCRIPTED

from harness.commands import services
from harness.core.errors import ConfigError
from harness.core.files import free_port
from harness.paths import REPO_ROOT


@pytest.fixture(scope="module")
def servers():
    # not pytest's tmp_path: it is private to root (0700), and as root the cluster runs as the postgres user
    directory = Path(tempfile.mkdtemp(prefix="harness-services-"))
    try:
        s = services.start(directory, pg_port=free_port(), mlflow_port=free_port(), workers=1)
        yield s
    finally:
        services.stop(directory, quiet=True)
        shutil.rmtree(directory, ignore_errors=True)


def _env(s: services.Services, experiments: str = EXTRA) -> dict:
    """What a worker on another machine is given: the two URLs (and the test-only experiment's path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "OPTUNA_STORAGE")}
    return {**env, "MLFLOW_TRACKING_URI": s.mlflow_url, "OPTUNA_STORAGE": s.optuna_url, "PYTHONUNBUFFERED": "1",
            "HARNESS_EXPERIMENTS_PATH": experiments}


def _worker(s, out_dir: Path, study: str, *args, cwd=REPO_ROOT, env=None, **popen):
    cmd = [sys.executable, "-m", "harness", "sweep", "scripted_simpo", *SCRIPTED, "max_steps=1",
           f"output_dir={out_dir}", "--study", study, "--pruner", "none", *args]  # storage: OPTUNA_STORAGE
    return subprocess.Popen(cmd, cwd=cwd, env=env or _env(s), text=True, **popen)


def _study_runs(client: MlflowClient, study: str) -> tuple[list, dict]:
    """The study's parent runs, and its trial runs by trial number."""
    exp = client.get_experiment_by_name("scripted_simpo")
    runs = client.search_runs([exp.experiment_id], f"tags.`optuna.study` = '{study}'")
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    trials = {int(r.data.tags["optuna.trial.number"]): r for r in runs if r.data.tags.get("sweep.role") == "trial"}
    return parents, trials


def _everything_logged(client: MlflowClient, experiment: str, scratch: Path) -> str:
    """Every param, tag and artifact of every run of the experiment, as one text to search."""
    exp = client.get_experiment_by_name(experiment)
    texts = []
    for run in client.search_runs([exp.experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        local = Path(client.download_artifacts(run.info.run_id, "", str(scratch / run.info.run_id)))
        texts += [p.read_bytes().decode("utf-8", "replace") for p in local.rglob("*") if p.is_file()]
    return "\n".join(texts)


def test_urls_a_missing_program_and_no_services_are_named(tmp_path, capsys):
    everywhere = services.Services(tmp_path, "0.0.0.0", 5433, 5050, "pw")
    assert everywhere.optuna_url == "postgresql://harness:pw@127.0.0.1:5433/optuna"  # reached on loopback here
    assert everywhere.mlflow_url == "http://127.0.0.1:5050"
    with pytest.raises(ConfigError, match=r"PostgreSQL's no-such-initdb was not found .* install the package "
                                          "postgresql"):
        services.pg_binary("no-such-initdb")
    with pytest.raises(ConfigError, match=f"{tmp_path}: no services were started there"):
        services.stop(tmp_path)
    assert not services.status(tmp_path)
    assert "[services] none in" in capsys.readouterr().out
    if os.geteuid() == 0:  # as root the cluster belongs to the postgres user, who cannot enter a private directory
        private = Path(tempfile.mkdtemp())
        try:
            with pytest.raises(ConfigError, match="the user 'postgres', which runs PostgreSQL, cannot enter it"):
                services.start(private / "services")
        finally:
            shutil.rmtree(private)


@pytest.mark.slow
def test_services_start_is_idempotent_and_the_password_stays_private(servers, capsys):
    s = servers
    again = services.start(s.dir)
    out = capsys.readouterr().out
    assert "PostgreSQL on 127.0.0.1" in out and out.count("already running") == 2
    assert f"export OPTUNA_STORAGE={s.optuna_url}\nexport MLFLOW_TRACKING_URI={s.mlflow_url}" in out
    assert again == s  # same ports and password as the first start
    assert (s.dir / "password").stat().st_mode & 0o777 == 0o600
    assert services.status(s.dir)
    # the MLflow server reads the password from its pgpass file, not from its command line (visible in ps)
    pid = int((s.dir / "mlflow.pid").read_text())
    assert s.password not in Path(f"/proc/{pid}/cmdline").read_text()
    assert s.password not in (s.dir / "mlflow.log").read_text()


def test_two_workers_on_postgres_log_through_the_tracking_server(servers, tiny_model_dir, tmp_path):
    s = servers
    # a tracking URL with credentials in it too (the server, without auth, ignores them): they must not show either
    tracking_secret = "trk-" + s.password[:8]
    env = {**_env(s), "MLFLOW_TRACKING_URI": f"http://team:{tracking_secret}@127.0.0.1:{s.mlflow_port}"}
    workers = [_worker(s, tmp_path / "outputs", "team", "--trials", "2", env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stdout[-2000:] + stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    trials = optuna.load_study(study_name="team", storage=s.optuna_url).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # no trial number run twice
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]  # the script's row 2 raises
    client = MlflowClient(s.mlflow_url)  # another client: it has the URL and nothing else
    (parent,), runs = _study_runs(client, "team")
    assert {x["mlflow_parent_run_id"] for x in summaries} == {parent.info.run_id}
    assert sorted(runs) == [0, 1, 2, 3]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    assert [runs[n].info.status for n in range(4)] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in runs.values()}

    # artifacts went up to the server's store: the runs point at it, not at a path on the workers' disk
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:")
    stored = s.dir / "artifacts" / runs[0].info.experiment_id / runs[0].info.run_id / "artifacts"
    assert (stored / "eval_samples" / "step_000001.json").exists()
    table = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "eval_samples/step_000001.json",
                                                      str(tmp_path))).read_text())
    assert len(table["data"]) == 8 and "prediction" in table["columns"]  # eval_limit=8 samples, one row each
    selection = json.loads(Path(client.download_artifacts(runs[0].info.run_id, "best/selection.json",
                                                          str(tmp_path))).read_text())
    assert selection["metric"] == "eval/perplexity/perplexity" and selection["step"] in (0, 1)
    # the worker that finished last counted all four; the parent's report is the last one written
    assert {"COMPLETE": 3, "FAIL": 1} in [x["trials"] for x in summaries]
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "sweep/summary.json",
                                                        str(tmp_path))).read_text())
    assert summary in [{k: v for k, v in x.items() if k not in ("study", "storage", "mlflow_parent_run_id")}
                       for x in summaries]
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep/plots")} >= \
        {"sweep/plots/optimization_history.png"}

    # `harness compare` from another working directory: histories and tables through the server, its plot back up
    ids = [runs[0].info.run_id, runs[1].info.run_id]
    out = subprocess.run([sys.executable, "-m", "harness", "compare", *ids, "--out", str(tmp_path / "c.png")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval/perplexity/perplexity" in out.stdout and ", 8 samples:" in out.stdout  # tables paired
    assert [a.path for a in client.list_artifacts(ids[1], "compare")] == ["compare/c.png"]
    outputs.append((out.stdout, out.stderr))

    # the passwords of both URLs: not in any output, param, tag or artifact (the shown URLs hide them)
    shown = f"postgresql://harness:***@127.0.0.1:{s.pg_port}/optuna"
    assert parent.data.params["sweep.storage"] == shown and parent.data.tags["optuna.storage"] == shown
    assert f"at http://team:***@127.0.0.1:{s.mlflow_port}" in outputs[0][0]
    logged = _everything_logged(client, "scripted_simpo", tmp_path / "all")
    for secret in (s.password, tracking_secret):
        assert all(secret not in stdout + stderr for stdout, stderr in outputs)
        assert secret not in logged


def _copy_of_the_tree(tiny_model_dir: str, to: Path) -> Path:
    """Another machine's checkout: the code, data and experiments copied (the working tree, uncommitted edits
    included), and its own copy of the built tiny models. It shares the virtualenv's packages with this one (as
    each machine has its own identical install), and nothing else: no store, no cache, no output directory."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("harness", "evaluators", "experiments", "data", "pyproject.toml", "tests/experiments_extra"):
        source = REPO_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, to / name, **(
            {"ignore": ignore} if source.is_dir() else {}))
    build = Path(tiny_model_dir).parent  # the whole build (base, instruct, teacher): its cache key is the directory
    shutil.copytree(build, to / ".cache" / "models" / build.name)
    return to


def _reported_steps(s: services.Services) -> int:
    """The last step trial 0 of the study `clones` reported to Optuna (-1 before its first)."""
    (trial,) = optuna.load_study(study_name="clones", storage=s.optuna_url).get_trials()
    return max(trial.intermediate_values, default=-1)


def test_two_clones_share_only_the_urls_and_a_killed_workers_trial_fails(servers, tiny_model_dir, tmp_path):
    """Machine A's worker loses its database connections mid-trial and goes on; then it is killed with its trial
    (SIGKILL: nothing can clean up); machine B's worker, in another clone, finds the trial's heartbeat stale, marks
    it FAIL and runs its own trial."""
    s = servers
    clones = [_copy_of_the_tree(tiny_model_dir, tmp_path / name) for name in ("a", "b")]
    envs = [_env(s, str(c / "tests" / "experiments_extra")) for c in clones]
    a = _worker(s, clones[0] / "outputs", "clones", "--trials", "1", "--heartbeat", "1", "max_steps=400",
                cwd=clones[0], env=envs[0], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
    client = MlflowClient(s.mlflow_url)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # until trial 0 trains: its run has an eval metric
            exp = client.get_experiment_by_name("scripted_simpo")
            found = client.search_runs([exp.experiment_id], "tags.`optuna.study` = 'clones' and "
                                       "tags.`sweep.role` = 'trial'") if exp else []
            if found and found[0].data.metrics:
                break
            assert a.poll() is None, "machine A's worker exited before its trial trained"
            time.sleep(1)
        else:
            pytest.fail("machine A's trial never started training")
        # the database drops every connection of machine A (driver, its heartbeat, the trial process): they reconnect
        # and go on; the trial keeps reporting, and its heartbeat keeps it from being taken for dead
        reported = _reported_steps(s)
        with psycopg.connect(host="127.0.0.1", port=s.pg_port, user=services.DB_USER, password=s.password,
                             dbname="postgres", autocommit=True) as con:
            (dropped,) = con.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                                     "datname = 'optuna' AND pid <> pg_backend_pid()").fetchone()
        assert dropped >= 2
        deadline = time.time() + 120
        while _reported_steps(s) <= reported + 3 and time.time() < deadline:
            assert a.poll() is None, "machine A's worker died when its database connections dropped"
            time.sleep(0.5)
        assert _reported_steps(s) > reported + 3
        time.sleep(5)  # 4 heartbeats of 1 s
        storage = optuna.storages.RDBStorage(s.optuna_url, heartbeat_interval=1, grace_period=4)  # as the driver
        assert storage._get_stale_trial_ids(storage.get_study_id_from_name("clones")) == []
    finally:
        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
    (trial,) = optuna.load_study(study_name="clones", storage=s.optuna_url).get_trials()
    assert trial.state.name == "RUNNING"
    time.sleep(5)  # past 4 missed heartbeats of 1 s
    b = _worker(s, clones[1] / "outputs", "clones", "--trials", "1", "--heartbeat", "1", cwd=clones[1], env=envs[1],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = b.communicate(timeout=600)
    assert b.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert json.loads(stdout.strip().splitlines()[-1])["trials"] == {"FAIL": 1, "COMPLETE": 1}
    assert "trial 0: FAIL (its driver stopped beating: lost)" in stdout  # the heartbeat, not a pid on this host
    trials = optuna.load_study(study_name="clones", storage=s.optuna_url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    _, runs = _study_runs(client, "clones")
    assert runs[0].info.status == "KILLED" and runs[0].data.tags["optuna.trial.state"] == "FAIL"
    assert runs[1].info.status == "FINISHED"
    # neither clone wrote a store of its own: all went to the servers
    for clone in clones:
        assert not (clone / "mlflow.db").exists() and not (clone / "optuna.db").exists()
        assert not (clone / "mlruns").exists()
