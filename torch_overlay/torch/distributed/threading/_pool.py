"""Worker threads, kept for a moment between ``parallel_map`` calls.

A new thread costs more than its creation: PyTorch sets up per-thread state
(intra-op pool, CUDA handles and workspaces) on its first operations. Calls
made back to back, one per training step say, reuse the threads of the
previous call instead. A thread idle for ``IDLE_TIMEOUT_S`` exits; idle
threads hold no item, no collective hook and no reference to user objects.

The pool closes at interpreter exit (``atexit``): idle threads end then, and
threads of a later call end when it does. Left to run into finalization, a
daemon thread that wakes there is ended by CPython before 3.14 with
``pthread_exit``, which aborts the process if a C++ frame on the thread's
stack then releases a Python object (a tensor's). Threads stay daemon
threads all the same, so that a call still running at exit, in a daemon
thread of the user's, cannot keep the process alive; its threads are left
to the interpreter.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

from ._interrupts import shielded


if TYPE_CHECKING:
    from collections.abc import Callable


__all__: list[str] = []

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 1.0


class PooledThread:
    """A daemon thread that runs jobs handed to it, one at a time."""

    def __init__(self, pool: WorkerPool, number: int) -> None:
        self._pool = pool
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[None] = queue.SimpleQueue()
        # Started by the pool once the caller holds it, so that none is lost.
        self.thread = threading.Thread(
            target=self._main, name=f"parallel_map-worker-{number}", daemon=True
        )

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def wait(self) -> None:
        """Block until the job submitted last has returned."""
        self._done.get()

    def retire(self) -> None:
        """Exit once idle; ``join`` waits for it."""
        self._jobs.put(None)

    def join(self) -> None:
        if self.thread.ident is not None:  # started
            self.thread.join()

    def _main(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=IDLE_TIMEOUT_S)
            except queue.Empty:
                if self._pool.expire(self):
                    return
                continue  # taken from the pool just now: a job is on its way
            if job is None:
                return
            try:
                job()
            # a bug of ours, not an item's error: those the job reports
            except BaseException:
                # Even a BaseException: a dead thread back in the pool would hang a later call.
                logger.exception("parallel_map worker failed")
            finally:
                del job  # drop the call's objects before idling
                self._done.put(None)


class WorkerPool:
    """The idle threads; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[PooledThread] = []
        self._closed = False
        self._numbers = itertools.count()
        if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
            os.register_at_fork(after_in_child=self._forget)

    def acquire(self, count: int, into: list[PooledThread]) -> None:
        """Append ``count`` threads to ``into``, idle ones first.

        Each thread is in ``into`` before it runs, so that a caller
        interrupted here (Ctrl-C) still finds, and retires, every thread.
        """
        with shielded, self._lock:
            self._idle = [t for t in self._idle if t.thread.is_alive()]
            reused = self._idle[len(self._idle) - min(count, len(self._idle)) :]
            into.extend(reused)
            del self._idle[len(self._idle) - len(reused) :]
        while len(into) < count:
            thread = PooledThread(self, next(self._numbers))
            with shielded:  # a Ctrl-C in start() would leave a thread no one can join
                into.append(thread)
                thread.thread.start()

    def release(self, threads: list[PooledThread]) -> None:
        with shielded, self._lock:
            if not self._closed:
                self._idle.extend(threads)
                return
        _end(threads)

    def close(self) -> None:
        """End the idle threads; threads released from now on end too."""
        with shielded, self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        _end(idle)

    def expire(self, thread: PooledThread) -> bool:
        """Take ``thread`` out if it is idle; False if a caller just took it."""
        with self._lock:
            if thread in self._idle:
                self._idle.remove(thread)
                return True
            return False

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)

    def _forget(self) -> None:
        # A forked child has none of the parent's threads.
        self._lock = threading.Lock()
        self._idle = []


def _end(threads: list[PooledThread]) -> None:
    for thread in threads:
        thread.retire()
    for thread in threads:
        thread.join()


pool = WorkerPool()
atexit.register(pool.close)
