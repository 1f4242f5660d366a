"""The team set-up against real servers: a PostgreSQL cluster and an MLflow tracking server (artifacts served
through it, MLflow's basic-auth app in front), both started by `harness.commands.services` in a temporary directory on
free ports, once for this module. Sweeps run against them in subprocesses as `make sweep-worker` runs them, with
credentials as a teammate has them: in the environment, the tracking URL or MLflow's credentials file."""

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
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from test_sweep import EXTRA, SCRIPTED

from harness.commands import services
from harness.core.errors import ConfigError
from harness.core.files import free_port
from harness.paths import REPO_ROOT
from harness.training.tracking.store import auth_refusal

RUNNER = "runner"  # the MLflow user (EDIT) the module's sweeps log as
CLIENT_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "OPTUNA_STORAGE")


@pytest.fixture(scope="module")
def servers():
    # not pytest's tmp_path: it is private to root (0700), and as root the cluster runs as the postgres user
    directory = Path(tempfile.mkdtemp(prefix="harness-services-"))
    try:
        s = services.start(directory, pg_port=free_port(), mlflow_port=free_port(), workers=1)
        services.add_user(directory, RUNNER, "EDIT", quiet=True)
        yield s
    finally:
        services.stop(directory, quiet=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def as_admin(servers, monkeypatch) -> MlflowClient:
    """This process's MLflow client, as the server's admin (credentials from the environment, as MLflow reads them)."""
    for key, value in servers.mlflow_env().items():
        monkeypatch.setenv(key, value)
    return MlflowClient(servers.mlflow_url)


def _env(s: services.Services, experiments: str = EXTRA, user: str | None = RUNNER) -> dict:
    """What a worker on another machine is given: the two URLs, `user`'s MLflow credentials (none: no variables) and
    the test-only experiment's path."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_ENV}
    return {**env, **(s.mlflow_env(user) if user else {"MLFLOW_TRACKING_URI": s.mlflow_url}),
            "OPTUNA_STORAGE": s.optuna_url, "PYTHONUNBUFFERED": "1", "HARNESS_EXPERIMENTS_PATH": experiments}


def _secrets(s: services.Services) -> dict[str, str]:
    return {"postgres": s.password, **{user: s.mlflow_env(user)["MLFLOW_TRACKING_PASSWORD"]
                                       for user in (services.MLFLOW_ADMIN, RUNNER)}}


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
    with pytest.raises(ConfigError, match=f"{tmp_path}: no services were started there"):
        services.add_user(tmp_path, "alice", "READ")
    with pytest.raises(ConfigError, match="permission 'WRITE': expected one of READ, EDIT, MANAGE"):
        services.add_user(tmp_path, "alice", "WRITE")
    for name in ("admin", "../alice", "-alice", ""):  # the admin is not remade; a name is a file name in mlflow-users/
        with pytest.raises(ConfigError, match="user name .*: expected a letter"):
            services.add_user(tmp_path, name, "READ")
    assert not services.status(tmp_path)
    assert "[services] none in" in capsys.readouterr().out
    if os.geteuid() == 0:  # as root the cluster belongs to the postgres user, who cannot enter a private directory
        private = Path(tempfile.mkdtemp())
        try:
            with pytest.raises(ConfigError, match="the user 'postgres', which runs PostgreSQL, cannot enter it"):
                services.start(private / "services")
        finally:
            shutil.rmtree(private)


def test_a_refused_request_says_which_credentials_to_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5050")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.mlflow/credentials
    refused = MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed with error code 401 != 200. "
                              "Response body: 'You are not authenticated.'")
    assert auth_refusal(refused) == (
        "the MLflow server http://127.0.0.1:5050 refused the request (401 on /api/2.0/mlflow/runs/create): "
        "no credentials were given. Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLflow's "
        "credentials file ~/.mlflow/credentials) to an account on it: `make services` prints the lines for its "
        "admin, `make services-user NAME=...` adds accounts")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-pw")
    assert "it does not take the password given for user 'alice'. Set" in auth_refusal(refused)
    denied = MlflowException(str(refused).replace("401", "403"))
    assert auth_refusal(denied).endswith("does not let user 'alice' do this (403 on /api/2.0/mlflow/runs/create): "
                                         "its admin can give EDIT with `make services-user NAME=alice PERMISSION=EDIT`")
    assert "secret-pw" not in auth_refusal(refused) + auth_refusal(denied)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:secret-pw@127.0.0.1:5050")  # the URL's account is sent
    assert "http://bob:***@127.0.0.1:5050 refused the request (401 on /api/2.0/mlflow/runs/create): it does not " \
           "take the password given for user 'bob'" in (message := auth_refusal(refused))
    assert "secret-pw" not in message
    assert auth_refusal(MlflowException("API request to endpoint /x failed with error code 404 != 200")) is None
    assert auth_refusal(ValueError("no such run")) is None

    def http_error(url: str, status: int) -> requests.HTTPError:  # as MLflow's artifact client raises it
        response = requests.Response()
        response.status_code, response.url = status, url
        return requests.HTTPError(f"{status} Client Error", response=response)

    upload = "http://alice:pw@127.0.0.1:5050/api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/c.png"
    assert "(403 on /api/2.0/mlflow-artifacts/artifacts/1/r/artifacts/c.png)" in auth_refusal(http_error(upload, 403))
    assert auth_refusal(http_error("http://127.0.0.1:8000/v1/chat/completions", 401)) is None  # a judge's, not MLflow's


@pytest.mark.slow
def test_services_start_is_idempotent_and_the_passwords_stay_private(servers, capsys):
    s = servers
    again = services.start(s.dir)
    out = capsys.readouterr().out
    assert "PostgreSQL on 127.0.0.1" in out and out.count("already running") == 2
    assert "(authentication on; artifacts served from" in out
    # the lines to export read the passwords from their files where they are run: no password in this output
    exports = (f'export OPTUNA_STORAGE="postgresql://harness:$(cat {s.dir}/password)@127.0.0.1:{s.pg_port}/optuna"\n'
               f"export MLFLOW_TRACKING_URI={s.mlflow_url}\nexport MLFLOW_TRACKING_USERNAME=admin\n"
               f'export MLFLOW_TRACKING_PASSWORD="$(cat {s.dir}/mlflow-users/admin)"')
    assert exports in out
    assert not any(secret in out for secret in _secrets(s).values())
    # in an environment of its own: what this process set (other tests' MLFLOW_* settings) is not what was exported
    shell = subprocess.run(["bash", "-c", f"{exports}\nenv"], capture_output=True, text=True, check=True,
                           env={"PATH": os.environ["PATH"]}).stdout
    exported = dict(line.split("=", 1) for line in shell.splitlines() if line.startswith(("MLFLOW_", "OPTUNA_")))
    assert exported == {**s.mlflow_env(), "OPTUNA_STORAGE": s.optuna_url}  # and these work: the other tests use them
    assert again == s  # same ports and password as the first start
    for private in ("password", "pgpass", "mlflow-auth.ini", "mlflow-users/admin", f"mlflow-users/{RUNNER}"):
        assert (s.dir / private).stat().st_mode & 0o777 == 0o600, private
    assert (s.dir / "mlflow-users").stat().st_mode & 0o777 == 0o700
    assert services.status(s.dir)
    assert "MLflow server on http://127.0.0.1:" in (status := capsys.readouterr().out)
    assert status.endswith(": running, authentication on\n")
    # the MLflow server reads the database password from its pgpass file and the admin's from its auth settings,
    # none from its command line (visible in ps) or its environment
    pid = int((s.dir / "mlflow.pid").read_text())
    for secret in _secrets(s).values():
        assert secret not in Path(f"/proc/{pid}/cmdline").read_text()
        assert secret not in Path(f"/proc/{pid}/environ").read_bytes().decode("utf-8", "replace")
        assert secret not in (s.dir / "mlflow.log").read_text()
    assert s.password not in (s.dir / "mlflow-auth.ini").read_text()


@pytest.mark.slow
def test_anonymous_and_wrong_password_requests_get_401(servers):
    s = servers
    admin, password = services.MLFLOW_ADMIN, s.mlflow_env()["MLFLOW_TRACKING_PASSWORD"]
    rest = f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=5"
    artifact = f"{s.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/0/any-run/artifacts/file.txt"  # the artifact proxy
    for method, url in (("GET", rest), ("GET", artifact), ("PUT", artifact), ("GET", f"{s.mlflow_url}/"),
                        ("GET", f"{s.mlflow_url}/get-artifact?path=file.txt&run_uuid=any-run")):
        for auth in (None, (admin, "not-the-password"), ("nobody", password)):
            answer = requests.request(method, url, auth=auth, data=b"x" if method == "PUT" else None, timeout=60)
            assert answer.status_code == 401, (method, url, auth and auth[0])
            assert answer.headers["WWW-Authenticate"] == 'Basic realm="mlflow"'
    assert requests.get(rest, auth=(admin, password), timeout=60).status_code == 200
    assert requests.get(f"{s.mlflow_url}/health", timeout=60).status_code == 200  # probes need no account


@pytest.mark.slow
def test_a_read_only_user_reads_but_cannot_write_until_given_edit(servers, as_admin, monkeypatch, tmp_path, capsys):
    s = servers
    password_file = services.add_user(s.dir, "reader", "READ")
    out = capsys.readouterr().out
    assert password_file == s.dir / "mlflow-users" / "reader" and password_file.stat().st_mode & 0o777 == 0o600
    password = password_file.read_text()
    assert "MLflow user reader: created, READ on every experiment and registered model" in out
    assert f'export MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"' in out and password not in out
    experiment = as_admin.create_experiment("read_only_check")
    run = as_admin.create_run(experiment).info.run_id
    as_admin.log_param(run, "lr", "0.1")
    (tmp_path / "notes.txt").write_text("logged by the admin")
    as_admin.log_artifact(run, str(tmp_path / "notes.txt"))

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    reader = MlflowClient(s.mlflow_url)
    assert reader.get_run(run).data.params == {"lr": "0.1"}
    assert Path(reader.download_artifacts(run, "notes.txt", str(tmp_path / "got"))).read_text() == "logged by the admin"
    writes = (lambda: reader.create_run(experiment), lambda: reader.log_metric(run, "loss", 1.0),
              lambda: reader.set_tag(run, "by", "reader"), lambda: reader.log_artifact(run, str(tmp_path / "notes.txt"),
                                                                                       "again"))
    for write in writes:  # artifacts go through the server's proxy, where requests raises its own error
        with pytest.raises((MlflowException, requests.HTTPError), match="403") as refused:
            write()
        assert "does not let user 'reader' do this (403 on" in auth_refusal(refused.value)
    assert as_admin.get_run(run).data.metrics == {} and "by" not in as_admin.get_run(run).data.tags

    assert services.add_user(s.dir, "reader", "EDIT") == password_file  # the permission changes, the password stays
    assert "MLflow user reader: exists, EDIT on every" in capsys.readouterr().out
    assert password_file.read_text() == password
    reader.log_metric(reader.create_run(experiment).info.run_id, "loss", 1.0)
    with pytest.raises(MlflowException, match="403"):  # EDIT is not MANAGE: no deleting another's experiment
        reader.delete_experiment(experiment)


@pytest.mark.slow
def test_postgresql_takes_only_scram_passwords(servers):
    s = servers
    connect = dict(host="127.0.0.1", port=s.pg_port, user=services.DB_USER, dbname="postgres", connect_timeout=10)
    with psycopg.connect(**connect, password=s.password) as con:
        methods = {m for (m,) in con.execute("SELECT auth_method FROM pg_hba_file_rules")}
    assert methods == {"scram-sha-256"}
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(**connect, password="not-the-password")
    hba = s.dir / "pg" / "pg_hba.conf"
    rules = hba.read_text()
    try:
        hba.write_text(rules + "host all all 0.0.0.0/0 trust\n")  # someone opens it to the network
        line = len(rules.splitlines()) + 1
        with pytest.raises(ConfigError, match=rf"pg_hba.conf lets clients in without a SCRAM password \(line "
                                              rf"{line}: trust\): the team set-up accepts only `scram-sha-256`"):
            services.start(s.dir, quiet=True)
    finally:
        hba.write_text(rules)
    services.start(s.dir, quiet=True)


# a client that, once told when, logs the same new dataset and sets the same new experiment tag in each experiment
# given, half a second apart: two of them told the same moment write each new row at once
RACER = """
import sys, time
from mlflow.entities import Dataset, DatasetInput
from mlflow.tracking import MlflowClient
from harness.training.tracking.retries import retrying
client = MlflowClient()
runs = [client.create_run(e).info.run_id for e in sys.argv[1:]]
print("ready", flush=True)
go = float(sys.stdin.readline())
for i, (experiment, run) in enumerate(zip(sys.argv[1:], runs)):
    time.sleep(max(0.0, go + i * 0.5 - time.time()))
    retrying(client.log_inputs, run, datasets=[DatasetInput(Dataset("train", "d1g3st", "local", "/data/t.jsonl"))])
    retrying(client.set_experiment_tag, experiment, "team.last_run", run)
print(" ".join(runs), flush=True)
"""


@pytest.mark.slow
def test_two_clients_writing_the_same_new_rows_at_once_both_succeed(servers, as_admin):
    # MLflow looks a dataset or an experiment tag up and inserts it if missing: two sweep trials starting together
    # both inserted, and one failed on the duplicate key (a trial lost in CI). Without the retry, about 2 rounds in 3
    # failed here; 8 rounds all pass only with it.
    experiments = [as_admin.create_experiment(f"same_rows_{i}") for i in range(8)]
    racers = [subprocess.Popen([sys.executable, "-c", RACER, *experiments], cwd=REPO_ROOT, env=_env(servers),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    try:
        assert [r.stdout.readline() for r in racers] == ["ready\n"] * 2, racers[0].stderr.read()[-2000:]
        go = f"{time.time() + 0.5}\n"
        for r in racers:
            r.stdin.write(go)
            r.stdin.flush()
        outputs = [r.communicate(timeout=120) for r in racers]
    finally:
        for r in racers:
            r.kill()
    for racer, (_, stderr) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, stderr[-3000:]
    runs = list(zip(*(stdout.split() for stdout, _ in outputs), strict=True))
    for experiment, pair in zip(experiments, runs, strict=True):
        for run in pair:
            inputs = as_admin.get_run(run).inputs.dataset_inputs
            assert [(d.dataset.name, d.dataset.digest) for d in inputs] == [("train", "d1g3st")]
        assert as_admin.get_experiment(experiment).tags["team.last_run"] in pair


def test_two_workers_on_postgres_log_through_the_tracking_server(servers, as_admin, tiny_model_dir, tmp_path):
    s = servers
    # one worker has its MLflow credentials in MLflow's environment variables, the other in the tracking URL (which
    # the harness shows without the password)
    password = s.mlflow_env(RUNNER)["MLFLOW_TRACKING_PASSWORD"]
    in_url = {**_env(s, user=None), "MLFLOW_TRACKING_URI": f"http://{RUNNER}:{password}@127.0.0.1:{s.mlflow_port}"}
    workers = [_worker(s, tmp_path / "outputs", "team", "--trials", "2", env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE) for env in (_env(s), in_url)]
    outputs = [w.communicate(timeout=900) for w in workers]
    for w, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert w.returncode == 0, stdout[-2000:] + stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs]

    trials = optuna.load_study(study_name="team", storage=s.optuna_url).get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]  # no trial number run twice
    states = [t.state.name for t in trials]
    # the script's row 2 raises; any other FAIL is shown with what both workers printed
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"], "\n".join(o + e for o, e in outputs)[-20000:]
    client = as_admin  # another client: it has the URL and an account, nothing else
    (parent,), runs = _study_runs(client, "team")
    assert {x["mlflow_parent_run_id"] for x in summaries} == {parent.info.run_id}
    assert sorted(runs) == [0, 1, 2, 3]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    assert [runs[n].info.status for n in range(4)] == ["FINISHED", "FINISHED", "FAILED", "FINISHED"]
    assert {r.info.user_id for r in [parent, *runs.values()]} == {RUNNER}  # the account, wherever it was given
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

    # `harness compare` from another working directory, with the credentials in MLflow's credentials file only:
    # histories and tables through the server, its plot back up
    home = tmp_path / "home"
    (home / ".mlflow").mkdir(parents=True)
    (home / ".mlflow" / "credentials").write_text(
        f"[mlflow]\nmlflow_tracking_username = {RUNNER}\nmlflow_tracking_password = {password}\n")
    ids = [runs[0].info.run_id, runs[1].info.run_id]
    compare = [sys.executable, "-m", "harness", "compare", *ids, "--out", str(tmp_path / "c.png")]
    out = subprocess.run(compare, cwd=tmp_path, env={**_env(s, user=None), "HOME": str(home)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "eval/perplexity/perplexity" in out.stdout and ", 8 samples:" in out.stdout  # tables paired
    assert [a.path for a in client.list_artifacts(ids[1], "compare")] == ["compare/c.png"]
    outputs.append((out.stdout, out.stderr))
    # a read-only account compares the runs too; it may not log the plot to them, and is told so and what to ask for
    services.add_user(s.dir, "viewer", "READ", quiet=True)
    (tmp_path / "c.png").unlink()
    read_only = subprocess.run(compare, cwd=tmp_path, env=_env(s, user="viewer"), capture_output=True, text=True,
                               timeout=300)
    assert read_only.returncode == 0, read_only.stderr[-2000:]
    assert read_only.stdout.split("eval curves:")[0] == out.stdout.split("eval curves:")[0]  # the same comparison
    assert f"eval curves: {tmp_path / 'c.png'} (not logged to 2 of the runs: {ids[0]}, {ids[1]}; the MLflow server " \
           f"http://127.0.0.1:{s.mlflow_port} does not let user 'viewer' do this (403 on " \
           "/api/2.0/mlflow-artifacts/artifacts/" in read_only.stdout
    assert (tmp_path / "c.png").stat().st_size > 0
    assert [a.path for a in client.list_artifacts(ids[1], "compare")] == ["compare/c.png"]
    outputs.append((read_only.stdout, read_only.stderr))

    # the database's and the MLflow accounts' passwords: not in any output, param, tag or artifact (the shown URLs
    # hide them)
    shown = f"postgresql://harness:***@127.0.0.1:{s.pg_port}/optuna"
    assert parent.data.params["sweep.storage"] == shown and parent.data.tags["optuna.storage"] == shown
    assert f"at http://{RUNNER}:***@127.0.0.1:{s.mlflow_port}" in outputs[1][0]
    logged = _everything_logged(client, "scripted_simpo", tmp_path / "all")
    for secret in [*_secrets(s).values(), s.mlflow_env("viewer")["MLFLOW_TRACKING_PASSWORD"]]:
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


def test_two_clones_share_only_the_urls_and_a_killed_workers_trial_fails(servers, as_admin, tiny_model_dir,
                                                                           tmp_path):
    """Machine A's worker loses its database connections mid-trial and goes on; then it is killed with its trial
    (SIGKILL: nothing can clean up); machine B's worker, in another clone, finds the trial's heartbeat stale, marks
    it FAIL and runs its own trial."""
    s = servers
    clones = [_copy_of_the_tree(tiny_model_dir, tmp_path / name) for name in ("a", "b")]
    envs = [_env(s, str(c / "tests" / "experiments_extra")) for c in clones]
    a = _worker(s, clones[0] / "outputs", "clones", "--trials", "1", "--heartbeat", "1", "max_steps=400",
                cwd=clones[0], env=envs[0], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)
    client = as_admin
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


@pytest.mark.slow
def test_an_mlflow_server_started_before_authentication_is_restarted_with_it(servers, capsys):
    """A services directory from before authentication: its MLflow server, as the harness started it then, answers
    anyone. `status` says so and fails; `start` restarts it with authentication."""
    s = servers
    services._stop_mlflow(s)
    old = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                            f"postgresql+psycopg://{services.DB_USER}@127.0.0.1:{s.pg_port}/mlflow",
                            "--artifacts-destination", str(s.dir / "artifacts"), "--serve-artifacts",
                            "--host", "127.0.0.1", "--port", str(s.mlflow_port), "--workers", "1"],
                           env={**os.environ, "PGPASSFILE": str(s.dir / "pgpass"),
                                "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                           cwd=s.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    (s.dir / "mlflow.pid").write_text(f"{old.pid}\n")
    try:
        deadline = time.time() + services.START_TIMEOUT_S
        while not services.mlflow_healthy(s):
            assert old.poll() is None and time.time() < deadline, "the unauthenticated server did not come up"
            time.sleep(0.5)
        probe = f"{s.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert requests.get(probe, timeout=60).status_code == 200  # anyone
        capsys.readouterr()
        assert not services.status(s.dir)
        assert "running WITHOUT authentication" in capsys.readouterr().out
        services.start(s.dir)
        assert "restarted with authentication (it answered anonymous requests)" in capsys.readouterr().out
        old.wait(timeout=60)  # stopped with its group
    finally:
        if old.poll() is None:
            os.killpg(old.pid, signal.SIGKILL)
            old.wait()
    assert requests.get(probe, timeout=60).status_code == 401
    assert services.status(s.dir)
