"""File and socket helpers: files other processes read while they may be written (never seen half-written),
and a free loopback port for a server the harness starts."""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from harness.core.errors import ConfigError


def check_output_file(path: Path, inputs: Iterable[Path | str | None] = ()) -> None:
    """Refuse, naming the paths, an output `path` that is a directory or the same file as one of `inputs`
    (also through a symlink or another relative spelling): writing it would fail, or destroy the input."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give the path of a file to write")
    for source in inputs:
        if source is not None and path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise ConfigError(f"{path} is the same file as the input {source}: refusing to overwrite an input; "
                              "write to another path")


def _new_temp(directory: Path) -> tuple[int, Path]:
    """A new empty file in `directory`, created with mode 0666 less the umask, as open() would create it
    (tempfile.mkstemp's 0600 would survive the rename)."""
    while True:
        tmp = directory / f".tmp-{secrets.token_hex(6)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_writer(path: Path, inputs: Iterable[Path | str | None] = ()) -> Iterator[TextIO]:
    """A text file to write `path` through: it goes to a temporary name in the same directory and is renamed to
    `path` when the block ends, so a reader sees the old file or the new one. If the block raises, the temporary
    file is removed and `path` is left as it was (all or nothing).

    `path` must not be a directory nor one of `inputs` (see check_output_file). The file gets the mode a plain
    open() would give it (0666 less the umask), or the mode of the file it replaces."""
    path = Path(path)
    inputs = list(inputs)
    check_output_file(path, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp(path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if path.exists():
                os.fchmod(f.fileno(), stat.S_IMODE(path.stat().st_mode))
            yield f
        check_output_file(path, inputs)  # again: the block may have run long
        try:
            os.replace(tmp, path)
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory: give the path of a file to write") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data) -> None:
    """`data` as JSON at `path`, written through `atomic_writer`."""
    with atomic_writer(path) as f:
        json.dump(data, f)


@contextmanager
def atomic_directory(path: Path, replace: bool = False) -> Iterator[Path]:
    """A directory to fill in place of `path`: a temporary directory beside it, renamed to `path` when the block
    ends, so a reader sees no directory (or the old one) or the whole new one. If the block raises, the temporary
    directory is removed and `path` is left as it was. An existing `path` is refused (ConfigError) unless
    `replace`, which swaps it out only after the new one is complete."""
    import shutil

    path = Path(path)
    if path.exists() and not replace:
        raise ConfigError(f"{path} already exists: choose another directory, or remove it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{secrets.token_hex(6)}")
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{secrets.token_hex(6)}")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _unwritable_dir(path: Path) -> str | None:
    """Why directory `path` neither takes new entries nor can be created, or None. Tried for real (root ignores
    permission bits, a read-only mount does not), leaving nothing behind."""
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    probe = existing / f".write-check-{secrets.token_hex(6)}"
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return f"cannot {'write in' if existing == path else 'create it under'} {existing} ({e.strerror})"
    return None


def check_writable_dir(path: Path, what: str) -> None:
    """Raise ConfigError naming `what` and `path` unless directory `path` takes new entries or can be created."""
    path = Path(path).absolute()
    if why := _unwritable_dir(path):
        raise ConfigError(f"{what} {path}: {why}; choose a writable location")


def check_writable_file(path: Path, what: str) -> None:
    """`check_writable_dir` for the directory of file `path`; an existing `path` must be a file we may overwrite."""
    path = Path(path).absolute()
    if why := _unwritable_dir(path.parent):
        raise ConfigError(f"{what} {path}: {why}; choose a writable location")
    check_output_file(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{what} {path}: the file is not writable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
