"""Ctrl-C that never leaves a lock held.

SIGINT raises ``KeyboardInterrupt`` in the main thread at the interpreter's
next check, and one of those checks comes right after a lock's ``acquire``
returns, before the ``with`` block protects the lock: an interrupt there
leaves the lock held for good, and the next thread that takes it (the
coordinator stopping the call, a worker, a later call) waits forever. So
while a ``parallel_map`` call runs on the main thread, its SIGINT handler
defers the interrupt over :data:`shielded` sections, each around one lock's
``with``, and raises it as the section ends, with the lock released. Only
the main thread gets signals, so only its sections count.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    _Handler = Callable[[int, FrameType | None], Any]


__all__: list[str] = []


class _Sections(threading.local):
    depth = 0
    # the handler to run at the end, and its signal
    deferred: tuple[_Handler, int] | None = None


_sections = _Sections()


class _Shielded:
    """``with shielded:``: a Ctrl-C in the section is raised as it ends."""

    __slots__ = ()

    def __enter__(self) -> None:
        _sections.depth += 1

    def __exit__(self, *exc: object) -> None:
        sections = _sections
        sections.depth -= 1
        if sections.deferred is not None and not sections.depth:
            _raise_deferred()


def _raise_deferred() -> None:
    if _sections.deferred is None:
        raise AssertionError("no deferred interrupt to raise")
    handler, signum = _sections.deferred
    _sections.deferred = None
    handler(signum, None)  # raises KeyboardInterrupt, with the default handler


shielded = _Shielded()


class ShieldedLock:
    """``lock``, taken in a shielded section: for the main thread's side of a lock."""

    __slots__ = ("_lock",)

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        _sections.depth += 1
        try:
            self._lock.acquire()
        # another signal's handler raised: the section never began
        except BaseException:
            _sections.depth -= 1
            raise

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        sections = _sections
        sections.depth -= 1
        if sections.deferred is not None and not sections.depth:
            _raise_deferred()


def lock_for_this_thread(lock: threading.Lock) -> ShieldedLock | threading.Lock:
    """``lock`` shielded on the main thread, the only one that gets Ctrl-C; else itself."""
    if threading.current_thread() is threading.main_thread():
        return ShieldedLock(lock)
    return lock


@contextlib.contextmanager
def deferring_interrupts() -> Iterator[None]:
    """Install the deferring SIGINT handler for the block, on the main thread,
    over a handler written in Python (the default raises KeyboardInterrupt)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(
        previous
    ):
        yield
        return

    def defer_in_sections(signum: int, frame: FrameType | None) -> Any:
        if _sections.depth:
            _sections.deferred = (previous, signum)
            return None
        return previous(signum, frame)

    signal.signal(signal.SIGINT, defer_in_sections)
    try:
        yield
    finally:
        # unless fn replaced it
        if signal.getsignal(signal.SIGINT) is defer_in_sections:
            signal.signal(signal.SIGINT, previous)
