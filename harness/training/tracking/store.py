"""Which MLflow tracking store a process uses and a client for it. A SQLite store is checked, and created or
upgraded, under a file lock the first time a process opens it: two processes migrating one fresh store at once
both fail and can leave it broken, and a store MLflow cannot migrate is refused with the way out. A tracking server's
refusal of the credentials (401) or of the permission (403) is turned into what to set or ask for."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from mlflow.tracking import MlflowClient

from harness.core.errors import ConfigError
from harness.paths import REPO_ROOT
from harness.training.outbox import CLIENT_DEFAULTS, redact
from harness.training.tracking.retries import retrying


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set (a server, a database), else the embedded SQLite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def shown_tracking_uri() -> str:
    """tracking_uri() as it may be printed or logged: without a password."""
    return redact(tracking_uri())


# MLflow's REST client raises a refused request as "API request to endpoint E failed with error code 401 != 200"
_REFUSED = re.compile(r"API request to endpoint (\S+) failed with error code (401|403)\b")


def _refused(error: BaseException) -> tuple[int, str] | None:
    """(401 or 403, the endpoint) when `error` is the tracking server refusing a request."""
    response = getattr(error, "response", None)  # requests' HTTPError: MLflow's artifact uploads and downloads
    if getattr(response, "status_code", None) in (401, 403):  # (httpx's, from a judge, has them too)
        server, asked = urlsplit(tracking_uri()), urlsplit(str(response.url))
        if (asked.hostname, asked.port) == (server.hostname, server.port):  # not a judge's or a hub's refusal
            return response.status_code, asked.path
    found = _REFUSED.search(str(error))
    return (int(found[2]), found[1]) if found else None


def tracking_account() -> str | None:
    """The account the tracking server is sent: the tracking URL's when it has one, else the environment's, else
    ~/.mlflow/credentials'; None without one, and for a local store, which is sent none."""
    from mlflow.utils.credentials import read_mlflow_creds

    url = urlsplit(tracking_uri())
    if url.scheme not in ("http", "https"):
        return None
    return url.username or read_mlflow_creds().username or None


def auth_refusal(error: BaseException) -> str | None:
    """What to do about a request the tracking server refused: not authenticated (401) or not permitted (403);
    None for any other error."""
    refused = _refused(error)
    if refused is None:
        return None
    status, endpoint = refused
    user = tracking_account()
    if status == 401:
        who = f"it does not take the password given for user {user!r}" if user else "no credentials were given"
        return (f"the MLflow server {shown_tracking_uri()} refused the request (401 on {endpoint}): {who}. Set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLflow's credentials file "
                "~/.mlflow/credentials) to an account on it: `make services` prints the lines for its admin, "
                "`make services-user NAME=...` adds accounts")
    return (f"the MLflow server {shown_tracking_uri()} does not let user {user!r} do this (403 on {endpoint}): its "
            f"admin can give EDIT with `make services-user NAME={user or '...'} PERMISSION=EDIT`")


class TrackingStoreError(ConfigError):
    """A tracking store that cannot be used as it is; the message names the database file and what to do."""


STORE_LOCK_WAIT_S = 600  # creating or upgrading a store takes seconds; a holder past this is stuck


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:` URI (a relative one from the working directory, as SQLite opens it);
    None for a server, another database or an in-memory one."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    database = make_url(uri).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


@contextlib.contextmanager
def _store_lock(db: Path) -> Iterator[None]:
    """An fcntl lock on `<db>.lock`, which the OS drops if its holder dies. Every process of the harness takes it
    before it first opens a SQLite store, so one creates or upgrades the schema at a time: MLflow runs its schema
    migration on every fresh store, and two processes doing so at once both fail and can leave it broken."""
    db.parent.mkdir(parents=True, exist_ok=True)
    lock = db.with_name(db.name + ".lock")
    with open(lock, "a") as f:
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrackingStoreError(
                        f"{lock}: another process (`fuser {lock}` shows it) has been creating or upgrading the "
                        f"MLflow store {db} for over {STORE_LOCK_WAIT_S} s; stop it, or wait for it") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _schema_revisions() -> tuple[str, set[str]]:
    """This MLflow's head schema revision and every revision it knows."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    return script.get_current_head(), {r.revision for r in script.walk_revisions()}


def check_store_schema(db: Path, uri: str) -> None:
    """Refuses, naming the file and the way out, a SQLite store whose schema MLflow would otherwise try to migrate
    from a state it cannot: one an interrupted upgrade left half-done (`_alembic_tmp_*` tables, tables without a
    schema version) or one at another schema revision than this MLflow's. A missing or empty file is fine."""
    if not db.exists() or db.stat().st_size == 0:
        return
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            versions = ([v for (v,) in con.execute("SELECT version_num FROM alembic_version")]
                        if "alembic_version" in tables else [])
            runs = con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise TrackingStoreError(f"MLflow store {db} is not a readable SQLite database ({e}); move it away or point "
                                 "MLFLOW_TRACKING_URI at another store") from None
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if not leftovers and not versions and all(t.startswith(("alembic_", "sqlite_")) for t in tables):
        return  # empty: MLflow creates the tables
    head, known = _schema_revisions()
    if versions == [head] and not leftovers:
        return
    import mlflow

    upgrade = f"`.venv/bin/mlflow db upgrade {uri}`"
    fresh = f"It holds {runs} run(s); if none is needed, delete {db} and the next run creates a fresh store."
    if leftovers:
        fixes = [f"DROP TABLE {t};" if t.removeprefix("_alembic_tmp_") in tables
                 else f"ALTER TABLE {t} RENAME TO {t.removeprefix('_alembic_tmp_')};" for t in leftovers]
        raise TrackingStoreError(
            f"MLflow store {db} was left half-migrated by an interrupted schema upgrade (leftover table(s) "
            f"{', '.join(leftovers)}). Back it up (cp {db} {db}.bak), then run sqlite3 {db} \"{' '.join(fixes)}\" "
            f"and {upgrade}. {fresh}")
    if not versions:
        raise TrackingStoreError(
            f"MLflow store {db} has MLflow tables but no schema version: its creation was interrupted. "
            f"Back it up (cp {db} {db}.bak) and run {upgrade}. {fresh}")
    if versions[0] not in known:
        raise TrackingStoreError(
            f"MLflow store {db} has schema revision {versions[0]}, which MLflow {mlflow.__version__} does not know "
            "(a newer MLflow wrote it): use that MLflow, or point MLFLOW_TRACKING_URI at another store.")
    raise TrackingStoreError(
        f"MLflow store {db} has schema revision {versions[0]}, behind MLflow {mlflow.__version__}'s {head} (an "
        f"older MLflow wrote it, or an upgrade was interrupted). Back it up (cp {db} {db}.bak) and run {upgrade}. "
        f"{fresh}")


_opened: set[tuple[str, Path]] = set()  # (URI, file) of the SQLite stores this process has opened under the lock
_opened_guard = threading.Lock()


def open_client(uri: str | None = None) -> MlflowClient:
    """A client for `uri` (default: tracking_uri()). A SQLite store is checked, and created or upgraded, under its
    lock the first time this process opens it; MLflow keeps that opened store for the process, so later clients do
    not touch the schema."""
    uri = uri or tracking_uri()
    if uri.startswith(("http://", "https://")):
        for key, value in CLIENT_DEFAULTS.items():  # read by MLflow at every request
            os.environ.setdefault(key, value)
    db = sqlite_path(uri)
    if db is None or (uri, db) in _opened:
        return MlflowClient(uri)
    with _opened_guard, _store_lock(db):
        if (uri, db) not in _opened:
            check_store_schema(db, uri)
            try:
                client = retrying(MlflowClient, uri)  # a fresh store: creates the tables and runs the migrations
            except Exception as e:
                raise TrackingStoreError(f"MLflow store {db} could not be opened or upgraded: {e}") from e
            _opened.add((uri, db))
            return client
    return MlflowClient(uri)
