"""Store calls that survive a busy store: retried while another writer holds a SQLite store, or when another client
inserted the same row a moment before, with Ctrl-C and SIGTERM held until the call is done."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterator

LOCKED_ATTEMPTS = 30  # ~30 s of waiting in all
# MLflow looks a row up, then inserts it if missing (an experiment's dataset in log_inputs, an experiment tag): two
# clients writing the same new row at once (sweep trials starting together, two runs of a new experiment) both insert,
# and one gets the database's duplicate-key error as a 400. The row exists then: the same call, sent again, finds it.
# PostgreSQL's, SQLite's and MySQL's words for it.
_DUPLICATE_ROW = re.compile(r"duplicate key value violates unique constraint|UNIQUE constraint failed|Duplicate entry")
DUPLICATE_ATTEMPTS = 3


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
    'database is locked'. Such a write is retried for up to ~30 s instead of failing the run or losing its status.
    A write that raced another client's insert of the same row is sent again (up to DUPLICATE_ATTEMPTS)."""
    with interrupts_held():
        locked = duplicate = 0
        while True:
            try:
                return call(*args, **kwargs)
            except Exception as e:  # MLflow wraps the SQLAlchemy error; the message is what identifies it
                if "database is locked" in str(e) and (locked := locked + 1) < LOCKED_ATTEMPTS:
                    time.sleep(min(0.1 * locked, 2.0))
                elif _DUPLICATE_ROW.search(str(e)) and (duplicate := duplicate + 1) < DUPLICATE_ATTEMPTS:
                    time.sleep(0.05 * duplicate)
                else:
                    raise
