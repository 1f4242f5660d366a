"""Writes to an MLflow tracking server that outlive the server being down for a while.

A write that fails because the server cannot be reached is kept, in order, in an in-memory queue; later writes
queue behind it (so a metric's steps arrive in the order they were logged) and training goes on without waiting.
A background thread probes the server with short timeouts and, once it answers, delivers the queue head first.
At the end of the run `close` waits a bounded time for the queue to empty; what is still undelivered then is
written to a JSON-lines file, which `replay` sends later (once: a file it has sent is renamed)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from harness.core.errors import TrackingUnavailable
from harness.core.files import atomic_writer

FLUSH_TIMEOUT_ENV = "HARNESS_MLFLOW_FLUSH_TIMEOUT"
FLUSH_TIMEOUT_S = 300.0  # default wait at the end of a run for a server that is still down
PROBE_TIMEOUT_S = 2.0
MAX_BACKOFF_S = 5.0  # between probes while the server is down: short, so recovery is noticed within seconds

# MLflow's client retries a request 7 times with exponential backoff (about 4 minutes, meant for rate limits) and
# waits 120 s for a response: while a server is down every logging call would stall training that long. A server
# the harness logs to gets these instead (the user's own settings win); the outbox does the longer waiting.
CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# MLflow's REST client wraps a failed connection, a timeout or exhausted retries of a 5xx/429 answer as
# "API request to URL failed with exception ...", and a 5xx answer it did not retry as "... failed with error
# code 5xx"; a 4xx (bad request, missing run) is the caller's error and is raised as it is.
_UNREACHABLE = re.compile(r"API request to \S+ failed with (timeout )?exception|failed with error code 5\d\d")
_PASSWORD = re.compile(r"(://[^/:@\s]+):[^/@\s]*@")


def redact(text: str) -> str:
    """`text` with the password of any URL in it (scheme://user:password@host) replaced by ***."""
    return _PASSWORD.sub(r"\1:***@", text)


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the tracking server could not be reached or failed on its side (worth retrying)."""
    import requests

    return isinstance(error, requests.ConnectionError | requests.Timeout) or bool(_UNREACHABLE.search(str(error)))


def flush_timeout() -> float:
    """Seconds the end of a run waits for queued writes: HARNESS_MLFLOW_FLUSH_TIMEOUT, else FLUSH_TIMEOUT_S."""
    raw = os.environ.get(FLUSH_TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else FLUSH_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        from harness.core.errors import ConfigError

        raise ConfigError(f"{FLUSH_TIMEOUT_ENV}={raw!r}: expected a number of seconds >= 0")
    return value


def server_answers(uri: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an MLflow server at `uri` answers its /health endpoint (any answer below 500: up, maybe strict)."""
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


class Outbox:
    """The ordered queue of writes waiting for the tracking server. `deliver(item)` performs one write (an item is
    a JSON-able dict, so that what is left can be written to a file); `probe()` says whether the server is back."""

    def __init__(self, deliver: Callable[[dict], None], probe: Callable[[], bool], where: str):
        self._deliver = deliver
        self._probe = probe
        self._where = where  # the server, as it may be printed
        self._items: deque[dict] = deque()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rejected: list[tuple[dict, str]] = []  # items the server refused once back: kept for the file
        self._thread: threading.Thread | None = None
        self._closing = False
        self._abandoned = False  # `close` timed out and took the queue for the file
        self._down_since = 0.0
        self.outages = 0
        self.delivered = 0  # queued items delivered after an outage, over the whole run

    def pending(self) -> int:
        with self._lock:
            return len(self._items)

    def send(self, item: dict) -> None:
        """Deliver `item` now, or queue it behind earlier ones while the server is unreachable. After `close`
        (the run has ended) it is delivered or raises: nothing would send a queue then."""
        with self._lock:
            closed = self._closing
        if closed:
            self._deliver(item)
            return
        with self._lock:
            if self._items:
                self._items.append(item)
                return
        try:
            self._deliver(item)
        except Exception as e:
            if not unreachable(e):
                raise
            with self._lock:
                self._items.append(item)
                self._down_since = time.monotonic()
                self.outages += 1
                self._thread = threading.Thread(target=self._drain, name="mlflow-outbox", daemon=True)
                self._thread.start()
            print(f"[warn] MLflow server {self._where} unreachable ({redact(_short(e))}): 1 item queued, training "
                  f"goes on; queued writes are retried in the background and before the run ends", flush=True)

    def _drain(self) -> None:
        backoff = 0.5
        queued = 0  # delivered from the queue in this outage
        while True:
            with self._lock:
                if not self._items:
                    break
                item = self._items[0]
            if not self._probe():
                self._wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
                continue
            try:
                self._deliver(item)
                queued += 1
            except Exception as e:
                if unreachable(e):
                    self._wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                # the server is up and refuses this write: keep it for the file instead of blocking the others
                print(f"[warn] MLflow refused a queued {item['kind']} write ({redact(_short(e))}); it is kept for "
                      f"the run's undelivered-writes file", flush=True)
                with self._lock:
                    self._rejected.append((item, redact(_short(e))))
            with self._lock:
                if self._items and self._items[0] is item:  # else `close` gave up on the queue meanwhile
                    self._items.popleft()
                self._changed.notify_all()
        with self._lock:
            self.delivered += queued
            self._changed.notify_all()
            if self._abandoned:
                return
        print(f"[mlflow] reconnected to {self._where} after {time.monotonic() - self._down_since:.0f}s: {queued} "
              f"queued items delivered", flush=True)

    def _wait(self, seconds: float) -> None:
        with self._lock:
            self._changed.wait(min(seconds, 0.5) if self._closing else seconds)

    def close(self, timeout: float) -> list[dict]:
        """Wait up to `timeout` seconds for queued writes to be delivered; returns what is left (undelivered items,
        then refused ones, each with its `error`), which the caller keeps in a file."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closing = True
            if self._items:
                print(f"[mlflow] waiting up to {timeout:.0f}s ({FLUSH_TIMEOUT_ENV}) for {self._where} to take "
                      f"{len(self._items)} queued writes", flush=True)
            while self._items and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(min(left, 1.0))
            left_over = list(self._items)
            self._abandoned = bool(left_over)
            self._items.clear()  # the drainer stops at its next look; a write it has in flight may arrive twice
            return [*left_over, *({**item, "error": error} for item, error in self._rejected)]


_CAUSE = re.compile(r"\[Errno -?\d+\][^'\")]*|Read timed out|too many \d+ error responses|error code \d+")


def _short(error: BaseException) -> str:
    """The gist of an MLflow/requests error (`[Errno 111] Connection refused`, `error code 503`), else its first
    200 characters: MLflow's message repeats the whole URL and urllib3's retry history."""
    found = _CAUSE.search(str(error))
    return found.group(0).strip() if found else (str(error).strip() or type(error).__name__)[:200]


def write_items(items: list[dict], path: Path) -> Path:
    """Append `items` to the JSON-lines file `path` (created with its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path


def read_items(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def sent_path(path: Path) -> Path:
    """Where `replay` moves a file it has sent in full: NAME.sent.jsonl beside NAME.jsonl."""
    return path.with_name(f"{path.stem}.sent{path.suffix}")


def replay(path: Path, deliver: Callable[[str, dict], None]) -> tuple[dict[str, int], Path]:
    """Send the items of the undelivered-writes file `path` (write_items), in order, as deliver(run_id, write);
    returns the count sent per run and where the file went. Sent in full, it is renamed to sent_path(path), so a
    second replay resends nothing (metrics sent twice would be logged twice). When a write fails (or the replay is
    interrupted), `path` is rewritten with only the writes not sent, from that one on, and TrackingUnavailable
    names it; each rewrite and the rename are atomic, so a crash leaves either the old file or the new one."""
    items = read_items(path)
    sent: dict[str, int] = {}
    for done, item in enumerate(items):
        write = {k: v for k, v in item.items() if k not in ("run_id", "error")}  # error: why it was refused once
        try:
            deliver(item["run_id"], write)
        except BaseException as e:
            with atomic_writer(path) as f:
                f.writelines(json.dumps(i) + "\n" for i in items[done:])
            if not isinstance(e, Exception):  # Ctrl-C: the remainder is kept all the same
                raise
            raise TrackingUnavailable(
                f"{path}: write {done + 1} of {len(items)} ({item['kind']} of run {item['run_id']}) failed: "
                f"{redact(_short(e))}. {done} sent; the {len(items) - done} not sent are kept in {path}: send them "
                f"with `python -m harness mlflow-send {path}` once the cause is fixed") from e
        sent[item["run_id"]] = sent.get(item["run_id"], 0) + 1
    os.replace(path, sent_path(path))
    return sent, sent_path(path)
