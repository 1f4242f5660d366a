"""Ctrl-C and SIGTERM during a run, taken where the harness chooses: between training steps and evaluations.

A KeyboardInterrupt raised wherever the signal lands can land inside a library that does not expect one: inside
vLLM's prompt-logprobs call it surfaced as vLLM's own UnboundLocalError, so the run ended FAILED with exit 1 and a
traceback instead of KILLED with 130. While `deferred()` is active the first signal only records itself; `check()`
(called by `StopAtBoundary` before every step, by the in-loop evaluation before each evaluation, and when the block
ends) raises the KeyboardInterrupt there, and the run ends KILLED with what it logged. A second signal raises at
once, for a run stuck in a call that does not return."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from transformers import TrainerCallback

_HANDLED = (signal.SIGINT, signal.SIGTERM)
_pending: int | None = None  # the signal recorded while deferred() is active, not acted on yet
_active = False
_patient = False  # a repeated signal is only recorded too (patient())


def _record(signum: int, frame) -> None:
    global _pending
    if _pending is not None:
        if _patient:
            return
        raise KeyboardInterrupt(f"{signal.Signals(signum).name} again: not waiting for the step to end")
    _pending = signum
    # on stdout, where the harness's lines go (stderr is the run's library.log); os.write, not print: the signal
    # may have landed inside a print to the same stream
    os.write(1, f"\n[run] {signal.Signals(signum).name}: stopping after the current training step or evaluation "
                f"(send it again to stop at once)\n".encode())


def check() -> None:
    """Raises KeyboardInterrupt when a signal was recorded; a point where the run can stop cleanly."""
    if _pending is not None:
        raise KeyboardInterrupt(signal.Signals(_pending).name)


def patient(recorded: int | None = None) -> bool:
    """Inside deferred(): a repeated signal is recorded too instead of stopping at once, and `recorded` (a signal
    taken before deferred() began) counts as pending. For a sweep trial, which gets Ctrl-C and then its driver's
    forwarded SIGTERM and must still stop at a boundary. False (nothing changed) outside deferred()."""
    global _patient, _pending
    if not _active:
        return False
    _patient = True
    if recorded is not None and _pending is None:
        _pending = recorded
    return True


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Inside, SIGINT and SIGTERM are recorded for `check` instead of raised (a SIGINT the process ignores, as a
    shell's background job does, stays ignored). Leaving it normally with a signal recorded raises it."""
    global _pending, _active
    if threading.current_thread() is not threading.main_thread() or _active:
        yield  # only the main thread can set handlers; nested: the outer one handles the signals
        return
    previous = {s: signal.getsignal(s) for s in _HANDLED}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, _record)
    _pending, _active = None, True
    try:
        yield
        check()
    finally:
        _active = _patient = False
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(s, handler)
        _pending = None


class StopAtBoundary(TrainerCallback):
    """Checks for a recorded signal before the first step and before each step: after the previous step's
    metrics were logged (the trainer logs after on_step_end), so the run keeps them."""

    def on_train_begin(self, args, state, control, **kwargs):
        check()

    def on_step_begin(self, args, state, control, **kwargs):
        check()
