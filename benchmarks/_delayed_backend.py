"""A process-group backend whose collectives take a set round trip, for benchmarks.

The backend ``"delayed"`` is a Python ``ProcessGroup`` registered through torch's
extension point (``dist.Backend.register_backend``, extended API). It has world
size 1, so each collective's result is its input (written when it is issued);
what it imitates is latency. A collective returns at once a ``Work`` made from a
``torch.futures.Future``; the group's one timer thread keeps a heap of deadlines,
sleeps on a condition until the earliest and completes every future that is due.
A round trip in flight therefore uses no core, and any number can be in flight at
once, as on a network. The round trip is set per group: ``pg_options=
DelayedOptions(round_trip_s=...)`` at ``init_process_group`` or ``new_group``,
else :data:`default_round_trip_s` as it is when the group is created. A round
trip lasts at least that long: the operating system wakes the timer thread late
(on Linux its timer slack is cut to 1 ns to shorten that) and the waiting thread
after it.

``shutdown`` (which ``destroy_process_group`` calls) completes what is pending at
once (the results are in place already; a ``Work`` made from a future would not
raise a future's error from ``wait`` anyway) and joins the timer thread, so
nothing outlives the group and nothing waits on it. The group has no collective
counter (``_get_sequence_number_for_group`` raises) and no per-device backends,
so parallel_map's bypass detector skips it.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import (
    _create_work_from_future,
    _DistributedBackendOptions,
    AllgatherOptions,
    AllreduceCoalescedOptions,
    AllreduceOptions,
    BarrierOptions,
    BroadcastOptions,
    Work,
)
from torch.futures import Future

__all__ = ["BACKEND", "TIMER_THREAD_NAME", "DelayedOptions", "DelayedProcessGroup",
           "default_round_trip_s"]

BACKEND = "delayed"
TIMER_THREAD_NAME = "delayed-pg-timer"

default_round_trip_s: float = 200e-6
"""The round trip of groups created without :class:`DelayedOptions`."""

_Pending = tuple[float, int, Future[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class DelayedOptions:
    """Options of a delayed group, passed as ``pg_options``.

    Attributes:
        round_trip_s: Seconds from a collective's issue to its completion.
    """

    round_trip_s: float


def _tighten_timer_slack() -> None:
    """Ask Linux to wake this thread's timed waits at most 1 ns late; best effort."""
    if sys.platform != "linux":
        return
    pr_set_timerslack = 29
    try:
        ctypes.CDLL(None).prctl(pr_set_timerslack, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class _Timer:
    """Completes futures at their deadlines, on one thread that sleeps in between."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[_Pending] = []
        self._order = itertools.count()  # ties: first issued, first completed
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=TIMER_THREAD_NAME, daemon=True)
        self._thread.start()

    def complete_at(self, deadline: float, value: list[torch.Tensor]) -> Future[list[torch.Tensor]]:
        """A future that gets ``value`` at ``deadline`` (``time.monotonic``).

        Raises:
            RuntimeError: The timer was stopped (the group was shut down).
        """
        future: Future[list[torch.Tensor]] = Future()
        with self._condition:
            if self._stopped:
                raise RuntimeError(f"{BACKEND} process group: used after shutdown")
            entry = (deadline, next(self._order), future, value)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # a new earliest deadline: wake the timer
                self._condition.notify()
        return future

    def stop(self) -> None:
        """Complete the pending futures now and join the thread; idempotent."""
        with self._condition:
            self._stopped = True
            self._condition.notify()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        _tighten_timer_slack()
        while True:
            with self._condition:
                while not self._stopped:
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    self._condition.wait(self._heap[0][0] - now if self._heap else None)
                stopped = self._stopped
                if stopped:
                    pending, self._heap = self._heap, []
                else:
                    pending = []
                    while self._heap and self._heap[0][0] <= now:
                        pending.append(heapq.heappop(self._heap))
            # Outside the lock: a future's callbacks may issue the next collective.
            for _, _, future, value in pending:
                future.set_result(value)
            if stopped:
                return


class DelayedProcessGroup(dist.ProcessGroup):
    """World size 1; every collective completes ``round_trip_s`` after its issue.

    Args:
        round_trip_s: Seconds from a collective's issue to its completion.
    """

    def __init__(self, round_trip_s: float) -> None:
        if round_trip_s < 0:
            raise ValueError(f"round_trip_s must not be negative, got {round_trip_s}")
        super().__init__(0, 1)
        self.round_trip_s = round_trip_s
        self._timer = _Timer()

    def _delayed(self, value: list[torch.Tensor]) -> Work:
        future = self._timer.complete_at(time.monotonic() + self.round_trip_s, value)
        return _create_work_from_future(future)

    def allreduce(self, tensors: list[torch.Tensor], opts: AllreduceOptions) -> Work:
        """Each tensor is its own sum over one rank."""
        return self._delayed(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor],
                            opts: AllreduceCoalescedOptions) -> Work:
        """As :meth:`allreduce`, one round trip for all."""
        return self._delayed(tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: BroadcastOptions) -> Work:
        """The one rank is the root: tensors stay as they are."""
        return self._delayed(tensors)

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: AllgatherOptions) -> Work:
        """Each output list has one tensor: a copy of its input."""
        for outputs, tensor in zip(output_tensors, input_tensors, strict=True):
            outputs[0].copy_(tensor)
        return self._delayed([out for outputs in output_tensors for out in outputs])

    def barrier(self, opts: BarrierOptions) -> Work:
        """One round trip, nothing exchanged."""
        return self._delayed([])

    def shutdown(self) -> None:
        """Complete what is pending now and stop the timer thread."""
        self._timer.stop()

    def getBackendName(self) -> str:
        """The name the group was registered under."""
        return BACKEND


def _create(common: _DistributedBackendOptions, options: object) -> DelayedProcessGroup:
    """The creator ``register_backend`` calls: ``options`` is ``pg_options``."""
    if options is not None and not isinstance(options, DelayedOptions):
        raise TypeError(f"pg_options of a {BACKEND} group: expected DelayedOptions, "
                        f"got {type(options).__name__}")
    if common.group_size != 1:
        raise ValueError(f"{BACKEND} process groups have world size 1, "
                         f"not {common.group_size}")
    round_trip_s = default_round_trip_s if options is None else options.round_trip_s
    return DelayedProcessGroup(round_trip_s)


dist.Backend.register_backend(BACKEND, _create, extended_api=True, devices=["cpu"])
