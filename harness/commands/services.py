"""`python -m harness services start|stop|status|user [--dir D]`: the team set-up on one host.

A PostgreSQL cluster (databases `optuna` for sweeps, `mlflow` for runs, `mlflow_auth` for the MLflow server's users
and permissions) and an MLflow tracking server backed by it, whose artifact store (`--artifacts-destination
D/artifacts`) is served through the server: clients upload and download artifacts over HTTP and share nothing with
the host but the two URLs and their credentials. Both servers authenticate every client, always: PostgreSQL with
SCRAM passwords only (a pg_hba.conf rule with another method is refused at start), the MLflow server with MLflow's
basic-auth app (`--app-name basic-auth`: an anonymous or wrong-password request to the REST API, the artifact proxy
or the UI gets 401). Clients authenticate from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, or MLflow's
credentials file ~/.mlflow/credentials), so no password is ever on a command line. Everything lives under one
directory (default `services/` at the repository root, gitignored):

  pg/              the cluster (owned by the `postgres` system user when started as root: PostgreSQL refuses root)
  password         the generated password of the database user `harness` (0600; the Optuna URL carries it)
  pgpass           libpq's password file for the MLflow server, so the password is not on its command line (0600)
  mlflow-users/    one file per MLflow user this directory created, holding its generated password (0700, files
                   0600): `admin` at the first start, others from `services user` (`make services-user`)
  mlflow-auth.ini  the basic-auth app's settings, the admin's password among them (0600), written at each start
  services.json    host and ports, fixed at the first start; later starts reuse them
  artifacts/       MLflow's artifact store
  postgres.log, mlflow.log, mlflow.pid

`start` is idempotent: what already runs is left alone (and said so), except an MLflow server that answers anonymous
requests (started before authentication was): it is restarted with authentication. The same functions give the
tests their servers in a temporary directory on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT

DEFAULT_DIR = REPO_ROOT / "services"
PG_PORT = 5433  # not PostgreSQL's 5432, which a system cluster may hold
MLFLOW_PORT = 5050  # not 5000, where `make ui` serves
DB_USER = "harness"
AUTH_DATABASE = "mlflow_auth"
DATABASES = ("optuna", "mlflow", AUTH_DATABASE)
MLFLOW_ADMIN = "admin"
# What a user made by `services user` may do on every experiment and registered model (MLflow's wildcard grants);
# the server's own default for anyone else is NO_PERMISSIONS, so an account made some other way (the admin's
# sign-up page) sees nothing until it is given one of these
PERMISSIONS = ("READ", "EDIT", "MANAGE")
GRANTED_TYPES = ("experiment", "registered_model")
USER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")  # also a file name under mlflow-users/
# Each worker remembers a checked password this long: without it every request pays the password hash (about 0.3 s
# here, and a run logs thousands), with it a changed password or a deleted user reaches the other workers this late
AUTH_CACHE_TTL_S = 60
# MLflow's auth REST API (mlflow.server.auth.routes; importing that module costs seconds of imports)
USERS_CREATE = "/api/2.0/mlflow/users/create"
USERS_GET = "/api/2.0/mlflow/users/get"
USER_GRANT = "/api/3.0/mlflow/users/permissions/grant"
USER_REVOKE = "/api/3.0/mlflow/users/permissions/revoke"
# A request every client makes: anonymous it must get 401, as the admin 200
PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
SERVER_USER = "postgres"  # the system user the Debian package creates; the cluster runs as it when we are root
START_TIMEOUT_S = 300  # a server start under load (imports on 2 busy cores) took over 120 s


@dataclass(frozen=True)
class Services:
    dir: Path
    host: str  # where both servers listen
    pg_port: int
    mlflow_port: int
    password: str

    @property
    def client_host(self) -> str:
        """The address clients on this host use (a server listening on every interface is reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "*", "::") else self.host

    @property
    def optuna_url(self) -> str:
        """SQLAlchemy 2.1 maps `postgresql://` to psycopg 3 (installed with the project)."""
        return self.optuna_url_with(self.password)

    def optuna_url_with(self, password: str) -> str:
        return f"postgresql://{DB_USER}:{password}@{self.client_host}:{self.pg_port}/optuna"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.client_host}:{self.mlflow_port}"

    def mlflow_password_file(self, user: str = MLFLOW_ADMIN) -> Path:
        return self.dir / "mlflow-users" / user

    def mlflow_env(self, user: str = MLFLOW_ADMIN) -> dict[str, str]:
        """What a client process needs to reach the MLflow server as `user`: the URL and MLflow's own credential
        variables (read by every MLflow client, never shown by the harness)."""
        return {"MLFLOW_TRACKING_URI": self.mlflow_url, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": self.mlflow_password_file(user).read_text().strip()}


def pg_binary(name: str) -> str:
    """A PostgreSQL server program: on PATH, else in the newest /usr/lib/postgresql/<version>/bin (where Debian's
    package puts it, off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
                        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if candidates:
        return str(candidates[-1])
    raise ConfigError(f"PostgreSQL's {name} was not found (on PATH or in /usr/lib/postgresql/*/bin): `make services` "
                      "installs it as root with apt-get; otherwise install the package postgresql")


def _as_server_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its programs as the `postgres` system user."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ConfigError(f"running as root, PostgreSQL needs an unprivileged system user {SERVER_USER!r}, and there "
                          "is none: install the package postgresql (it creates it) or run as another user") from None
    return ["runuser", "-u", SERVER_USER, "--", *cmd]


def _give_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(SERVER_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _run(cmd: list[str], what: str) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"{what} failed (exit {out.returncode}): {(out.stderr or out.stdout).strip()[-2000:]}")
    return out


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@contextlib.contextmanager
def _locked(directory: Path):
    """One start or stop at a time per directory (two `make services` at once must not start two servers)."""
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _settings(directory: Path, host: str, pg_port: int, mlflow_port: int) -> Services:
    """The directory's host, ports and passwords: chosen at its first start, kept for every later one (the URLs
    and credentials other machines were given stay valid)."""
    state = directory / "services.json"
    password_file = directory / "password"
    if not password_file.exists():
        _write_private(password_file, secrets.token_urlsafe(24))  # URL-safe: goes into the URL as it is
    users = directory / "mlflow-users"
    users.mkdir(mode=0o700, exist_ok=True)
    if not (users / MLFLOW_ADMIN).exists():
        _write_private(users / MLFLOW_ADMIN, secrets.token_urlsafe(24))
    if state.exists():
        saved = json.loads(state.read_text())
        host, pg_port, mlflow_port = saved["host"], saved["pg_port"], saved["mlflow_port"]
    else:
        state.write_text(json.dumps({"host": host, "pg_port": pg_port, "mlflow_port": mlflow_port}) + "\n")
    return Services(directory, host, pg_port, mlflow_port, password_file.read_text().strip())


def _init_cluster(s: Services) -> None:
    if subprocess.run(_as_server_user(["test", "-x", str(s.dir)])).returncode != 0:
        raise ConfigError(f"{s.dir}: the user {SERVER_USER!r}, which runs PostgreSQL, cannot enter it (a directory "
                          "above it is private, as pytest's and mkdtemp's are); choose one under a path others may "
                          "enter")
    data = s.dir / "pg"
    data.mkdir(mode=0o700)
    _give_to_server_user(data)
    pwfile = s.dir / "pg.pwfile"  # initdb reads the superuser's password from a file the server user can read
    _write_private(pwfile, s.password + "\n")
    _give_to_server_user(pwfile)
    try:
        _run(_as_server_user([pg_binary("initdb"), "-D", str(data), "-U", DB_USER, f"--pwfile={pwfile}",
                              "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"]), f"initdb -D {data}")
    finally:
        pwfile.unlink()
    listen = "*" if s.host in ("0.0.0.0", "*", "::") else s.host
    with open(data / "postgresql.conf", "a") as f:
        # TCP only (no socket file to place or clean up); sweep drivers, trial processes and the MLflow server's
        # connection pools together need more than the default 100 connections with several workers
        f.write(f"\nlisten_addresses = '{listen}'\nport = {s.pg_port}\nunix_socket_directories = ''\n"
                "max_connections = 300\n")
    if listen != s.host or s.host not in ("127.0.0.1", "localhost"):
        with open(data / "pg_hba.conf", "a") as f:  # other machines, with the password
            f.write("host all all 0.0.0.0/0 scram-sha-256\nhost all all ::/0 scram-sha-256\n")


def postgres_running(s: Services) -> bool:
    data = s.dir / "pg"
    if not data.exists():
        return False
    return subprocess.run(_as_server_user([pg_binary("pg_ctl"), "status", "-D", str(data)]),
                          capture_output=True).returncode == 0


def _check_scram_only(s: Services, con, started: bool) -> None:
    """Refuses a cluster whose pg_hba.conf has a rule with another method than a SCRAM password (or `reject`):
    `trust` lets anyone in who reaches the port, md5 and password are weaker. PostgreSQL's own parse of the file
    (pg_hba_file_rules) is read, so what is judged is what the server applies at its next start or reload."""
    bad = con.execute("SELECT line_number, auth_method, error FROM pg_hba_file_rules WHERE error IS NOT NULL OR "
                      "auth_method NOT IN ('scram-sha-256', 'reject') ORDER BY line_number").fetchall()
    if not bad:
        return
    if started:  # not left listening with the rule in force
        _run(_as_server_user([pg_binary("pg_ctl"), "stop", "-D", str(s.dir / "pg"), "-m", "fast", "-w"]),
             "pg_ctl stop")
    rules = "; ".join(f"line {n}: {error or method}" for n, method, error in bad)
    raise ConfigError(f"{s.dir / 'pg' / 'pg_hba.conf'} lets clients in without a SCRAM password ({rules}): the team "
                      "set-up accepts only `scram-sha-256` (or `reject`) rules. Change or remove those lines, then "
                      f"start again{'' if started else ' after `make services-stop`'} (PostgreSQL "
                      f"{'was stopped' if started else 'still runs with the rules it loaded'})")


def _start_postgres(s: Services) -> bool:
    """Starts the cluster (initialised first if new), checks that it takes SCRAM passwords only and creates the
    databases; False if it was running."""
    if not (s.dir / "pg" / "PG_VERSION").exists():
        if (s.dir / "pg").exists():
            raise ConfigError(f"{s.dir / 'pg'} exists but holds no PostgreSQL cluster (an interrupted initdb?): "
                              "delete it and start again")
        _init_cluster(s)
    started = not postgres_running(s)
    if started:
        log = s.dir / "postgres.log"
        log.touch()
        _give_to_server_user(log)
        _run(_as_server_user([pg_binary("pg_ctl"), "start", "-D", str(s.dir / "pg"), "-l", str(log), "-w",
                              "-t", str(START_TIMEOUT_S)]), f"pg_ctl start (log: {log})")
    import psycopg

    with psycopg.connect(host=s.client_host, port=s.pg_port, user=DB_USER, password=s.password, dbname="postgres",
                         autocommit=True, connect_timeout=10) as con:
        _check_scram_only(s, con, started)
        have = {name for (name,) in con.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in have:
                con.execute(f'CREATE DATABASE "{name}"')
    import optuna

    # Optuna's tables now: optuna-dashboard (`make dashboard`) refuses a database without them, and workers that
    # start together need not race to create them
    optuna.storages.RDBStorage(s.optuna_url).engine.dispose()
    return started


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _mlflow_pid(s: Services) -> int | None:
    """The recorded MLflow server process if it still runs (a reused pid is not an mlflow process)."""
    try:
        pid = int((s.dir / "mlflow.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) and b"mlflow" in cmdline else None


def mlflow_healthy(s: Services) -> bool:
    try:
        with urllib.request.urlopen(f"{s.mlflow_url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _mlflow_status(s: Services, credentials: tuple[str, str] | None = None) -> int | None:
    """The HTTP status of PROBE, anonymous or as `credentials`; None when the server does not answer."""
    import requests

    try:
        return requests.get(f"{s.mlflow_url}{PROBE}", auth=credentials, timeout=30).status_code
    except requests.RequestException:
        return None


def _admin(s: Services) -> tuple[str, str]:
    return MLFLOW_ADMIN, s.mlflow_password_file().read_text().strip()


def _check_auth(s: Services) -> None:
    """The running server refuses anonymous requests and takes the admin's password from its file."""
    anonymous, admin = _mlflow_status(s), _mlflow_status(s, _admin(s))
    if anonymous is None:
        raise ConfigError(f"the MLflow server on {s.mlflow_url} does not answer (log {s.dir / 'mlflow.log'})")
    if anonymous != 401:
        raise ConfigError(f"the MLflow server on {s.mlflow_url} answered an anonymous request with {anonymous}, not "
                          f"401: its authentication is off (log {s.dir / 'mlflow.log'})")
    if admin != 200:
        raise ConfigError(
            f"the MLflow server on {s.mlflow_url} answered its admin with {admin}: the password in "
            f"{s.mlflow_password_file()} is not the one in its user database ({AUTH_DATABASE}), which keeps the "
            "admin's first password (was the file replaced?). Put the first one back; `mlflow-auth.ini` only "
            "creates the admin in an empty database")


def _write_auth_config(s: Services) -> Path:
    """MLflow's basic-auth settings (0600: the admin's password is in it; the server reads it only to create the
    admin in an empty user database). The user database reaches PostgreSQL with the server's pgpass, so the database
    password is not in it."""
    path = s.dir / "mlflow-auth.ini"
    _write_private(path, "[mlflow]\n"
                         "default_permission = NO_PERMISSIONS\n"
                         f"database_uri = postgresql+psycopg://{DB_USER}@{s.client_host}:{s.pg_port}/{AUTH_DATABASE}\n"
                         f"admin_username = {MLFLOW_ADMIN}\n"
                         f"admin_password = {_admin(s)[1]}\n"
                         f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n")
    return path


# The admin must come from mlflow-auth.ini (MLflow lets MLFLOW_AUTH_ADMIN_* override it); a client's tracking
# settings in the caller's shell mean nothing to the server, and its password is kept out of the server's environment
SERVER_ENV_DROPPED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                      "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")


def _start_mlflow(s: Services, workers: int) -> str:
    """Starts the tracking server with MLflow's basic-auth app, in its own session (stop signals its whole group),
    unless it runs with authentication already; checks the authentication either way. Says what it did."""
    done = "started"
    if _mlflow_pid(s) is not None:
        if _mlflow_status(s) != 200:
            _check_auth(s)
            return "already running"
        _stop_mlflow(s)
        done = "restarted with authentication (it answered anonymous requests)"
    artifacts = s.dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    pgpass = s.dir / "pgpass"
    _write_private(pgpass, "".join(f"{s.client_host}:{s.pg_port}:{db}:{DB_USER}:{s.password}\n"
                                   for db in ("mlflow", AUTH_DATABASE)))
    env = {k: v for k, v in os.environ.items() if k not in SERVER_ENV_DROPPED}
    # the key signs the sign-up page's CSRF tokens; every worker inherits this one, and a new one at each start
    # only voids sign-up forms left open across a restart
    env.update(PGPASSFILE=str(pgpass), MLFLOW_AUTH_CONFIG_PATH=str(_write_auth_config(s)),
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(32))
    # MLflow's job runner (GenAI judges and trace jobs, unused here) starts a pool of consumer processes: off unless
    # asked for, on machines with few cores
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
           "--backend-store-uri", f"postgresql+psycopg://{DB_USER}@{s.client_host}:{s.pg_port}/mlflow",
           "--artifacts-destination", str(artifacts), "--serve-artifacts",
           "--host", s.host, "--port", str(s.mlflow_port), "--workers", str(workers)]
    if s.host not in ("127.0.0.1", "localhost"):
        cmd += ["--allowed-hosts", "*"]  # other machines address it by a name this host cannot know
    with open(s.dir / "mlflow.log", "a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=s.dir, start_new_session=True)
    (s.dir / "mlflow.pid").write_text(f"{proc.pid}\n")
    deadline = time.time() + START_TIMEOUT_S
    while not mlflow_healthy(s):
        if proc.poll() is not None or time.time() > deadline:
            _stop_mlflow(s)
            tail = (s.dir / "mlflow.log").read_text()[-2000:]
            raise ConfigError(f"the MLflow server did not come up on {s.mlflow_url} (log {s.dir / 'mlflow.log'}):\n"
                              f"{tail}")
        time.sleep(0.5)
    _check_auth(s)
    return done


def _stop_mlflow(s: Services) -> bool:
    pid = _mlflow_pid(s)
    if pid is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # the server and its workers
    deadline = time.time() + 30
    while _pid_alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    (s.dir / "mlflow.pid").unlink(missing_ok=True)
    return True


def start(directory: Path = DEFAULT_DIR, host: str = "127.0.0.1", pg_port: int = PG_PORT,
          mlflow_port: int = MLFLOW_PORT, workers: int = 2, quiet: bool = False) -> Services:
    """Both servers running (started if not); host and ports apply at a directory's first start only."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # the server user must reach pg/ inside it
    with _locked(directory):
        s = _settings(directory, host, pg_port, mlflow_port)
        pg_new = _start_postgres(s)
        mlflow_done = _start_mlflow(s, workers)
    if not quiet:
        # the passwords stay in their files: the lines read them, so they reach neither this output nor a command line
        print(f"[services] PostgreSQL on {s.client_host}:{s.pg_port}: {'started' if pg_new else 'already running'}"
              f"\n[services] MLflow server on {s.mlflow_url} (authentication on; artifacts served from "
              f"{directory / 'artifacts'}): {mlflow_done}\n[services] data in {directory}; for sweeps and runs "
              f"against them, as the MLflow admin (`make services-user NAME=... PERMISSION=READ|EDIT|MANAGE` adds "
              "users):\n"
              f"export OPTUNA_STORAGE=\"{s.optuna_url_with(_contents(directory / 'password'))}\"\n"
              f"export MLFLOW_TRACKING_URI={s.mlflow_url}\n{_credentials_lines(s, MLFLOW_ADMIN)}", flush=True)
    return s


def _contents(path: Path) -> str:
    """A shell word that expands to the file's contents where it is run."""
    return f"$(cat {shlex.quote(str(path))})"


def _credentials_lines(s: Services, user: str) -> str:
    return (f"export MLFLOW_TRACKING_USERNAME={user}\n"
            f"export MLFLOW_TRACKING_PASSWORD=\"{_contents(s.mlflow_password_file(user))}\"")


def add_user(directory: Path, name: str, permission: str, quiet: bool = False) -> Path:
    """MLflow user `name` on the running server with `permission` on every experiment and registered model, and
    its generated password in mlflow-users/<name> (0600); returns that file. For a user that exists already only
    the permission changes (its password stays)."""
    if permission not in PERMISSIONS:
        raise ConfigError(f"permission {permission!r}: expected one of {', '.join(PERMISSIONS)}")
    if not USER_NAME.fullmatch(name) or name == MLFLOW_ADMIN:
        raise ConfigError(f"user name {name!r}: expected a letter, then up to 63 letters, digits, '_', '.' or '-', "
                          f"and not {MLFLOW_ADMIN!r}")
    directory = Path(directory).resolve()
    if not (directory / "services.json").exists():
        raise ConfigError(f"{directory}: no services were started there (`make services` starts them)")
    s = _settings(directory, "", 0, 0)
    if not mlflow_healthy(s):
        raise ConfigError(f"the MLflow server on {s.mlflow_url} is not running (`make services` starts it)")
    import requests

    api = requests.Session()
    api.auth = _admin(s)

    def call(path: str, body: dict, method: str = "POST", ok: tuple[str, ...] = ()) -> bool:
        """True when the server did it; False when it answered with one of the error codes in `ok`."""
        answer = api.request(method, f"{s.mlflow_url}{path}", timeout=60,
                             **({"params": body} if method == "GET" else {"json": body}))
        if answer.status_code == 200:
            return True
        if any(code in answer.text for code in ok):
            return False
        raise ConfigError(f"the MLflow server refused {path} for {name!r} ({answer.status_code}): {answer.text[:500]}")

    password_file = s.mlflow_password_file(name)
    created = not call(USERS_GET, {"username": name}, "GET", ok=("RESOURCE_DOES_NOT_EXIST",))
    if created:
        password = secrets.token_urlsafe(24)
        _write_private(password_file, password)  # first: a user whose password is nowhere would be of no use
        call(USERS_CREATE, {"username": name, "password": password})
    for resource_type in GRANTED_TYPES:
        grant = {"username": name, "resource_type": resource_type, "resource_id": "*", "permission": permission}
        if not call(USER_GRANT, grant, ok=("RESOURCE_ALREADY_EXISTS",)):  # it has one: replaced
            call(USER_REVOKE, {k: grant[k] for k in ("username", "resource_type", "resource_id")})
            call(USER_GRANT, grant)
    if not quiet:
        where = (f"password in {password_file} (0600)" if password_file.exists()
                 else "its password unchanged and not in a file here")
        print(f"[services] MLflow user {name}: {'created' if created else 'exists'}, {permission} on every "
              f"experiment and registered model; {where}. Give the file to {name} privately; they run with:\n"
              f"export MLFLOW_TRACKING_URI={s.mlflow_url}\n{_credentials_lines(s, name)}", flush=True)
    return password_file


def stop(directory: Path = DEFAULT_DIR, quiet: bool = False) -> None:
    directory = Path(directory).resolve()
    if not (directory / "services.json").exists():
        raise ConfigError(f"{directory}: no services were started there")
    with _locked(directory):
        s = _settings(directory, "", 0, 0)
        mlflow_stopped = _stop_mlflow(s)
        pg_stopped = postgres_running(s)
        if pg_stopped:
            _run(_as_server_user([pg_binary("pg_ctl"), "stop", "-D", str(directory / "pg"), "-m", "fast", "-w"]),
                 "pg_ctl stop")
    if not quiet:
        print(f"[services] MLflow server: {'stopped' if mlflow_stopped else 'was not running'}\n"
              f"[services] PostgreSQL: {'stopped' if pg_stopped else 'was not running'}", flush=True)


def status(directory: Path = DEFAULT_DIR) -> bool:
    """Prints what runs; True when both do."""
    directory = Path(directory).resolve()
    if not (directory / "services.json").exists():
        print(f"[services] none in {directory} (`make services` starts them)")
        return False
    s = _settings(directory, "", 0, 0)
    pg, ml = postgres_running(s), _mlflow_pid(s) is not None and mlflow_healthy(s)
    anonymous = ml and _mlflow_status(s) == 200
    shown = ("stopped" if not ml else "running WITHOUT authentication (started before it was on: `make services` "
             "restarts it with authentication)" if anonymous else "running, authentication on")
    print(f"[services] PostgreSQL on {s.client_host}:{s.pg_port}: {'running' if pg else 'stopped'}\n"
          f"[services] MLflow server on {s.mlflow_url}: {shown}")
    return pg and ml and not anonymous


def main(args: argparse.Namespace) -> int:
    if args.action == "start":
        start(Path(args.dir), args.host, args.pg_port, args.mlflow_port, args.workers)
    elif args.action == "stop":
        stop(Path(args.dir))
    elif args.action == "user":
        if not args.name:
            raise ConfigError("services user needs --name (make services-user NAME=...)")
        add_user(Path(args.dir), args.name, args.permission)
    else:
        return 0 if status(Path(args.dir)) else 3
    return 0


def add_parser(sub) -> None:
    """`services` in `python -m harness`'s command line."""
    p = sub.add_parser("services", help="start, stop or show a PostgreSQL server and an MLflow tracking server "
                                        "on this host (the team set-up, both authenticated), or add an MLflow user")
    p.add_argument("action", choices=("start", "stop", "status", "user"))
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="where their data lives (default: services/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="where both listen, at the first start (0.0.0.0: other machines too, with the passwords)")
    p.add_argument("--pg-port", type=int, default=PG_PORT, help=f"PostgreSQL's port at the first start ({PG_PORT})")
    p.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT,
                   help=f"the MLflow server's port at the first start ({MLFLOW_PORT})")
    p.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (2)")
    p.add_argument("--name", help="user: the MLflow user to add (its password is generated into "
                                  "mlflow-users/NAME); again for an existing one: its permission changes")
    p.add_argument("--permission", choices=PERMISSIONS, default="READ",
                   help="user: what it may do on every experiment and registered model (READ)")
    p.set_defaults(func=main)
