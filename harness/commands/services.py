"""`python -m harness services start|stop|status [--dir D]`: the team set-up on one host.

A PostgreSQL cluster (databases `optuna` for sweeps and `mlflow` for runs) and an MLflow tracking server backed by
it, whose artifact store (`--artifacts-destination D/artifacts`) is served through the server: clients upload and
download artifacts over HTTP and share nothing with the host but the two URLs. Everything lives under one
directory (default `services/` at the repository root, gitignored):

  pg/             the cluster (owned by the `postgres` system user when started as root: PostgreSQL refuses root)
  password        the generated password of the database user `harness` (0600; the Optuna URL carries it)
  pgpass          libpq's password file for the MLflow server, so the password is not on its command line (0600)
  services.json   host and ports, fixed at the first start; later starts reuse them
  artifacts/      MLflow's artifact store
  postgres.log, mlflow.log, mlflow.pid

`start` is idempotent: what already runs is left alone (and said so). The same functions give the tests their
servers in a temporary directory on free ports.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import secrets
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
DATABASES = ("optuna", "mlflow")
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
        return f"postgresql://{DB_USER}:{self.password}@{self.client_host}:{self.pg_port}/optuna"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.client_host}:{self.mlflow_port}"


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
    """The directory's host, ports and password: chosen at its first start, kept for every later one (the URLs
    other machines were given stay valid)."""
    state = directory / "services.json"
    password_file = directory / "password"
    if not password_file.exists():
        _write_private(password_file, secrets.token_urlsafe(24))  # URL-safe: goes into the URL as it is
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


def _start_postgres(s: Services) -> bool:
    """Starts the cluster (initialised first if new) and creates the databases; False if it was running."""
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


def _start_mlflow(s: Services, workers: int) -> bool:
    """Starts the tracking server in its own session (stop signals its whole group); False if it was running."""
    if _mlflow_pid(s) is not None:
        return False
    artifacts = s.dir / "artifacts"
    artifacts.mkdir(exist_ok=True)
    pgpass = s.dir / "pgpass"
    _write_private(pgpass, f"{s.client_host}:{s.pg_port}:mlflow:{DB_USER}:{s.password}\n")
    env = {**os.environ, "PGPASSFILE": str(pgpass)}
    env.pop("MLFLOW_TRACKING_URI", None)
    # MLflow's job runner (GenAI judges and trace jobs, unused here) starts a pool of consumer processes: off unless
    # asked for, on machines with few cores
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    cmd = [sys.executable, "-m", "mlflow", "server",
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
    return True


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
        mlflow_new = _start_mlflow(s, workers)
    if not quiet:
        print(f"[services] PostgreSQL on {s.client_host}:{s.pg_port}: {'started' if pg_new else 'already running'}"
              f"\n[services] MLflow server on {s.mlflow_url} (artifacts served from {directory / 'artifacts'}): "
              f"{'started' if mlflow_new else 'already running'}\n[services] data in {directory}; "
              "for sweeps and runs against them:\n"
              f"export OPTUNA_STORAGE={s.optuna_url}\nexport MLFLOW_TRACKING_URI={s.mlflow_url}", flush=True)
    return s


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
    print(f"[services] PostgreSQL on {s.client_host}:{s.pg_port}: {'running' if pg else 'stopped'}\n"
          f"[services] MLflow server on {s.mlflow_url}: {'running' if ml else 'stopped'}")
    return pg and ml


def main(args: argparse.Namespace) -> int:
    if args.action == "start":
        start(Path(args.dir), args.host, args.pg_port, args.mlflow_port, args.workers)
    elif args.action == "stop":
        stop(Path(args.dir))
    else:
        return 0 if status(Path(args.dir)) else 3
    return 0


def add_parser(sub) -> None:
    """`services` in `python -m harness`'s command line."""
    p = sub.add_parser("services", help="start, stop or show a PostgreSQL server and an MLflow tracking server "
                                        "on this host (the team set-up)")
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="where their data lives (default: services/)")
    p.add_argument("--host", default="127.0.0.1",
                   help="where both listen, at the first start (0.0.0.0: other machines too, with the password)")
    p.add_argument("--pg-port", type=int, default=PG_PORT, help=f"PostgreSQL's port at the first start ({PG_PORT})")
    p.add_argument("--mlflow-port", type=int, default=MLFLOW_PORT,
                   help=f"the MLflow server's port at the first start ({MLFLOW_PORT})")
    p.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (2)")
    p.set_defaults(func=main)
