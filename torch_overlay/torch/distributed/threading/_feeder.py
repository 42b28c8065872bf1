"""Hands out the items, in index order, to the schedule and to the workers.

Only the coordinating thread advances the iterable (:meth:`Feeder.pull`), as
a loop on that thread would: under the caller's modes and context, in order,
at points of the schedule that do not depend on timing, so that a
collective the iterable itself calls is issued at the same point on every
rank. Each pull is a window of the bypass detector, as an issue is, and what
the iterable builds with autograd is numbered just before the item it
yields (see ``_thread_state.Numbering``). Workers take pulled items
(:meth:`Feeder.take`) in index order and wait while there is none.

Workers wait on a ``queue.SimpleQueue`` of wake-up tokens, one put after
each change that may let a worker go on, not on a ``threading.Condition``,
whose Python-level ``with`` a Ctrl-C on the coordinating thread could leave
held; the coordinator's sections under the lock are shielded (see
``_interrupts``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, TYPE_CHECKING

from ._interrupts import lock_for_this_thread
from ._mailbox import Mailbox


if TYPE_CHECKING:
    from collections.abc import Iterator

    from ._bypass import BypassDetector
    from ._thread_state import Numbering


__all__: list[str] = []


class Feeder:
    """See the module doc."""

    def __init__(
        self,
        items: Iterator[Any],
        detector: BypassDetector | None,
        numbering: Numbering,
        workers: int,
    ) -> None:
        self._items = items
        self._detector = detector
        self._numbering = numbering
        self._workers = workers
        self._lock = threading.Lock()
        # created by the coordinator
        self._coordinators_lock = lock_for_this_thread(self._lock)
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._boxes: list[Mailbox] = []
        self._next_for_worker = 0
        self._exhausted = False
        self._limit: int | None = None  # workers take no item from this index on
        self.error: tuple[int, Exception] | None = None  # the iterable raised

    @property
    def pulled(self) -> int:
        return len(self._boxes)

    def pull(self) -> Mailbox | None:
        """Advance the iterable by one item; None at its end (or after it raised).

        On the coordinating thread, holding nothing: the iterable may block,
        or call back into torch.distributed. An ``Exception`` it raises is
        kept in ``error``, to be reported like an item's failure at that
        index; any other ``BaseException`` (``KeyboardInterrupt``,
        ``SystemExit``) propagates, as from a loop.
        """
        if self._exhausted:
            return None
        if self._detector is not None:
            self._detector.before_iterable()
        pulled = False
        try:
            self._numbering.before_pull()
            item = next(self._items)
            pulled = True
        except StopIteration:
            self._end()
            return None
        except Exception as error:
            self.error = (len(self._boxes), error)
            self._end()
            return None
        finally:
            numbers = self._numbering.after_pull(pulled)
            if self._detector is not None:
                self._detector.after_iterable()
        if numbers is None:
            raise AssertionError("parallel_map: an item without sequence numbers")
        box = Mailbox(len(self._boxes), item, numbers)
        self._boxes.append(box)  # atomic: workers read it under the lock
        self._tokens.put(None)
        return box

    def box_for_slot(self, index: int) -> Mailbox | None:
        """The ``index``-th item's mailbox; None when there are not that many items."""
        while len(self._boxes) <= index:
            if self.pull() is None:
                return None
        return self._boxes[index]

    def take(self) -> Mailbox | None:
        """For a worker: the first item no worker has taken, waiting until one
        is pulled; None when there will be none (or the call is closed)."""
        while True:
            with self._lock:
                limit = self._limit
                if limit is not None and self._next_for_worker >= limit:
                    return None
                if self._next_for_worker < len(self._boxes):
                    box = self._boxes[self._next_for_worker]
                    self._next_for_worker += 1
                    return box
                if self._exhausted:
                    return None
            self._tokens.get()

    def stop_at(self, count: int) -> None:
        """Let workers take only the first ``count`` items (those with a slot)."""
        with self._coordinators_lock:
            self._limit = count if self._limit is None else min(count, self._limit)
        self._wake_all()

    def close(self) -> list[Mailbox]:
        """Start no more items; returns those taken by workers so far."""
        self.stop_at(0)
        with self._coordinators_lock:
            return self._boxes[: self._next_for_worker]

    def _end(self) -> None:
        with self._coordinators_lock:
            self._exhausted = True
        self._wake_all()

    def _wake_all(self) -> None:
        # Enough for every waiting worker; a spare token costs one more check.
        for _ in range(self._workers):
            self._tokens.put(None)
