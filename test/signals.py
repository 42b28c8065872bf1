"""Ctrl-C in tests, whatever SIGINT disposition the test process inherited.

A shell without job control starts its background jobs with SIGINT ignored, and
a Python started that way keeps it ignored: a test that sends SIGINT to its main
thread then sees nothing happen. The Ctrl-C tests install Python's own handler
for as long as they need it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from fake_collectives import fake_collective


@contextlib.contextmanager
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread inside this block."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        # None: the handler was installed from C, which Python cannot put back.
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def interrupting_items(log: Any, cancelled: list[str]) -> Callable[[int], int]:
    """Items for three workers: item 0 sends Ctrl-C to the main thread while
    items 1 and 2 wait for their turn behind it (recording the error they get)."""
    main = threading.main_thread().ident
    assert main is not None

    def item(i: int) -> int:
        if i == 0:
            time.sleep(0.2)  # keep the coordinator waiting on slot 0
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.2)
            return i
        try:
            fake_collective(log, i)  # waits for slot 0's turn, which never comes
        except RuntimeError as error:
            cancelled.append(type(error).__name__)
            raise
        return i

    return item
