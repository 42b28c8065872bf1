"""Ctrl-C in tests, whatever SIGINT disposition the test process inherited.

A shell without job control starts its background jobs with SIGINT ignored, and
a Python started that way keeps it ignored: a test that sends SIGINT to its main
thread then sees nothing happen. The Ctrl-C tests install Python's own handler
for as long as they need it.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


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
