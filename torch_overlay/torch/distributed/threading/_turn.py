"""The turn: who may take the event at the schedule's position, and each item's mailbox.

The turn is a role, not a thread, in the spirit of flat combining: whoever
holds it takes the event at the position (see ``_order``) and advances the
position. The coordinating thread holds it while it runs; when the item at
the position has posted nothing yet, it opens the turn and sleeps. The next
event posted there decides who goes on, and a worker holding the turn passes
it on the same way after each issue. All of it lives under one lock, in
:class:`Turn`; no other class reads or writes its fields. The coordinator's
sections are ``shielded`` (see ``_interrupts``): a Ctrl-C cannot leave the
lock held.

Transitions (``W`` a worker, ``C`` the coordinating thread, *route* the
call's ``_order.Route``)::

    holder       event                          next holder      message
    OPEN         W posts at the position,       W                (W issues now)
                 route not COORDINATOR,
                 workers may hold the turn
    OPEN         W posts anything else there    C                wake C
    any          W posts elsewhere              unchanged        (pending)
    C            takes a pending event          C                reply later
    C            nothing pending at position    OPEN             C sleeps
    W            after an issue: position       OPEN             -
                 has nothing pending
    W            ... a call W may serve         W                Reply to it
    W            ... a call its own worker      that worker      YOUR_TURN
                 may issue
    W            ... anything else              C                wake C
    W            cannot issue (bypass seen)     C                wake C
    any          stop                           OPEN on its      CANCEL to each
                                                next step        item that waits
                                                                 and is not OWED

Each item's mailbox (:class:`Mailbox`) is in one :class:`BoxState`. The
invariants, checked by :meth:`Turn.check_invariants`:

* one holder at a time, and only the holder advances the position;
* while the turn is open, the item at the position has nothing pending;
* each posted call gets exactly one final message (a ``Reply`` or
  ``CANCEL``), or its worker issues it itself; ``CANCEL`` never overtakes a
  message that the holder owes (state ``OWED``: the holder took the call
  and owes it ``YOUR_TURN`` or its ``Reply``; a ``Reply`` is put in the
  same critical section that leaves ``OWED``);
* nothing is taken for issue once the turn is stopped.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._interrupts import lock_for_this_thread
from ._mailbox import BoxState, ItemEnded, Signal
from ._order import Route, SlotCycle


if TYPE_CHECKING:
    from ._calls import Call
    from ._mailbox import Event, Mailbox, Reply


__all__: list[str] = []

logger = logging.getLogger(__name__)


def _broken(what: str) -> AssertionError:
    return AssertionError(f"parallel_map's turn: {what} (a bug in parallel_map)")


class Visit(enum.Enum):
    FLUSH = enum.auto()  # Turn.take: the item's call is held back; issue those first


class Holder(enum.Enum):
    COORDINATOR = enum.auto()
    WORKER = enum.auto()
    OPEN = enum.auto()  # nobody; the next event posted at the position decides


class Posted(enum.Enum):
    """What :meth:`Turn.post` did with an event."""

    QUEUED = enum.auto()  # left for whoever holds the turn
    HOLD_TURN = enum.auto()  # the poster holds the turn: it issues its call now
    CANCELLED = enum.auto()  # the turn has stopped: the call is not issued
    # would be left for another thread: capture its state, post again
    NEEDS_STATE = enum.auto()


class Passed(enum.Enum):
    """Where the turn went after a worker's issue (:meth:`Turn.advance`)."""

    OPEN = enum.auto()
    TO_COORDINATOR = enum.auto()
    TO_WORKER = enum.auto()
    STOPPED = enum.auto()


@dataclass
class Serve:
    """:meth:`Turn.advance`: the holder issues ``call`` for ``box``'s worker, then replies."""

    box: Mailbox
    call: Call


class Turn:
    """The position, the holder and the mailboxes, under one lock (see the module doc)."""

    def __init__(self, workers_may_hold: bool) -> None:
        self._lock = threading.Lock()
        # created by the coordinator
        self._coordinators_lock = lock_for_this_thread(self._lock)
        self._cycle: SlotCycle[Mailbox] = SlotCycle([])
        self._holder = Holder.COORDINATOR
        # Whether a worker may take an open turn. Off while the coordinator
        # holds calls back to coalesce, and where it must see every call.
        self._workers_may_hold = workers_may_hold
        self._passing = False  # workers may take the turn now
        self._stopped = False
        self._issued = 0  # calls issued (or held to be coalesced) so far
        # The coordinating thread, in every issue's debug log: a nested call's can be told apart.
        self._coordinator = threading.get_ident()
        self._log_issues = logger.isEnabledFor(logging.DEBUG)
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()

    @property
    def issued(self) -> int:
        with self._coordinators_lock:
            return self._issued

    def at_position(self) -> Mailbox | None:
        with self._coordinators_lock:
            return self._cycle.current()

    def fill(self, first: list[Mailbox]) -> None:
        """The items of the first slots, in slot order."""
        with self._coordinators_lock:
            self._cycle = SlotCycle(first)

    def take(self, held: list[Mailbox]) -> tuple[Mailbox, Event | Visit | None] | None:
        """The coordinator's visit at the position: the item there and its
        pending event; None once no slot holds an item.

        With nothing pending, the turn opens (then :meth:`wait`), unless the
        item's call is among the ``held`` ones: the event is then ``Visit.FLUSH``,
        and the coordinator issues those before it visits again.
        """
        with self._coordinators_lock:
            if self._holder is not Holder.COORDINATOR:
                raise _broken(
                    f"the coordinator visits while {self._holder.name} holds it"
                )
            box = self._cycle.current()
            if box is None:
                return None
            event = box.pending
            if event is not None:
                box.pending = None
                box.state = (
                    BoxState.ENDED if isinstance(event, ItemEnded) else BoxState.RUNNING
                )
                return box, event
            if box in held:
                return box, Visit.FLUSH
            self._passing = self._workers_may_hold and not held
            self._holder = Holder.OPEN
            return box, None

    def wait(self, timeout: float | None) -> bool:
        """Sleep until the turn is handed to the coordinator; False on timeout."""
        try:
            self._wake.get(timeout=timeout)
        except queue.Empty:
            return False
        return True

    def after_call(self, call: Call) -> None:
        """The coordinator issued ``call`` (or holds it back): count it, move on."""
        with self._coordinators_lock:
            self._count(call)
            self._cycle.after_call()

    def after_end(self, following: Mailbox | None) -> bool:
        """The item at the position ended; returns whether any slot holds an item."""
        with self._coordinators_lock:
            self._cycle.after_end(following)
            return bool(len(self._cycle))

    def stop(self, taken: list[Mailbox]) -> None:
        """No more issues; ``CANCEL`` to each item in ``taken`` that may
        still wait for one: not ended, not cancelled, not owed a message by
        the holder (which sends it). Idempotent."""
        with self._coordinators_lock:
            self._stopped = True
            to_cancel = [
                box
                for box in taken
                if box.state in (BoxState.RUNNING, BoxState.PENDING)
                # its worker waits for nothing
                and not isinstance(box.pending, ItemEnded)
            ]
            # sent under the lock: a Ctrl-C cannot split state and message
            for box in to_cancel:
                box.pending, box.state = None, BoxState.CANCELLED
                box.replies.put(Signal.CANCEL)

    def post(self, box: Mailbox, event: Event, route: Route) -> Posted:
        """A worker posts its item's next event (a call with its route, or its end).

        A call is posted without its item's state (``Call.state``, costly to
        capture) in case its worker takes the turn; one that would be left
        for another thread is refused until it has it.
        """
        is_call = not isinstance(event, ItemEnded)
        with self._lock:
            if self._stopped and is_call:
                return Posted.CANCELLED
            at_position = self._holder is Holder.OPEN and self._cycle.current() is box
            if at_position and route is not Route.COORDINATOR and self._passing:
                self._holder = Holder.WORKER
                return Posted.HOLD_TURN
            if is_call and event.state is None:  # type: ignore[union-attr]
                return Posted.NEEDS_STATE
            box.pending, box.pending_route, box.state = event, route, BoxState.PENDING
            if not at_position:
                return Posted.QUEUED
            self._holder = Holder.COORDINATOR
        self._wake.put(None)
        return Posted.QUEUED

    def advance(self, issued: Call, may_serve: bool) -> Serve | Passed:
        """The holder issued ``issued``: count it, advance, and take the next
        call to serve (``may_serve``: one whose route is ``ANY_HOLDER``), or
        pass the turn on."""
        with self._lock:
            if self._holder is not Holder.WORKER:
                raise _broken(f"a worker advances while {self._holder.name} holds it")
            self._count(issued)
            if self._stopped:  # the coordinator cancels every item; no more issues
                self._holder = Holder.OPEN
                return Passed.STOPPED
            box = self._cycle.after_call()
            call = box.pending
            if call is None:
                self._holder = Holder.OPEN
                return Passed.OPEN
            if box.pending_route is Route.COORDINATOR:
                self._holder = Holder.COORDINATOR
                passed = Passed.TO_COORDINATOR
            else:
                if isinstance(call, ItemEnded):
                    raise _broken("an item's end routed to a worker")
                box.pending, box.state = None, BoxState.OWED
                if may_serve and box.pending_route is Route.ANY_HOLDER:
                    return Serve(box, call)
                passed = Passed.TO_WORKER
        if passed is Passed.TO_COORDINATOR:
            self._wake.put(None)
        else:
            box.replies.put(Signal.YOUR_TURN)
        return passed

    def reply(self, box: Mailbox, reply: Reply) -> None:
        """The holder's reply to a call it served. Under the lock, with the
        state leaving ``OWED``: a stop from this moment reaches the worker's
        next call, and none came before this reply."""
        with self._lock:
            if box.state is not BoxState.OWED:
                raise _broken(f"a reply to {box}, which is owed none")
            box.state = BoxState.RUNNING
            box.replies.put(reply)

    def take_handed(self, box: Mailbox) -> bool:
        """Woken with ``YOUR_TURN``: whether to issue (False: the turn stopped)."""
        with self._lock:
            if box.state is not BoxState.OWED:
                raise _broken(f"{box} takes a turn it was not handed")
            box.state = BoxState.RUNNING
            if not self._stopped:
                return True
            self._holder = Holder.OPEN
            return False

    def hand_back(self, box: Mailbox, call: Call) -> None:
        """The holder cannot issue ``call`` (the bypass detector saw a change):
        it leaves the call and the turn to the coordinator, which raises.
        Once stopped, the call's worker gets ``CANCEL`` instead."""
        with self._lock:
            stopped = self._stopped
            if stopped:
                send = box.state is not BoxState.CANCELLED
                box.state = BoxState.CANCELLED
                self._holder = Holder.OPEN
            else:
                box.pending, box.pending_route = call, Route.COORDINATOR
                box.state = BoxState.PENDING
                self._holder = Holder.COORDINATOR
        if not stopped:
            self._wake.put(None)
        elif send:
            box.replies.put(Signal.CANCEL)

    def check_invariants(self) -> None:
        with self._lock:
            holder = self._holder
            if holder is Holder.OPEN and not self._stopped:
                box = self._cycle.current()
                if box is None or box.pending is not None:
                    raise _broken(f"open at {box}, with no slot or an event pending")
            for box in self._cycle.items():
                if (box.pending is None) != (box.state is not BoxState.PENDING):
                    raise _broken(f"{box}: its state and its pending event disagree")

    def _count(self, call: Call) -> None:
        """Under the lock: number the issue (in the debug log, when on as the call began)."""
        if self._log_issues:
            logger.debug(
                "issue #%d: item %d call %d %s",
                self._issued,
                call.item,
                call.seq,
                call.name,
                extra={"coordinator": self._coordinator},
            )
        self._issued += 1
