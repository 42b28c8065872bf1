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

Only the coordinator advances the iterable, as the loop it replaces would:
on the calling thread, under its modes and context, in order. It pulls the
items for the first slots, then keeps ``W`` items pulled beyond those that
have had a slot, pulling one more each time an item enters a slot. Those are
points of the schedule, so a collective that the iterable itself calls goes
out at the same point on every rank; each pull is a window of the bypass
detector too. Workers take the pulled items in index order as soon as they
are free, so no thread idles while the coordinator waits on a slot. An item
that runs ahead of the schedule simply waits at its first collective until
its slot's turn. Items enter slots in index order too, so every item that has
a slot has been taken by a thread before any item that has none: waiting on
a slot never waits on a free thread. Once the coordinator has seen an item
fail, workers take no item beyond those with a slot.
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
from ._caller_state import ItemModes
from ._calls import Call, cuda_is_initialized, plan_for
from ._coalescing import coalescing_key, issue_coalesced
from ._pool import pool
from ._profiling import span


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._bypass import BypassDetector
    from ._caller_state import CallerState
    from ._pool import PooledThread
    from ._schedule_check import ScheduleCheck


__all__: list[str] = []

logger = logging.getLogger(__name__)


def _copy_of(error: Exception) -> Exception:
    """A copy of ``error`` for another thread to raise (each raise adds to its traceback)."""
    try:
        return copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return error


def _uninterruptible(step: Callable[[], object]) -> None:
    """Run ``step`` to its end even if Ctrl-C comes; then raise the Ctrl-C.

    ``step`` must be safe to run again from the start.
    """
    interrupt: BaseException | None = None
    while True:
        try:
            step()
        except KeyboardInterrupt as error:
            interrupt = error
            continue
        break
    if interrupt is not None:
        raise interrupt


def _retire(threads: list[PooledThread]) -> None:
    for thread in threads:
        thread.retire()


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
        self.stop_sent = False  # coordinator side: _STOP sent


class _Feeder:
    """Hands out the items, in index order, to workers and to the schedule.

    Only the coordinating thread advances the iterable (``pull``), as a loop on
    that thread would: under the caller's modes and context, in order, at
    points of the schedule that do not depend on timing, so that a collective
    the iterable itself calls is issued at the same point on every rank.
    Workers take pulled items (``take``) and wait while there is none. The
    iterable may issue collectives itself, so each pull is a window of the
    bypass detector, as an issue is.
    """

    def __init__(self, items: Iterator[Any], detector: BypassDetector | None) -> None:
        self._items = items
        self._detector = detector
        self._ready = threading.Condition(threading.Lock())
        self._runs: list[_ItemRun] = []
        self._next_for_worker = 0
        self._exhausted = False
        self._limit: int | None = None  # workers take no item from this index on
        self.error: tuple[int, Exception] | None = None  # the iterable raised

    @property
    def pulled(self) -> int:
        return len(self._runs)

    def pull(self) -> _ItemRun | None:
        """Advance the iterable by one item; None at its end (or after it raised).

        Called on the coordinating thread only, never under the lock: the
        iterable may block, or call back into torch.distributed. An
        ``Exception`` it raises is kept in ``error``, to be reported like an
        item's failure at that index; any other ``BaseException``
        (``KeyboardInterrupt``, ``SystemExit``) propagates, as from a loop.
        """
        if self._exhausted:
            return None
        if self._detector is not None:
            self._detector.before_iterable()
        try:
            item = next(self._items)
        except StopIteration:
            self._end()
            return None
        except Exception as error:
            self.error = (len(self._runs), error)
            self._end()
            return None
        finally:
            if self._detector is not None:
                self._detector.after_iterable()
        run = _ItemRun(len(self._runs), item)
        with self._ready:
            self._runs.append(run)
            self._ready.notify()
        return run

    def run_for_slot(self, index: int) -> _ItemRun | None:
        """The ``index``-th item's run; None when there are not that many items."""
        while len(self._runs) <= index:
            if self.pull() is None:
                return None
        return self._runs[index]

    def take(self) -> _ItemRun | None:
        """For a worker: the first item no worker has taken, waiting until one
        is pulled; None when there will be none (or the call is closed)."""
        with self._ready:
            while self._next_for_worker == len(self._runs) and not self._stopped():
                if self._exhausted:
                    return None
                self._ready.wait()
            if self._stopped():
                return None
            run = self._runs[self._next_for_worker]
            self._next_for_worker += 1
            return run

    def _end(self) -> None:
        with self._ready:
            self._exhausted = True
            self._ready.notify_all()

    def _stopped(self) -> bool:
        return self._limit is not None and self._next_for_worker >= self._limit

    def stop_at(self, count: int) -> None:
        """Let workers take only the first ``count`` items (those with a slot)."""
        with self._ready:
            self._limit = count if self._limit is None else min(count, self._limit)
            self._ready.notify_all()

    def close(self) -> list[_ItemRun]:
        """Start no more items; returns those taken by workers so far."""
        self.stop_at(0)
        with self._ready:
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
            while (run := self._feeder.take()) is not None:
                self._run = run
                try:
                    with span("item", run.index):
                        result = self._state.run(self._fn, run.item, own_stream, index=run.index)
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
        call = Call(fn, kwargs, plan, run.index, run.calls, stream, ItemModes.capture())
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

    def item_index(self) -> int | None:
        run = self._run
        return None if run is None else run.index

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
        self._feeder = _Feeder(items, detector)
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
        threads: list[PooledThread] = []
        clean = False
        try:
            # Inside the try: a Ctrl-C while threads start must not leak them.
            pool.acquire(len(self._workers), threads)
            for thread, worker in zip(threads, self._workers, strict=True):
                thread.submit(worker.main)
            in_slots = self._loop()
            if self._check is not None:
                self._check.at_end(self._issued)
            clean = not self._errors
        except CollectiveBypassError as error:
            self._add_item_errors(error)
            raise
        finally:
            self._shut_down(threads, clean)
        if self._detector is not None:
            try:
                self._detector.at_end()
            except CollectiveBypassError as error:  # likely the cause of any item's failure
                self._add_item_errors(error)
                raise
        if self._errors:
            raise self._first_error()
        return [self._results[i] for i in range(in_slots)]

    def _shut_down(self, threads: list[PooledThread], clean: bool) -> None:
        """Release the workers; after a failure or an interrupt, end their threads.

        What must happen for the threads to end at all (stopping the items,
        retiring the threads) cannot be interrupted: a second Ctrl-C during it
        is raised once it is done. Waiting for the threads to end can be: a
        second Ctrl-C stops the wait, and the retired threads still exit as
        soon as their item does.
        """
        _uninterruptible(self._stop_items)
        if clean:
            try:
                for thread in threads:
                    thread.wait()
            except BaseException:
                _uninterruptible(lambda: _retire(threads))
                raise
            pool.release(threads)
            return
        # After a failure no thread outlives the call.
        _uninterruptible(lambda: _retire(threads))
        for thread in threads:
            thread.join()

    def _stop_items(self) -> None:
        # Normally every item taken by a worker has had a slot and ended.
        # After a failure, or if the coordinator itself failed (Ctrl-C),
        # items that ran ahead of the schedule, or were cut short, get
        # _STOP: their next collective raises CancelledError instead of
        # being issued. Idempotent, so that it can be rerun if interrupted.
        for run in self._feeder.close():
            with run.turn_lock:  # if Ctrl-C came while the turn was passed
                run.worker_may_issue = False
            if not run.finished and not run.stop_sent:
                run.replies.put(_STOP)
                run.stop_sent = True

    def _loop(self) -> int:
        """Run the schedule; returns how many items had a slot."""
        slots: list[_ItemRun] = []
        while len(slots) < len(self._workers):
            run = self._run_for_slot(len(slots))
            if run is None:
                break
            slots.append(run)
        in_slots = len(slots)
        self._pull_ahead(in_slots)
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
                    if self._errors:  # no new item starts; those in slots finish
                        self._feeder.stop_at(in_slots)
                    del slots[position]
                    if slots:
                        position %= len(slots)
                    continue
                slots[position] = following
                in_slots += 1
                self._pull_ahead(in_slots)
            position = (position + 1) % len(slots)
        return in_slots

    def _pull_ahead(self, in_slots: int) -> None:
        """Keep up to ``max_workers`` items pulled beyond those with a slot.

        Free workers take them without waiting for the schedule (an item
        ahead of it waits at its first collective). Called only where the
        schedule lets an item into a slot, so the iterable is advanced at the
        same points on every rank.
        """
        while self._feeder.pulled < in_slots + len(self._workers):
            if self._feeder.pull() is None:
                return

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
        lines.extend(self._explain_wait(run))
        logger.warning("\n".join(lines))

    def _explain_wait(self, run: _ItemRun) -> list[str]:
        """What a hang report says about items that may wait for each other."""
        awaited = [w for w in self._workers if w.item_index() == run.index]
        if not awaited or awaited[0].waiting_on is not None:
            return []  # the awaited item is itself in a collective
        queued = sorted(
            index for w in self._workers
            if w.waiting_for_issue and (index := w.item_index()) is not None
        )
        if not queued:
            return []
        others = ", ".join(map(str, queued))
        return [
            f"Item {run.index} is running fn; the schedule issues the waiting calls of "
            f"items {others} only after item {run.index}'s next collective or its end. "
            f"If item {run.index} waits for something that one of those items does after "
            "its call (an event, a queue, a lock), this is a deadlock: items must not "
            "wait for each other (see the limits of parallel_map)."
        ]

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
