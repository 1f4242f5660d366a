"""File and socket helpers: files other processes read while they may be written (never seen half-written),
and a free loopback port for a server the harness starts."""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary name in the same directory, then rename: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
