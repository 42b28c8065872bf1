"""The coordinating thread's schedule and the worker threads it serves.

The schedule decides the order in which collectives are issued. It has ``W``
slots; slot ``s`` starts with item ``s``. The coordinator visits the slots
that still hold an item in a fixed cyclic order and, at each visit, waits for
the next event of that slot's item:

* a collective: issue it (see ``_calls``), move to the next slot;
* the item's end: record its outcome, put the next item not yet in a slot
  into this slot (unless an item has failed), move to the next slot.

Each decision depends only on each item's own sequence of collectives and on
``W``, never on timing, so every rank issues the same collectives in the same
order. Because the coordinator only issues, a worker blocked on its collective
never keeps the coordinator from issuing what other ranks need first.

Who runs the issue does not matter to the order, only that one thread at a
time does, at the schedule's turn. So when the coordinator is already waiting
for the event of the slot whose worker now calls a collective that only
enqueues work (see ``_calls``), the coordinator passes the turn and the
worker issues the call itself, then tells the coordinator, which only then
moves on. That saves the worker two thread switches, most of a handover's
cost. A call that arrives before its turn is handed over as usual.

With coalescing (see ``_coalescing``), the coordinator holds back the small
synchronous all_reduces it meets and issues them together just before it
issues anything else, and before it waits on a slot whose call it holds:
at the latest when its visit comes back round. It passes no turn while it
holds calls, as those must go first, and a worker never takes the turn for
a call the coordinator would hold.

Items, waits for a turn and issues are spans in a ``torch.profiler`` trace
(see ``_profiling``).

Whoever issues (the coordinator, or a worker at its turn) does so inside the
bypass detector's window (see ``_bypass``): it checks right before issuing
that no process group counted a collective since the last issue, and reads
the counters again right after, before the worker runs on. A worker that
sees a change hands its call to the coordinator instead, which raises.
Every worker has the same hook, :func:`_worker_hook`; calls made while an op
is being traced rather than run pass through it into the graph.

The threads do not wait for the schedule to hand them work: the ``W`` workers
take items in index order as soon as they are free, so no thread idles while
the coordinator waits on a slot. An item that runs ahead of the schedule
simply waits at its first collective until its slot's turn. Items enter slots
in index order too, so every item that has a slot has been taken by a thread
before any item that has none: waiting on a slot never waits on a free thread.
"""

from __future__ import annotations

import copy
import logging
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.distributed_c10d import _collective_hook

from ._bypass import coalescing_manager_error, CollectiveBypassError
from ._calls import Call, cuda_is_initialized, plan_for
from ._coalescing import coalescing_key, issue_coalesced
from ._pool import pool
from ._profiling import span


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._bypass import BypassDetector
    from ._caller_state import CallerState
    from ._schedule_check import ScheduleCheck


__all__: list[str] = []

logger = logging.getLogger(__name__)


def _copy_of(error: Exception) -> Exception:
    """A copy of ``error`` for another thread to raise (each raise adds to its traceback)."""
    try:
        return copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return error


class CancelledError(RuntimeError):
    """Raised in a worker whose collective was not issued because the call stopped."""


@dataclass
class _Reply:
    """Coordinator to worker: the outcome of issuing its call."""

    value: Any = None
    error: BaseException | None = None


@dataclass
class _IssuedByWorker:
    """Worker to coordinator: the worker has issued this call, at its turn."""

    call: Call


@dataclass
class _Finished:
    """Worker to coordinator: the item ran to its end."""

    result: Any = None
    error: BaseException | None = None


_STOP = object()  # coordinator to worker, instead of a reply: the call is stopping


class _ItemRun:
    """The two channels between one item's worker and the coordinator.

    ``events`` carries the item's calls and then its end to the coordinator,
    ``replies`` carries the outcome of each call back, or ``_STOP``. The item
    has at most one message in flight each way, so ``_STOP`` never overtakes
    a reply the worker waits for.

    ``worker_may_issue`` is the turn the coordinator passes while it waits for
    this item's next event; the worker takes it (clears it, under
    ``turn_lock``) to issue its call itself.
    """

    def __init__(self, index: int, item: Any) -> None:
        self.index = index
        self.item = item
        self.events: queue.SimpleQueue[Call | _IssuedByWorker | _Finished] = queue.SimpleQueue()
        self.replies: queue.SimpleQueue[_Reply | object] = queue.SimpleQueue()
        self.turn_lock = threading.Lock()
        self.worker_may_issue = False
        self.finished = False  # seen to end by the coordinator
        self.calls = 0  # worker side: calls handed over so far
        self.stopping = False  # worker side: _STOP received


class _Feeder:
    """Hands out the items, in index order, to workers and to the schedule.

    The iterable is consumed lazily and once, under a lock, by whichever side
    needs the next item first.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        self._items = items
        self._lock = threading.Lock()
        self._runs: list[_ItemRun] = []
        self._next_for_worker = 0
        self._exhausted = False
        self._closed = False
        self.error: tuple[int, Exception] | None = None  # the iterable raised

    def _pull(self) -> bool:
        if self._exhausted:
            return False
        try:
            item = next(self._items)
        except StopIteration:
            self._exhausted = True
            return False
        except Exception as error:  # reported like an item's failure, in order
            self._exhausted = True
            self.error = (len(self._runs), error)
            return False
        self._runs.append(_ItemRun(len(self._runs), item))
        return True

    def run_for_slot(self, index: int) -> _ItemRun | None:
        """The ``index``-th item's run; None when there are not that many items."""
        with self._lock:
            while len(self._runs) <= index:
                if not self._pull():
                    return None
            return self._runs[index]

    def run_for_worker(self) -> _ItemRun | None:
        """The first item no worker has taken; None when there is none (or closed)."""
        with self._lock:
            if self._closed:
                return None
            if self._next_for_worker == len(self._runs) and not self._pull():
                return None
            run = self._runs[self._next_for_worker]
            self._next_for_worker += 1
            return run

    def close(self) -> list[_ItemRun]:
        """Start no more items; returns those taken by workers so far."""
        with self._lock:
            self._closed = True
            return self._runs[: self._next_for_worker]


class _ThisWorker(threading.local):
    worker: _Worker | None = None


_this_worker = _ThisWorker()

# Dispatch modes under which an op is traced (by Dynamo, AOTAutograd, make_fx)
# rather than run.
_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)


def _tracing() -> bool:
    get_mode = torch._C._get_dispatch_mode
    return any(get_mode(key) is not None for key in _TRACING_MODES)


def _worker_hook(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """The collective hook of every worker thread.

    A call made while tracing (a DTensor redistribution that AOTAutograd
    traces, say) is recorded in the graph, not handed over: the graph's
    functional collective op is handed over when the graph runs (see
    ``_op_hook``). Dynamo itself never calls the hook.
    """
    worker = _this_worker.worker
    assert worker is not None
    if fn is c10d._coalescing_manager:
        raise coalescing_manager_error("cannot be used on a worker thread")
    if _tracing():
        _collective_hook.fn = None
        try:
            return fn(**kwargs)
        finally:
            _collective_hook.fn = _worker_hook
    return worker._hand_over(fn, **kwargs)


class _Worker:
    """One worker of a call: runs items from the feeder on a pooled thread,
    handing their collectives over."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        state: CallerState,
        feeder: _Feeder,
        coalesce: bool,
        detector: BypassDetector | None,
    ) -> None:
        self._fn = fn
        self._state = state
        self._feeder = feeder
        self._coalesce = coalesce
        self._detector = detector
        self._run: _ItemRun | None = None
        self.thread: threading.Thread | None = None
        # For hang reports: the call this worker waits on, and whether it is
        # still waiting for the coordinator to issue it (else for its result).
        self.waiting_on: Call | None = None
        self.waiting_for_issue = False

    def main(self) -> None:
        """The job, on a pooled thread: run items until there are none."""
        self.thread = threading.current_thread()
        own_stream = self._state.enter_worker_thread()
        _this_worker.worker = self
        _collective_hook.fn = _worker_hook
        try:
            while (run := self._feeder.run_for_worker()) is not None:
                self._run = run
                try:
                    with span("item", run.index):
                        result = self._state.run(self._fn, run.item, own_stream)
                except BaseException as error:  # the coordinator owns every error
                    run.events.put(_Finished(error=error))
                else:
                    run.events.put(_Finished(result))
                self._run = None
        finally:
            _collective_hook.fn = None
            _this_worker.worker = None
            self._state.leave_worker_thread()

    def _hand_over(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        """The collective hook: hand the call to the coordinator and wait for it."""
        run = self._run
        assert run is not None
        if run.stopping:
            raise CancelledError("parallel_map is stopping; this collective was not issued")
        plan = plan_for(fn, kwargs)
        stream = torch.cuda.current_stream() if cuda_is_initialized() else None
        call = Call(fn, kwargs, plan, run.index, run.calls, stream)
        if (
            plan.worker_may_issue
            # A call the coordinator would hold back must reach it.
            and not (self._coalesce and coalescing_key(call) is not None)
            and self._take_turn(run)
            # Else the coordinator gets the call, and raises what the detector saw.
            and (self._detector is None or self._detector.clear_to_issue())
        ):
            return self._issue_here(run, call)
        self.waiting_on, self.waiting_for_issue = call, True
        run.events.put(call)
        run.calls += 1
        with span("wait", call.name):
            reply = run.replies.get()
        self.waiting_for_issue = False
        try:
            if reply is _STOP:
                run.stopping = True
                raise CancelledError("parallel_map is stopping; this collective was not issued")
            assert isinstance(reply, _Reply)
            if reply.error is not None:
                raise reply.error
            return plan.finish(reply.value, kwargs)
        finally:
            self.waiting_on = None

    @staticmethod
    def _take_turn(run: _ItemRun) -> bool:
        with run.turn_lock:
            mine = run.worker_may_issue
            run.worker_may_issue = False
        return mine

    def _issue_here(self, run: _ItemRun, call: Call) -> Any:
        """Issue ``call`` on this thread at its turn, which the coordinator passed."""
        run.calls += 1
        self.waiting_on = call
        try:
            # The coordinator waits for the event below before it issues
            # anything else, so this issue is alone and in the schedule's order.
            _collective_hook.fn = None  # issue for real, do not hand over again
            try:
                with span("issue", call):
                    issued = call.plan.issue(call.fn, call.kwargs)
            finally:
                if self._detector is not None:
                    self._detector.after_issue(call)
                _collective_hook.fn = _worker_hook
                run.events.put(_IssuedByWorker(call))
            return call.plan.finish(issued, call.kwargs)
        finally:
            self.waiting_on = None

    def describe(self) -> str:
        """One line for a hang report; read racily from the coordinator."""
        run, call, for_issue = self._run, self.waiting_on, self.waiting_for_issue
        if run is None:
            return "idle"
        if call is None:
            return f"item {run.index}: running fn"
        what = str(call)
        if for_issue:
            return f"item {run.index}: waiting for the coordinator to issue {what}"
        return f"item {run.index}: waiting for {what} to complete"


class Schedule:
    """Runs ``fn`` over ``items`` on ``max_workers`` threads; see the module doc."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Iterator[Any],
        max_workers: int,
        state: CallerState,
        *,
        report_hang_after: float | None = None,
        check: ScheduleCheck | None = None,
        detector: BypassDetector | None = None,
        coalesce: bool = False,
    ) -> None:
        self._feeder = _Feeder(items)
        self._report_hang_after = report_hang_after
        self._check = check
        self._detector = detector
        self._coalesce = coalesce
        # All-reduces held back to be coalesced: their runs, calls, and key.
        self._held: list[tuple[_ItemRun, Call]] = []
        self._held_key: tuple[Any, ...] | None = None
        # A nested schedule issues through the outer one, from this thread;
        # the schedule check exchanges with the other ranks before each issue,
        # from this thread too.
        self._pass_turns = check is None and _collective_hook.fn is None
        self._workers = [
            _Worker(fn, state, self._feeder, coalesce, detector) for _ in range(max_workers)
        ]
        self._results: dict[int, Any] = {}
        self._errors: dict[int, BaseException] = {}
        self._issued = 0

    def run(self) -> list[Any]:
        threads = pool.acquire(len(self._workers))
        for thread, worker in zip(threads, self._workers, strict=True):
            thread.submit(worker.main)
        clean = False
        try:
            in_slots = self._loop()
            if self._check is not None:
                self._check.at_end(self._issued)
            clean = not self._errors
        except CollectiveBypassError as error:
            self._add_item_errors(error)
            raise
        finally:
            # Normally every item taken by a worker has had a slot and ended.
            # After a failure, or if the coordinator itself failed (Ctrl-C),
            # items that ran ahead of the schedule, or were cut short, get
            # _STOP: their next collective raises CancelledError instead of
            # being issued.
            for run in self._feeder.close():
                with run.turn_lock:  # if Ctrl-C came while the turn was passed
                    run.worker_may_issue = False
                if not run.finished:
                    run.replies.put(_STOP)
            for thread in threads:
                thread.wait()
            # Threads go back to the pool only after a clean call: after a
            # failure none outlives the call.
            if clean:
                pool.release(threads)
            else:
                for thread in threads:
                    thread.retire()
                for thread in threads:
                    thread.thread.join()
        if self._detector is not None:
            try:
                self._detector.at_end()
            except CollectiveBypassError as error:  # likely the cause of any item's failure
                self._add_item_errors(error)
                raise
        if self._errors:
            raise self._first_error()
        return [self._results[i] for i in range(in_slots)]

    def _loop(self) -> int:
        """Run the schedule; returns how many items had a slot."""
        slots: list[_ItemRun] = []
        while len(slots) < len(self._workers):
            run = self._run_for_slot(len(slots))
            if run is None:
                break
            slots.append(run)
        in_slots = len(slots)
        position = 0
        while slots:
            run = slots[position]
            if self._held and any(held is run for held, _ in self._held):
                self._issue_held()
            event = self._next_event(run)
            if isinstance(event, Call):
                self._schedule(run, event)
            elif isinstance(event, _IssuedByWorker):
                self._count_issue(event.call)
            else:
                run.finished = True
                if event.error is None:
                    self._results[run.index] = event.result
                else:
                    self._errors[run.index] = event.error
                following = None if self._errors else self._run_for_slot(in_slots)
                if following is None:
                    del slots[position]
                    if slots:
                        position %= len(slots)
                    continue
                slots[position] = following
                in_slots += 1
            position = (position + 1) % len(slots)
        return in_slots

    def _next_event(self, run: _ItemRun) -> Call | _IssuedByWorker | _Finished:
        # Held calls go before anything else: no turn to pass while there are any.
        if not self._pass_turns or self._held:
            return self._wait_for_event(run)
        with run.turn_lock:
            run.worker_may_issue = True
        try:
            return self._wait_for_event(run)
        finally:
            with run.turn_lock:
                run.worker_may_issue = False

    def _wait_for_event(self, run: _ItemRun) -> Call | _IssuedByWorker | _Finished:
        if self._report_hang_after is None:
            return run.events.get()
        started = time.monotonic()
        while True:
            try:
                return run.events.get(timeout=self._report_hang_after)
            except queue.Empty:
                self._report_hang(run, time.monotonic() - started)

    def _report_hang(self, run: _ItemRun, waited: float) -> None:
        frames = sys._current_frames()
        lines = [
            f"parallel_map has waited {waited:.0f} s for the next event of item {run.index} "
            f"({self._issued} collectives issued so far). Workers:"
        ]
        for worker in self._workers:
            state = worker.describe()
            thread = worker.thread
            lines.append(f"  {thread.name if thread else 'worker'}: {state}")
            frame = frames.get(thread.ident or -1) if thread else None
            if frame is not None and state != "idle":
                lines.extend("    " + line.rstrip() for line in traceback.format_stack(frame))
        logger.warning("\n".join(lines))

    def _run_for_slot(self, index: int) -> _ItemRun | None:
        run = self._feeder.run_for_slot(index)
        if run is None and self._feeder.error is not None and self._feeder.error[0] == index:
            # The iterable raised where this item would be: a failure at this index.
            self._errors[index] = self._feeder.error[1]
        return run

    def _count_issue(self, call: Call) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "issue #%d: item %d call %d %s", self._issued, call.item, call.seq, call.name
            )
        self._issued += 1

    def _schedule(self, run: _ItemRun, call: Call) -> None:
        """Issue ``call``, or hold it back to be coalesced."""
        key = coalescing_key(call) if self._coalesce else None
        if self._held and key != self._held_key:
            self._issue_held()
        if key is None:
            self._issue(run, call)
            return
        if self._check is not None:
            self._check.before_issue(self._issued, call)
        self._count_issue(call)
        self._held.append((run, call))
        self._held_key = key

    def _issue_held(self) -> None:
        held, self._held, self._held_key = self._held, [], None
        if len(held) == 1:
            self._reply_to_issue(*held[0])
            return
        logger.debug("issue: %d all_reduces coalesced into one", len(held))
        detector = self._detector
        if detector is not None:
            detector.before_issue(held[0][1])
        try:
            with span("issue", f"{len(held)} all_reduces coalesced"):
                parts = issue_coalesced([call for _, call in held])
            replies = [_Reply(part) for part in parts]
        except Exception as error:  # raised in each worker, as serial code would
            replies = [_Reply(error=error if n == 0 else _copy_of(error)) for n in range(len(held))]
        finally:
            if detector is not None:  # before any worker runs on
                detector.after_issue(held[0][1])
        for (run, _), reply in zip(held, replies, strict=True):
            run.replies.put(reply)

    def _issue(self, run: _ItemRun, call: Call) -> None:
        if self._check is not None:
            self._check.before_issue(self._issued, call)
        self._count_issue(call)
        self._reply_to_issue(run, call)

    def _reply_to_issue(self, run: _ItemRun, call: Call) -> None:
        detector = self._detector
        if detector is not None:
            detector.before_issue(call)
        try:
            with span("issue", call):
                reply = _Reply(call.issue())
        except Exception as error:  # raised where serial code would: in the worker
            reply = _Reply(error=error)
        finally:
            if detector is not None:  # before the worker runs on
                detector.after_issue(call)
        run.replies.put(reply)

    def _first_error(self) -> BaseException:
        first, *others = sorted(self._errors)
        error = self._errors[first]
        self._add_item_errors(error, others)
        return error

    def _add_item_errors(self, error: BaseException, indices: list[int] | None = None) -> None:
        for index in sorted(self._errors) if indices is None else indices:
            other = self._errors[index]
            error.add_note(
                f"parallel_map: item {index} also failed: {type(other).__name__}: {other}"
            )
