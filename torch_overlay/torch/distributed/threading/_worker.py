"""The worker threads of a call: run items, hand their collectives to the turn.

Each worker runs items from the feeder on a pooled thread, with
:func:`worker_hook` as its collective hook, and posts each call to the turn
(``_turn``) with its route. It then holds the turn and issues the call
itself, or waits for its mailbox's message. Holding the turn after an issue,
it serves the calls at the next positions that any holder may issue, then
passes the turn on (``Turn.advance``). Every error of an item (of ``fn``, of
a call's issue, or of the worker's thread setup) goes to the coordinator in
the item's ``ItemEnded``.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any, TYPE_CHECKING

import torch
import torch.autograd.profiler as autograd_profiler
import torch.distributed.distributed_c10d as c10d

from ._bypass import coalescing_manager_error, set_collective_hook
from ._calls import (
    Call,
    call_coordinated,
    cuda_is_initialized,
    issue_runs_torch_only,
    plan_for,
)
from ._coalescing import coalescing_key
from ._errors import CollectiveCancelledError
from ._issue import copy_of
from ._order import Route, route
from ._profiling import span
from ._thread_state import CallState, set_sequence_nr
from ._mailbox import ItemEnded, Reply, Signal
from ._turn import Posted, Serve


if TYPE_CHECKING:
    from collections.abc import Callable

    from ._caller_state import CallerState
    from ._feeder import Feeder
    from ._issue import Issuer
    from ._mailbox import Mailbox, Message
    from ._turn import Turn


__all__: list[str] = []


def _cancelled(box: Mailbox) -> CollectiveCancelledError:
    box.cancelled = True
    return CollectiveCancelledError(
        "parallel_map is stopping; this collective was not issued"
    )


class _ThisWorker(threading.local):
    worker: Worker | None = None


_this_worker = _ThisWorker()

# Dispatch modes under which an op is traced (by Dynamo, AOTAutograd, make_fx) rather than run.
_TRACING_MODES = (
    torch._C._TorchDispatchModeKey.FAKE,
    torch._C._TorchDispatchModeKey.PROXY,
    torch._C._TorchDispatchModeKey.FUNCTIONAL,
)


def _tracing() -> bool:
    """Whether a tracing mode is active; ask only with a dispatch mode on the stack."""
    get_mode = torch._C._get_dispatch_mode
    return any(get_mode(key) is not None for key in _TRACING_MODES)


def worker_hook(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """The collective hook of every worker thread.

    A call made while tracing is recorded in the graph, not handed over: a
    DTensor redistribution that AOTAutograd traces, say, or a functional
    collective op that Dynamo runs on fake tensors to propagate shapes (Dynamo
    never calls the entry points' hook, but the ops' hook is in the op). The
    graph's functional collective op is handed over when the graph runs (see
    ``_op_hook``).
    """
    worker = _this_worker.worker
    if worker is None:
        raise AssertionError("the worker hook ran on a thread that is not a worker")
    if fn is c10d._coalescing_manager:
        raise coalescing_manager_error("cannot be used on a worker thread")
    if torch._C._len_torch_dispatch_stack() and _tracing():
        set_collective_hook(None)
        try:
            return fn(**kwargs)
        finally:
            set_collective_hook(worker_hook)
    return worker.submit(fn, kwargs)


_UNSET = object()


def _with_items_context(call: Call) -> None:
    """For a call the coordinator may issue whose issue may run user code (a
    mode, a tensor subclass, a group written in Python, pickling): a copy of
    the item's context to run in, whose changes come back (``_take_back``)."""
    if call.context is None:
        call.context = contextvars.copy_context()


def _take_back(call: Call) -> None:
    """After another thread issued ``call`` for this item: go on from the
    sequence number, state and context changes that the issue left."""
    if call.state_after is not None:
        call.state_after.make_current()
    if call.sequence_nr_after is not None:
        set_sequence_nr(call.sequence_nr_after)
    if call.context is not None:
        for var, value in call.context.items():
            if var.get(_UNSET) is not value:
                var.set(value)


class Worker:
    """One worker: runs items on a pooled thread; holds the turn at times."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        state: CallerState,
        feeder: Feeder,
        turn: Turn,
        issuer: Issuer,
        coalesce: bool,
    ) -> None:
        self._fn = fn
        self._state = state
        self._feeder = feeder
        self._turn = turn
        self._issuer = issuer
        self._coalesce = coalesce
        self.box: Mailbox | None = None
        self.thread: threading.Thread | None = None
        # For hang reports (read racily): the call this worker waits on, and
        # whether it still waits for its issue (else for its result).
        self.waiting_on: Call | None = None
        self.waiting_for_issue = False

    def main(self) -> None:
        """The job, on a pooled thread: run items until there are none."""
        self.thread = threading.current_thread()
        own_stream, setup_error, first = None, None, True
        try:
            own_stream = self._state.enter_worker_thread()
        except BaseException as error:  # each item this worker takes fails with it
            setup_error = error
        _this_worker.worker = self
        try:
            set_collective_hook(worker_hook)
            while (box := self._feeder.take()) is not None:
                self.box = box
                # the original (its traceback) first, then copies
                if setup_error is not None:
                    ended = ItemEnded(
                        error=setup_error if first else copy_of(setup_error)
                    )
                    first = False
                else:
                    try:
                        ended = ItemEnded(
                            self._state.run(
                                self._fn,
                                box.item,
                                own_stream,
                                index=box.index,
                                numbers=box.numbers,
                            )
                        )
                    # the item's: raised by the coordinator
                    except BaseException as error:
                        ended = ItemEnded(error=error)
                self._turn.post(box, ended, Route.COORDINATOR)
                self.box = None
        finally:
            set_collective_hook(None)
            _this_worker.worker = None
            self._state.leave_worker_thread()

    def submit(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """Hand a call to the schedule; returns (or raises) its outcome."""
        box = self.box
        if box is None:
            raise AssertionError("a collective submitted outside an item")
        if box.cancelled:
            raise _cancelled(box)
        plan = plan_for(fn, kwargs)
        # (``_initialized`` first: no call on the CPU.)
        stream = (
            torch.cuda.current_stream()
            if torch.cuda._initialized and cuda_is_initialized()
            else None
        )
        # A coordinated function, user code, runs in a copy of the item's context.
        context = contextvars.copy_context() if fn is call_coordinated else None
        call = Call(fn, kwargs, plan, box.index, box.calls, stream, None, context)
        coalesced = self._coalesce and coalescing_key(call) is not None
        call_route = route(only_enqueues=plan.worker_may_issue, coalesced=coalesced)
        box.calls += 1
        self.waiting_on, self.waiting_for_issue = call, True
        try:
            posted = self._turn.post(box, call, call_route)
            if posted is Posted.NEEDS_STATE:  # it waits: another thread may issue it
                call.state = CallState.capture()
                if call_route is Route.OWN_WORKER:
                    call_route = route(
                        only_enqueues=True,
                        coalesced=False,
                        runs_torch_only=issue_runs_torch_only(call),
                    )
                if call_route is not Route.ANY_HOLDER and not coalesced:
                    _with_items_context(call)
                posted = self._turn.post(box, call, call_route)
            if posted is Posted.CANCELLED:
                raise _cancelled(box)
            if posted is Posted.HOLD_TURN:
                return self._issue_own(box, call)
            message = self._wait(call, box)
            if message is Signal.YOUR_TURN:
                if not self._turn.take_handed(box):
                    raise _cancelled(box)
                return self._issue_own(box, call)
            return self._outcome(box, call, message)
        finally:
            self.waiting_on, self.waiting_for_issue = None, False

    def _wait(self, call: Call, box: Mailbox) -> Message:
        # a span, even a no-op, costs calls
        if not autograd_profiler._is_profiler_enabled:
            return box.replies.get()
        with span("wait", call.name):
            return box.replies.get()

    def _outcome(self, box: Mailbox, call: Call, message: Message) -> Any:
        """The call's outcome from a message: its reply, or CANCEL."""
        self.waiting_for_issue = False  # issued (or not to be): for hang reports
        if message is Signal.CANCEL:
            raise _cancelled(box)
        if not isinstance(message, Reply):
            raise AssertionError(f"unexpected message {message!r}")
        _take_back(call)
        if message.error is not None:
            raise message.error
        return call.plan.finish(message.value, call.kwargs)

    def _issue_own(self, box: Mailbox, call: Call) -> Any:
        """Holding the turn: issue ``call``, advance the turn, return the outcome."""
        if not self._issuer.clear_to_issue():
            # The coordinator gets the call, and raises what the detector saw.
            call.state = call.state or CallState.capture()
            _with_items_context(call)
            self._turn.hand_back(box, call)
            return self._outcome(box, call, self._wait(call, box))
        self.waiting_for_issue = False
        reply = self._issuer.issue(call, on_worker=True, own=True)
        self._serve_then_pass(call)
        if reply.error is not None:
            raise reply.error
        return call.plan.finish(reply.value, call.kwargs)

    def _serve_then_pass(self, issued: Call) -> None:
        """Advance the turn after ``issued``, serving the calls at the next
        positions that any holder may issue, until the turn passes on."""
        # Another item's call must not join a CUDA graph this thread captures
        # (``_initialized`` first: no call on the CPU).
        may_serve = not (
            torch.cuda._initialized and torch.cuda.is_current_stream_capturing()
        )
        while isinstance(taken := self._turn.advance(issued, may_serve), Serve):
            if not self._issuer.clear_to_issue():
                self._turn.hand_back(taken.box, taken.call)
                return
            self._turn.reply(taken.box, self._issuer.issue(taken.call, on_worker=True))
            issued = taken.call

    def describe(self) -> str:
        """One line for a hang report; read racily from the coordinator."""
        box, call, for_issue = self.box, self.waiting_on, self.waiting_for_issue
        if box is None:
            return "idle"
        if call is None:
            return f"item {box.index}: running fn"
        if for_issue:
            return f"item {box.index}: waiting for its turn to issue {call}"
        return f"item {box.index}: waiting for {call} to complete"
