"""Store calls that survive a busy SQLite store: retried while another writer holds it, with Ctrl-C and SIGTERM
held until the call is done."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator

LOCKED_ATTEMPTS = 30  # ~30 s of waiting in all


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Holds Ctrl-C and SIGTERM until a store call is done, then delivers them. Interrupted mid-transaction, a write
    can leave its SQLite connection holding the write lock, and the KILLED status written next waits on that lock."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread can set handlers
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            signal.raise_signal(pending[0])  # now the usual handler acts: KeyboardInterrupt, or the run's own


def retrying(call, *args, **kwargs):
    """An embedded SQLite store has one writer at a time: a UI or a poller reading it can make a write fail with
    'database is locked'. Such a write is retried for up to ~30 s instead of failing the run or losing its status."""
    with interrupts_held():
        for attempt in range(LOCKED_ATTEMPTS):
            try:
                return call(*args, **kwargs)
            except Exception as e:  # MLflow wraps the SQLAlchemy error; the message is what identifies it
                if "database is locked" not in str(e) or attempt == LOCKED_ATTEMPTS - 1:
                    raise
                time.sleep(min(0.1 * (attempt + 1), 2.0))
