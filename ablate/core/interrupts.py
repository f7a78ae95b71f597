"""Process-wide stop signals: how ``ablate train`` and the study runner turn SIGTERM (``kill``, ``timeout``, a
scheduler) and Ctrl-C into a clean stop, and the flag a loop checks when an interrupt was swallowed."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STOP_REQUESTED = threading.Event()  # set by a stop signal: seen even where its KeyboardInterrupt was swallowed


@contextmanager
def handling(signals: tuple[signal.Signals, ...], handler: Any) -> Iterator[None]:
    """Inside, ``signals`` go to ``handler``; the previous handlers come back after. Main thread only; elsewhere
    (where Python cannot handle signals) a no-op."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def sigterm_as_interrupt(sigint: bool = False) -> Iterator[None]:
    """Inside, SIGTERM (``kill``, ``timeout``, a scheduler), and SIGINT too with ``sigint``, raises KeyboardInterrupt,
    so the trainer's cleanup runs and the MLflow run ends KILLED instead of staying RUNNING forever. The signal also
    sets ``STOP_REQUESTED``: an interrupt raised inside a ``__del__`` or a weakref callback (SQLAlchemy's registry,
    during garbage collection) is swallowed by Python, and a loop that checks the flag stops anyway. Such a
    swallowed stop is not printed as "Exception ignored": the flag carries it."""

    def interrupt(signum: int, frame: Any) -> None:
        STOP_REQUESTED.set()
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def unraisable(hook: Any) -> None:
        if not (isinstance(hook.exc_value, KeyboardInterrupt) and STOP_REQUESTED.is_set()):
            previous(hook)

    previous, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        with handling((signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,), interrupt):
            yield
    finally:
        sys.unraisablehook = previous


@contextmanager
def deferred() -> Iterator[None]:
    """Inside, a stop signal (SIGTERM, SIGINT) only sets ``STOP_REQUESTED``; it is raised as KeyboardInterrupt when the
    block ends. For a step that must not be cut in two: a run created on a tracking server whose id the caller has
    not yet received would be created again by the clean-up. Main thread only; elsewhere a no-op."""
    caught: list[int] = []

    def later(signum: int, frame: Any) -> None:
        STOP_REQUESTED.set()
        caught.append(signum)

    with handling((signal.SIGTERM, signal.SIGINT), later):
        yield
    if caught:
        raise KeyboardInterrupt(f"signal {signal.Signals(caught[0]).name}")
