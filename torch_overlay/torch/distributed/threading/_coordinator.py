"""The schedule, its turn, and the worker threads.

The schedule decides the order in which collectives are issued. It has ``W``
slots; slot ``s`` starts with item ``s``. The schedule visits the slots that
still hold an item in a fixed cyclic order (its *position*) and, at each
visit, takes the next event of that slot's item:

* a collective: issue it (see ``_calls``), move to the next slot;
* the item's end: record its outcome, put the next item not yet in a slot
  into this slot (unless an item has failed), move to the next slot.

Each decision depends only on each item's own sequence of collectives and on
``W``, never on timing, so every rank issues the same collectives in the same
order. Because the schedule only issues, a worker blocked on its collective
never keeps the schedule from issuing what other ranks need first.

Who advances the schedule does not matter to the order, only that one
thread at a time does, taking the events in the schedule's order. So
advancing it is a role, the *turn* (``_Turns``), in the spirit of flat
combining: the position, the slots and each item's pending event live under
one lock, and whoever holds the turn takes the event at the position and
advances the position. The coordinating thread (the caller) holds it while it
runs, and gives it up when the item at the position has posted nothing yet;
it then sleeps. The next event posted at the position decides who goes on:

* a call that only enqueues work (see ``_calls``): its own worker takes the
  turn, issues the call, and advances the position. While the item at the
  new position already waits with a call of that kind whose issue runs only
  torch's code (``Call.servable``: a torch.distributed entry point on plain
  tensors, no modes), the worker issues that call too, and its worker gets
  the reply as from the coordinator: a run of such calls needs no thread to
  wake before the next issue. A waiting call whose issue may run user code
  (a mode, a tensor subclass) is never issued inside another item's call,
  where that code could need something the item holds (a lock around its
  call): the worker hands the turn to that item's worker (``_YOUR_TURN``),
  which issues its own call and goes on the same way. If the item at the
  new position has posted nothing, the worker leaves the turn open, and
  that item's worker takes it with its call;
* anything else (an item's end, a call that runs to completion, a call to be
  coalesced) stays at the position, and the turn goes back to the
  coordinator, which is woken for it.

So a run of enqueue-only collectives is issued without waiting on a thread
to wake, and the coordinator wakes only for what it alone does: advancing
the iterable (when an item enters a slot), running calls that run to
completion (object collectives, group creation,
``coordinated`` functions: the latter are documented to run on the
coordinating thread, and all of them block, so a worker holding the turn
meanwhile would gain nothing), issuing held coalesced calls, reporting hangs,
and stopping. A call that arrives before its turn waits as a pending event
for whoever holds the turn then.

Some schedules pass no turn: with the schedule check, which exchanges every
call's fingerprint with the other ranks from the coordinating thread before
it is issued; in a nested schedule, whose coordinator issues through the
outer schedule's hook; and while the coordinator holds calls back to
coalesce them, as those must go first. The coordinator then takes every
event itself.

With coalescing (see ``_coalescing``), the coordinator holds back the small
synchronous all_reduces it meets and issues them together just before it
issues anything else, and before it waits on a slot whose call it holds:
at the latest when its visit comes back round. A worker never takes the
turn for a call the coordinator would hold.

When the call stops (an error, Ctrl-C on the coordinating thread), the
coordinator marks the turn stopped under its lock: a worker that holds it
issues nothing more, and a call posted from then on raises
``CancelledError``. Calls left pending get ``_STOP``; a worker handed the
turn at that moment finds the turn stopped and raises ``CancelledError``
without issuing, and a call that the holder took to issue gets its reply.

Whoever issues a call for an item other than its own does so under that
item's thread-local state and autograd sequence number, and hands the next
number back with the reply (``Call.issue``, ``_thread_state``), so the
issue behaves, and numbers its autograd nodes, as on the item's thread.
A call's state is captured only when it is left for another thread
(``_NEEDS_STATE``): a worker that takes the turn issues it itself.

Items, waits for a turn and issues are spans in a ``torch.profiler`` trace
(see ``_profiling``).

Whoever issues (the coordinator, or a worker holding the turn) does so inside
the bypass detector's window (see ``_bypass``): it checks right before
issuing that no process group counted a collective since the last issue, and
reads the counters again right after, before it runs on or passes the turn.
A worker that sees a change leaves the call and the turn to the coordinator
instead, which raises.
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

import contextvars
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
from ._calls import (
    Call,
    call_coordinated,
    cuda_is_initialized,
    issue_runs_torch_only,
    plan_for,
)
from ._coalescing import coalescing_key, issue_coalesced
from ._pool import pool
from ._profiling import span
from ._thread_state import CallState, Numbering, set_sequence_nr


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._bypass import BypassDetector
    from ._caller_state import CallerState
    from ._pool import PooledThread
    from ._schedule_check import ScheduleCheck
    from ._thread_state import ItemNumbers


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
    """To a worker: the outcome of issuing its call (from the coordinator or a worker)."""

    value: Any = None
    error: BaseException | None = None


@dataclass
class _Finished:
    """Worker to coordinator: the item ran to its end."""

    result: Any = None
    error: BaseException | None = None


_STOP = object()  # coordinator to worker, instead of a reply: the call is stopping
_YOUR_TURN = object()  # worker to worker, instead of a reply: issue the call yourself
_PASSED_BACK = object()  # a handed turn went to the coordinator (see _Worker)


class _ItemRun:
    """One item, and what is in flight between its worker and the schedule.

    ``pending`` is the item's next event (a call, or its end) posted by its
    worker and not yet taken by the thread that holds the turn (see
    ``_Turns``); ``replies`` carries the outcome of each call back, or
    ``_STOP``. The item has at most one message in flight each way, so
    ``_STOP`` never overtakes a reply the worker waits for.
    """

    def __init__(self, index: int, item: Any, numbers: ItemNumbers) -> None:
        self.index = index
        self.item = item
        self.numbers = numbers  # its autograd sequence numbers
        self.replies: queue.SimpleQueue[_Reply | object] = queue.SimpleQueue()
        # Under _Turns.lock:
        self.pending: Call | _Finished | None = None
        self.pending_passable = False  # a worker holding the turn may issue it
        # The holder took its pending call: it owes the worker _YOUR_TURN or
        # the call's reply, which no _STOP may overtake.
        self.owed = False
        self.finished = False  # seen to end by the coordinator
        self.stop_sent = False  # coordinator side: _STOP sent
        # Worker side:
        self.calls = 0  # calls handed over so far
        self.stopping = False  # _STOP received, or the schedule had stopped


# Who holds the turn, that is, the right to take the event at the schedule's
# position and to advance the position (see _Turns).
_COORDINATOR = "coordinator"
_WORKER = "worker"
_NOBODY = "nobody"

# What _Turns.post did with an event.
_POSTED = "posted"  # left for whoever holds the turn
_TAKEN = "taken"  # the caller holds the turn now: it issues its call itself
_STOPPED = "stopped"  # the schedule has stopped: the call is not issued
# The call would be left for another thread: capture its item's state, post again.
_NEEDS_STATE = "needs state"


class _Turns:
    """The schedule's position among the slots and the turn, under one lock.

    The turn is a role, not a thread: whoever holds it takes the event at the
    position (issuing a call, or, for the coordinator only, handling an item's
    end) and advances the position, one slot per event, as the schedule
    decides. The coordinator holds it while it runs. It gives it up
    (``_NOBODY``) only when the item at the position has posted nothing, and
    then sleeps until it is handed back. The next event posted at the position
    decides: a call that a worker may issue itself, while passing is allowed,
    makes its worker the holder; anything else is left there and the turn
    handed back to the coordinator, with one wake-up.

    Invariants: while nobody holds the turn, ``slots`` is not empty and the
    item at the position has nothing pending; only the holder advances the
    position, and only the coordinator changes ``slots``.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.slots: list[_ItemRun] = []
        self.position = 0
        self.holder = _COORDINATOR
        # While nobody holds the turn: whether a worker may take it.
        self.passing = False
        self.stopped = False
        self.issued = 0  # collectives issued (or held to be coalesced) so far
        # The coordinating thread, named in the debug log of every issue
        # whichever thread issues, so that a nested schedule's can be told apart.
        self.coordinator = threading.get_ident()
        # One token each time the turn is handed to the coordinator.
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()

    def at_position(self) -> _ItemRun:
        return self.slots[self.position]

    def count_issue(self, call: Call) -> None:
        """Count an issue; under ``lock``, by the holder."""
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "issue #%d: item %d call %d %s", self.issued, call.item, call.seq, call.name,
                extra={"coordinator": self.coordinator},
            )
        self.issued += 1

    def post(self, run: _ItemRun, event: Call | _Finished, passable: bool) -> str:
        """A worker posts its item's next event; see ``_POSTED``, ``_TAKEN``,
        ``_STOPPED`` and ``_NEEDS_STATE``.

        A call is posted without its item's state (``Call.state``, costly to
        capture) in case its worker takes the turn and issues it itself; one
        that would be left for another thread is refused until it has it.
        """
        with self.lock:
            if self.stopped and isinstance(event, Call):
                return _STOPPED
            at_position = self.holder is _NOBODY and self.slots[self.position] is run
            if at_position and passable and self.passing:
                self.holder = _WORKER
                return _TAKEN
            if isinstance(event, Call) and event.state is None:
                return _NEEDS_STATE
            run.pending, run.pending_passable = event, passable
            if not at_position:
                return _POSTED
            self.holder = _COORDINATOR
        self._wake.put(None)
        return _POSTED

    def hand_back(self, run: _ItemRun, call: Call) -> None:
        """The holder leaves ``call`` at the position for the coordinator, and the turn.

        Once the schedule has stopped, the coordinator takes no more events:
        the call's worker gets ``_STOP`` instead (unless it already has).
        """
        with self.lock:
            run.owed = False
            stopped = self.stopped
            stop = stopped and not run.stop_sent
            if stop:
                run.stop_sent = True
            elif not stopped:
                run.pending, run.pending_passable = call, False
                self.holder = _COORDINATOR
        if stop:
            run.replies.put(_STOP)
        elif not stopped:
            self._wake.put(None)

    def reply(self, run: _ItemRun, reply: _Reply) -> None:
        """Give the worker of a call that the holder took (``owed``) its reply.

        Under the lock, with ``owed`` cleared: the worker can post its next
        call only once it has the reply, and ``_stop_items`` then sees it
        as owed nothing, so a stop from that moment reaches it.
        """
        with self.lock:
            run.owed = False
            run.replies.put(reply)

    def hand_to_coordinator(self) -> None:
        """Under ``lock``: the holder gives the coordinator the turn (``wake`` after)."""
        self.holder = _COORDINATOR

    def wake_coordinator(self) -> None:
        self._wake.put(None)

    def wait_for_turn(self, timeout: float | None) -> bool:
        """On the coordinator: sleep until the turn is handed back; False on timeout."""
        try:
            self._wake.get(timeout=timeout)
        except queue.Empty:
            return False
        return True


class _Feeder:
    """Hands out the items, in index order, to workers and to the schedule.

    Only the coordinating thread advances the iterable (``pull``), as a loop on
    that thread would: under the caller's modes and context, in order, at
    points of the schedule that do not depend on timing, so that a collective
    the iterable itself calls is issued at the same point on every rank.
    Workers take pulled items (``take``) and wait while there is none. The
    iterable may issue collectives itself, so each pull is a window of the
    bypass detector, as an issue is. What it builds with autograd is numbered
    just before the item it yields (see ``_thread_state.Numbering``).
    """

    def __init__(self, items: Iterator[Any], detector: BypassDetector | None,
                 numbering: Numbering) -> None:
        self._items = items
        self._detector = detector
        self._numbering = numbering
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
        pulled = False
        try:
            self._numbering.before_pull()
            item = next(self._items)
            pulled = True
        except StopIteration:
            self._end()
            return None
        except Exception as error:
            self.error = (len(self._runs), error)
            self._end()
            return None
        finally:
            numbers = self._numbering.after_pull(pulled)
            if self._detector is not None:
                self._detector.after_iterable()
        assert numbers is not None
        run = _ItemRun(len(self._runs), item, numbers)
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


def _clear_to_issue(detector: BypassDetector | None) -> bool:
    """Whether the holder of the turn may issue now (else the coordinator raises)."""
    if detector is None:
        return True
    try:
        return detector.clear_to_issue()
    except Exception:  # the coordinator's own check raises it
        return False


def _take_back(call: Call) -> None:
    """On the item's worker, after another thread issued ``call`` for it: go
    on from the sequence number, and the state and context changes, that the
    issue left."""
    if call.state_after is not None:
        call.state_after.make_current()
    if call.sequence_nr_after is not None:
        set_sequence_nr(call.sequence_nr_after)
    if call.context is not None:
        for var, value in call.context.items():
            if var.get(_UNSET) is not value:
                var.set(value)


_UNSET = object()


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


def _capturing_cuda_graph() -> bool:
    """Whether this thread captures a CUDA graph: another item's call must not join it."""
    return cuda_is_initialized() and torch.cuda.is_current_stream_capturing()


def _tracing() -> bool:
    if not torch._C._len_torch_dispatch_stack():  # counts these modes too; the common case
        return False
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
    handing their collectives to the schedule; holds the turn at times."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        state: CallerState,
        feeder: _Feeder,
        turns: _Turns,
        coalesce: bool,
        detector: BypassDetector | None,
    ) -> None:
        self._fn = fn
        self._state = state
        self._feeder = feeder
        self._turns = turns
        self._coalesce = coalesce
        self._detector = detector
        self._run: _ItemRun | None = None
        self.thread: threading.Thread | None = None
        # For hang reports: the call this worker waits on, and whether it is
        # still waiting for it to be issued (else for its result).
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
                    result = self._state.run(self._fn, run.item, own_stream,
                                             index=run.index, numbers=run.numbers)
                except BaseException as error:  # the coordinator owns every error
                    self._turns.post(run, _Finished(error=error), passable=False)
                else:
                    self._turns.post(run, _Finished(result), passable=False)
                self._run = None
        finally:
            _collective_hook.fn = None
            _this_worker.worker = None
            self._state.leave_worker_thread()

    def _hand_over(self, fn: Callable[..., Any], /, **kwargs: Any) -> Any:
        """The collective hook: post the call to the schedule and wait for its
        outcome, or issue it here if this worker gets the turn."""
        run = self._run
        assert run is not None
        if run.stopping:
            raise CancelledError("parallel_map is stopping; this collective was not issued")
        plan = plan_for(fn, kwargs)
        stream = torch.cuda.current_stream() if cuda_is_initialized() else None
        # The item's state goes with the call, for whichever thread issues it;
        # a coordinated function, user code, runs in a copy of its context too.
        context = contextvars.copy_context() if fn is call_coordinated else None
        call = Call(fn, kwargs, plan, run.index, run.calls, stream, None, context)
        # A call the coordinator would hold back must reach it.
        passable = plan.worker_may_issue and not (
            self._coalesce and coalescing_key(call) is not None
        )
        call.servable = passable and issue_runs_torch_only(call)
        run.calls += 1
        self.waiting_on, self.waiting_for_issue = call, True
        try:
            posted = self._turns.post(run, call, passable)
            if posted is _NEEDS_STATE:
                call.state = CallState.capture()
                posted = self._turns.post(run, call, passable)
            if posted is _TAKEN:
                if _clear_to_issue(self._detector):
                    self.waiting_for_issue = False
                    return self._issue_at_turn(call)
                # The coordinator gets the call, and raises what the detector saw.
                call.state = call.state or CallState.capture()
                self._turns.hand_back(run, call)
            elif posted is _STOPPED:
                run.stopping = True
                raise CancelledError("parallel_map is stopping; this collective was not issued")
            with span("wait", call.name):
                reply = run.replies.get()
            if reply is _YOUR_TURN:
                outcome = self._take_handed_turn(run, call)
                if outcome is not _PASSED_BACK:
                    return outcome
                with span("wait", call.name):
                    reply = run.replies.get()
            self.waiting_for_issue = False
            if reply is _STOP:
                run.stopping = True
                raise CancelledError("parallel_map is stopping; this collective was not issued")
            assert isinstance(reply, _Reply)
            _take_back(call)
            if reply.error is not None:
                raise reply.error
            return plan.finish(reply.value, kwargs)
        finally:
            self.waiting_on, self.waiting_for_issue = None, False

    def _issue_at_turn(self, call: Call) -> Any:
        """Issue this worker's own ``call`` at its turn, then pass the turn on."""
        # Holding the turn, this thread is the only one that issues: the issue
        # is alone and in the schedule's order.
        _collective_hook.fn = None  # issue for real, do not hand over again
        try:
            with span("issue", call):
                issued = call.plan.issue(call.fn, call.kwargs)
        finally:
            _collective_hook.fn = _worker_hook
            try:
                if self._detector is not None:
                    self._detector.after_issue(call)
            finally:  # the turn goes on whatever happened
                self._pass_turn_on(call)
        return call.plan.finish(issued, call.kwargs)

    def _pass_turn_on(self, issued: Call) -> None:
        """Holding the turn after issuing ``issued``: advance the position,
        serve the calls already waiting there that only run torch's code, and
        pass the turn on.

        Each call at the position is taken in the schedule's order. A call
        whose issue runs no user code (``Call.servable``) is issued here, and
        its worker gets the reply as from the coordinator; no thread switch
        stands between two such issues. At the first other event the turn
        goes on: to nobody when the item there has posted nothing (its worker
        takes it with its call), to that item's worker when it waits with a
        call it may issue itself (it wakes with ``_YOUR_TURN``), and to the
        coordinator when the event is one only the coordinator handles. A
        call whose issue may run user code (a mode, a tensor subclass) is
        never issued here, inside this item's call: it could need something
        this item holds (a lock around its collective, say). Serving stops
        at this worker's own slot, which has nothing pending.

        An error of the bypass detector's read after a served issue is raised
        here once the turn has moved on, as after this worker's own issue.
        """
        turns = self._turns
        failure: BaseException | None = None
        while (taken := self._next_to_serve(issued)) is not None:
            run, call = taken
            if not _clear_to_issue(self._detector):
                # The coordinator gets the call, and raises what the detector saw.
                turns.hand_back(run, call)
                break
            reply = self._serve(call)
            try:
                if self._detector is not None:  # before its worker runs on
                    self._detector.after_issue(call)
            except BaseException as error:
                failure = failure or error
            turns.reply(run, reply)
            issued = call
        if failure is not None:
            raise failure

    def _next_to_serve(self, issued: Call) -> tuple[_ItemRun, Call] | None:
        """Count ``issued``, advance the position, and take the call there if
        this worker is to issue it; else pass the turn on and return None."""
        turns = self._turns
        with turns.lock:
            turns.count_issue(issued)
            if turns.stopped:  # the coordinator stops every item; no more issues
                turns.holder = _NOBODY
                return None
            turns.position = (turns.position + 1) % len(turns.slots)
            run = turns.slots[turns.position]
            event = run.pending
            if event is None:
                turns.holder = _NOBODY
                return None
            if not run.pending_passable:
                turns.hand_to_coordinator()
                to = _COORDINATOR
            else:
                assert isinstance(event, Call)
                run.pending = None
                run.owed = True  # no _STOP may overtake its reply or _YOUR_TURN
                if event.servable and not _capturing_cuda_graph():
                    return run, event
                to = _WORKER
        if to is _COORDINATOR:
            turns.wake_coordinator()
        else:
            run.replies.put(_YOUR_TURN)
        return None

    def _serve(self, call: Call) -> _Reply:
        """Issue another item's ``call`` at its turn (see ``_pass_turn_on``)."""
        _collective_hook.fn = None
        try:
            with span("issue", call):
                return _Reply(call.issue())
        except BaseException as error:  # raised where serial code would: in its worker,
            return _Reply(error=error)  # which would otherwise wait for a reply forever
        finally:
            _collective_hook.fn = _worker_hook

    def _take_handed_turn(self, run: _ItemRun, call: Call) -> Any:
        """Woken with ``_YOUR_TURN``: issue ``call`` at the turn a worker passed;
        returns the call's outcome, or ``_PASSED_BACK`` if the coordinator has it now."""
        turns = self._turns
        with turns.lock:
            run.owed = False
            stopped = turns.stopped
            if stopped:
                turns.holder = _NOBODY
        if stopped:
            run.stopping = True
            raise CancelledError("parallel_map is stopping; this collective was not issued")
        if _clear_to_issue(self._detector):
            self.waiting_for_issue = False
            return self._issue_at_turn(call)
        # The coordinator gets the call, and raises what the detector saw.
        turns.hand_back(run, call)
        return _PASSED_BACK

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
            return f"item {run.index}: waiting for its turn to issue {what}"
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
        self._numbering = Numbering()
        self._feeder = _Feeder(items, detector, self._numbering)
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
        self._turns = _Turns()
        self._workers = [
            _Worker(fn, state, self._feeder, self._turns, coalesce, detector)
            for _ in range(max_workers)
        ]
        self._results: dict[int, Any] = {}
        self._errors: dict[int, BaseException] = {}

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
                self._check.at_end(self._turns.issued)
            clean = not self._errors
        except CollectiveBypassError as error:
            self._add_item_errors(error)
            raise
        finally:
            try:
                self._shut_down(threads, clean)
            finally:  # a second Ctrl-C may end the shutdown early
                self._numbering.finish()
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
        # being issued. A worker that holds the turn issues nothing more; an
        # item owed _YOUR_TURN or a reply by the holder gets no _STOP: it
        # finds the turn stopped, or gets the reply of its issued call.
        # Idempotent, so that it can be rerun if interrupted.
        turns = self._turns
        with turns.lock:
            turns.stopped = True
            to_stop = [
                run for run in self._feeder.close()
                if not run.finished and not run.stop_sent and not run.owed
            ]
            for run in to_stop:
                run.stop_sent = True
        for run in to_stop:
            run.replies.put(_STOP)

    def _loop(self) -> int:
        """Run the schedule; returns how many items had a slot.

        The coordinator holds the turn throughout, except in ``_next_event``.
        """
        turns = self._turns
        slots: list[_ItemRun] = []
        while len(slots) < len(self._workers):
            run = self._run_for_slot(len(slots))
            if run is None:
                break
            slots.append(run)
        in_slots = len(slots)
        with turns.lock:
            turns.slots = slots
        self._pull_ahead(in_slots)
        while (taken := self._next_event()) is not None:
            run, event = taken
            if isinstance(event, Call):
                self._schedule(run, event)
                with turns.lock:
                    turns.position = (turns.position + 1) % len(slots)
                continue
            run.finished = True
            if event.error is None:
                self._results[run.index] = event.result
            else:
                self._errors[run.index] = event.error
            following = None if self._errors else self._run_for_slot(in_slots)
            if following is None:
                if self._errors:  # no new item starts; those in slots finish
                    self._feeder.stop_at(in_slots)
                with turns.lock:
                    del slots[turns.position]
                    if slots:
                        turns.position %= len(slots)
                continue
            with turns.lock:
                slots[turns.position] = following
            in_slots += 1
            self._pull_ahead(in_slots)
            with turns.lock:
                turns.position = (turns.position + 1) % len(slots)
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

    def _next_event(self) -> tuple[_ItemRun, Call | _Finished] | None:
        """The event at the position, with the turn; None once no slot holds an item.

        While the item at the position has posted nothing, the coordinator
        gives up the turn and sleeps until it is handed back: by that item's
        worker posting an event only the coordinator handles, or by a worker
        that holds the turn and meets such an event further on.
        """
        turns = self._turns
        while True:
            with turns.lock:
                if not turns.slots:
                    return None
                run = turns.at_position()
            # Held calls go before a wait on a slot whose call is held.
            if self._held and any(held is run for held, _ in self._held):
                self._issue_held()
            with turns.lock:
                event = run.pending
                if event is not None:
                    run.pending = None
                    return run, event
                # Held calls go before anything else: no turn to pass while there are any.
                turns.passing = self._pass_turns and not self._held
                turns.holder = _NOBODY
            self._wait_for_turn()

    def _wait_for_turn(self) -> None:
        if self._report_hang_after is None:
            self._turns.wait_for_turn(None)
            return
        # Workers may pass the turn among themselves for a long time without
        # the coordinator: only a wait in which nothing was issued is a hang.
        started = time.monotonic()
        with self._turns.lock:
            issued = self._turns.issued
        while not self._turns.wait_for_turn(self._report_hang_after):
            with self._turns.lock:
                run = self._turns.at_position()
                progressed, issued = self._turns.issued != issued, self._turns.issued
            if progressed:
                started = time.monotonic()
                continue
            self._report_hang(run, time.monotonic() - started)

    def _report_hang(self, run: _ItemRun, waited: float) -> None:
        frames = sys._current_frames()
        lines = [
            f"parallel_map has waited {waited:.0f} s for the next event of item {run.index} "
            f"({self._turns.issued} collectives issued so far). Workers:"
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

    def _schedule(self, run: _ItemRun, call: Call) -> None:
        """Issue ``call``, or hold it back to be coalesced."""
        key = coalescing_key(call) if self._coalesce else None
        if self._held and key != self._held_key:
            self._issue_held()
        if key is None:
            self._issue(run, call)
            return
        if self._check is not None:
            self._check.before_issue(self._turns.issued, call)
        with self._turns.lock:
            self._turns.count_issue(call)
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
            self._check.before_issue(self._turns.issued, call)
        with self._turns.lock:
            self._turns.count_issue(call)
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
