"""Ctrl-C that stops a study in every phase, and named pause points that let a test reach a phase.

A study spends its time inside libraries (Ray, Tune, Train, MLflow, SQLAlchemy) that may catch a
``KeyboardInterrupt`` on the way or install SIGINT handlers of their own. ``catch_interrupts``
installs the study's handler in the main thread: it remembers the interrupt and raises
``KeyboardInterrupt``; ``check()`` raises it again at the next phase boundary (and inside
``search.run_interruptibly``'s wait), so an interrupt some library swallowed still stops the study
within moments.

``pause_point(name)`` marks a phase: with ``AMP_STUDY_PAUSE_AT=<name>`` and
``AMP_STUDY_PAUSE_FILE=<path>`` in the environment, the process that reaches it writes its pid to
the file and waits there until it is interrupted or killed (the fault tests reach each phase this
way, never by timing). Without them it does nothing. Ray workers see the variables too
(``search.connect`` passes them on).
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

PAUSE_AT, PAUSE_FILE = "AMP_STUDY_PAUSE_AT", "AMP_STUDY_PAUSE_FILE"

_interrupted = threading.Event()


def interrupted() -> bool:
    return _interrupted.is_set()


def check() -> None:
    """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed (even if a library swallowed it)."""
    if _interrupted.is_set():
        raise KeyboardInterrupt


def _handler(signum, frame) -> None:
    _interrupted.set()
    raise KeyboardInterrupt


def reinstall() -> None:
    """Put the study's handler back if a library replaced it (main thread only)."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not _handler:
        signal.signal(signal.SIGINT, _handler)


@contextlib.contextmanager
def catch_interrupts() -> Iterator[None]:
    previous = signal.getsignal(signal.SIGINT)
    _interrupted.clear()
    signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def pause_requested() -> bool:
    """Whether this process was asked to pause at some phase (the fault tests)."""
    return bool(os.environ.get(PAUSE_AT) and os.environ.get(PAUSE_FILE))


def pause_point(name: str) -> None:
    """Wait here (forever) when the environment asks this phase to pause; see the module docstring."""
    if os.environ.get(PAUSE_AT) != name or not os.environ.get(PAUSE_FILE):
        return
    try:
        with open(os.environ[PAUSE_FILE], "x") as f:  # only the first process to get here pauses
            f.write(f"{os.getpid()} {name}\n")
    except FileExistsError:
        return
    while True:
        check()
        time.sleep(0.1)
