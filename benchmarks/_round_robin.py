"""A baseline to compare parallel_map with: the synchronous round-robin design.

Written here from a description of the design of the closed upstream RFC, for
benchmarks only: items run in batches of ``max_workers`` threads; the calling
thread visits the batch's workers in strict order and, at each, waits for the
worker's next collective, runs it to completion itself (synchronously), hands
back the result and moves to the next worker; a batch ends when all its items
have. Items issuing different numbers of collectives are handled by letting a
finished worker drop out of the rotation.

It uses the same per-thread hook as parallel_map (``_collective_hook``), so the
two differ only in the schedule and in who waits for a collective to finish.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

from torch.distributed.distributed_c10d import _collective_hook

__all__ = ["round_robin_map"]

_END = object()


class _Slot:
    def __init__(self, fn: Callable[[Any], Any], item: Any) -> None:
        self.events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, args=(fn, item), daemon=True)

    def _main(self, fn: Callable[[Any], Any], item: Any) -> None:
        _collective_hook.fn = self._hand_over
        try:
            self.result = fn(item)
        except BaseException as error:
            self.error = error
        finally:
            _collective_hook.fn = None
            self.events.put(_END)

    def _hand_over(self, call: Callable[..., Any], /, **kwargs: Any) -> Any:
        self.events.put((call, kwargs))
        value, error = self.replies.get()
        if error is not None:
            raise error
        return value


def round_robin_map(fn: Callable[[Any], Any], items: Iterable[Any], max_workers: int) -> list[Any]:
    """``[fn(x) for x in items]`` with collectives issued round-robin, synchronously."""
    results: list[Any] = []
    pending = list(items)
    for start in range(0, len(pending), max_workers):
        slots = [_Slot(fn, item) for item in pending[start:start + max_workers]]
        for slot in slots:
            slot.thread.start()
        active = list(slots)
        while active:
            for slot in list(active):
                event = slot.events.get()
                if event is _END:
                    active.remove(slot)
                    continue
                call, kwargs = event
                try:
                    slot.replies.put((call(**kwargs), None))  # to completion, here
                except Exception as error:
                    slot.replies.put((None, error))
        for slot in slots:
            slot.thread.join()
            if slot.error is not None:
                raise slot.error
            results.append(slot.result)
    return results
