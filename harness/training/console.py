"""What a run shows on the console: the harness's own lines ([run], [data], [eval], [train], [mlflow], [warn], the
summary, errors) and, on a terminal, progress bars with an ETA. Everything the libraries print (transformers, TRL,
datasets, vLLM, torch, DeepSpeed, MLflow logging, Python warnings, and what C++ code writes to stderr) goes to
`library.log` in the run's output directory instead, which is logged to MLflow as an artifact."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tqdm import tqdm

from harness.core import ranks
from harness.core.errors import ConfigError, DataError
from harness.training.outbox import redact

if TYPE_CHECKING:
    from transformers import TrainerCallback

PROGRESS_ENV = "HARNESS_PROGRESS"  # 0: never show progress bars; 1: always; unset: when stdout is a terminal
LIBRARY_LOG = "library.log"


def progress_enabled(stream: IO | None = None) -> bool:
    """Whether progress bars are drawn on `stream` (default stdout): HARNESS_PROGRESS=0/1 decides when set, else
    whether the stream is a terminal (a CI log or a pipe gets none: bars there are only noise)."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


def bar(total: int, desc: str, unit: str, stream: IO | None = None, initial: int = 0, leave: bool = True) -> tqdm:
    """A progress bar on `stream` (default stdout) with tqdm's `[elapsed<remaining]` ETA; a no-op object when
    progress_enabled(stream) is False, so callers update it either way."""
    stream = sys.stdout if stream is None else stream
    if isinstance(stream, BarSafeStream):  # the bar itself writes no newlines: straight to the terminal
        stream = stream.stream
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, leave=leave, dynamic_ncols=True,
                disable=not progress_enabled(stream))


class BarSafeStream:
    """Stands in for stdout while bars are on screen: each complete line is written with the bars cleared and then
    redrawn below it, so a print never lands in the middle of a bar."""

    def __init__(self, stream: IO):
        self.stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            lines, _, self._pending = self._pending.rpartition("\n")
            with tqdm.external_write_mode(file=self.stream):
                self.stream.write(lines + "\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        if self._pending:
            text, self._pending = self._pending, ""
            with tqdm.external_write_mode(file=self.stream):
                self.stream.write(text)
        self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def train_progress(stream: IO | None = None) -> TrainerCallback:
    """A trainer callback drawing one bar over the training steps (ETA, last loss) on `stream` (default stdout);
    nothing when progress is off."""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self):
            self.bar: tqdm | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = bar(state.max_steps, "train", "step", stream, initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.bar is not None and isinstance((logs or {}).get("loss"), int | float):
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainProgress()


# Libraries that log to stdout, where the harness's own lines go: their handlers are pointed at stderr (the file)
# when they were imported before the log started (vLLM is told by VLLM_LOGGING_STREAM otherwise).
_STDOUT_LOGGERS = ("DeepSpeed", "vllm")


class LibraryLog:
    """Sends the process's stderr (file descriptor 2) to a file, and with it every library's logging handlers,
    warnings, tqdm bars and the messages C++ code writes there; the harness writes to stdout, and errors are
    printed after `stop()`, so both reach the console. It starts in a temporary file, since engine start-up and
    model loading talk before the run's directory exists, and `move_to` carries on in the run's own file."""

    def __init__(self, prefix: str = "library-"):
        self.prefix = prefix
        self.path: Path | None = None
        self.tracker = None  # the MLflow run (tracking.tracker.Tracker) the file is logged to at the end
        self.temporary = True  # still in the temporary file: move_to not called
        self._saved_fd: int | None = None
        self._stdout: IO | None = None

    def start(self) -> LibraryLog:
        fd, name = tempfile.mkstemp(prefix=f"harness-{self.prefix}", suffix=".log")
        self.path = Path(name)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        os.dup2(fd, 2)
        os.close(fd)
        _quiet_libraries()
        if progress_enabled():
            self._stdout, sys.stdout = sys.stdout, BarSafeStream(sys.stdout)
        _current.append(self)
        return self

    def move_to(self, directory: Path, tracker=None) -> Path:
        """Carry on in `directory`/library.log, starting with what the temporary file holds (then removed); with a
        `tracker`, the file is logged to that MLflow run as an artifact when this log stops (a failed run too)."""
        self.tracker = tracker
        target = Path(directory) / LIBRARY_LOG
        target.parent.mkdir(parents=True, exist_ok=True)
        sys.stderr.flush()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with open(self.path, "rb") as early:
            os.write(fd, early.read())
        os.dup2(fd, 2)
        os.close(fd)
        self.path.unlink(missing_ok=True)
        self.path, self.temporary = target, False
        return target

    def stop(self, failed: bool = False) -> None:
        """Give stderr back to the console. A temporary file still in use (the run never got a directory, or a rank
        other than 0, which has none) is removed, unless the run `failed` and it holds something: then it is kept
        and named on the console, as it may explain the failure."""
        if self._saved_fd is None:
            return
        if _current and _current[-1] is self:
            _current.pop()
        if self._stdout is not None:
            sys.stdout.flush()
            sys.stdout, self._stdout = self._stdout, None
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._saved_fd = None
        if self.tracker is not None:
            try:  # after the run has ended, so that its clean-up's output is in the file too
                self.tracker.log_artifact(str(self.path))
            except Exception as e:  # the store is down: the run's own error, if any, is what matters here
                print(f"[warn] could not log {self.path} to MLflow: {redact(str(e))}", flush=True)
        if self.temporary and self.path is not None and self.path.exists():
            if failed and self.path.stat().st_size:
                print(f"[run] library output of the failed run: {self.path}", file=sys.stderr, flush=True)
            else:
                self.path.unlink()


_current: list[LibraryLog] = []  # the started logs, innermost last


def current() -> LibraryLog:
    """The LibraryLog the running experiment started (harness.training.runner.run_experiment)."""
    if not _current:
        raise RuntimeError("no library log started: run_experiment starts one")
    return _current[-1]


def log_prefix() -> str:
    """The temporary file's name prefix: a rank other than 0 (which never gets a run directory) is named."""
    return "library-" if ranks.is_main() else f"library-rank{ranks.rank()}-"


@contextlib.contextmanager
def library_log() -> Iterator[LibraryLog]:
    """LibraryLog for the duration of the block; stderr is the console's again when it ends, error or not. Inside
    another such block it is that block's log (the command line starts one before its first import, and
    run_experiment one for callers in this process such as tests)."""
    if _current:
        yield _current[-1]
        return
    log = LibraryLog(log_prefix()).start()
    try:
        yield log
    except (ConfigError, DataError):  # bad input, named by the error itself: the libraries' output adds nothing
        log.stop()
        raise
    except BaseException:
        log.stop(failed=True)
        raise
    log.stop()


def _quiet_libraries() -> None:
    """What file descriptor 2 cannot catch on its own: loggers that write to stdout, and datasets' `Map` bars."""
    import logging

    # vLLM configures its logger on import with a stdout handler; the file gets its INFO lines (engine set-up).
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is first imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    # DeepSpeed adds a stdout handler to its logger when first imported (by transformers, building a trainer) and
    # logs its accelerator choice right then: import it now with stdout pointed at stderr, so that handler is too.
    with contextlib.redirect_stdout(sys.stderr), contextlib.suppress(ImportError):
        import deepspeed  # noqa: F401
    for name in _STDOUT_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
                handler.setStream(sys.stderr)
