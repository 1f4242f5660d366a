"""File and socket helpers: files other processes read while they may be written (never seen half-written),
and a free loopback port for a server the harness starts."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


@contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
    """A text file to write `path` through: it goes to a temporary name in the same directory and is renamed to
    `path` when the block ends, so a reader sees the old file or the new one. If the block raises, the temporary
    file is removed and `path` is left as it was (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """`data` as JSON at `path`, written through `atomic_writer`."""
    with atomic_writer(path) as f:
        json.dump(data, f)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
