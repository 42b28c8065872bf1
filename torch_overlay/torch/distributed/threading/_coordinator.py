"""The coordinating thread of a call: drives the schedule, owns its errors, shuts it down.

The coordinator (the thread that called ``parallel_map``) starts the workers
(``_worker``), then holds the turn (``_turn``) and takes the event at the
position, until no slot holds an item. When the item there has posted
nothing yet it opens the turn and sleeps, and wakes only for what it alone
does: an item's end (the next item enters the slot), calls whose route is
``COORDINATOR`` (``_order.route``), held coalesced calls (``_coalescing``),
hang reports (``_hang_report``) and stopping. Workers may hold the turn
unless the schedule check exchanges every call with the other ranks from
this thread, or the call is nested (its coordinator issues through the outer
schedule's hook), or calls are held back to coalesce.

It alone advances the iterable (``_feeder``): the items of the first slots,
then one more each time an item enters a slot, keeping ``W`` items pulled
ahead for free workers. Items enter slots in index order, so waiting on a
slot never waits on a free thread.

Errors: the lowest failed index is raised, the others attached as notes.
After a failure no new item starts and the items in slots finish, so their
collectives still match the other ranks'. On a failure or Ctrl-C the turn
stops, every item taken and not ended gets ``CANCEL``, and no worker thread
outlives the call.
"""

from __future__ import annotations

import time
from typing import Any, TYPE_CHECKING

from torch.distributed.distributed_c10d import _collective_hook

from ._coalescing import coalescing_key, HeldCalls
from ._errors import CollectiveBypassError
from ._feeder import Feeder
from ._hang_report import report_hang
from ._issue import Issuer
from ._pool import pool
from ._thread_state import Numbering
from ._mailbox import ItemEnded
from ._turn import Turn, Visit
from ._worker import Worker


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from ._bypass import BypassDetector
    from ._caller_state import CallerState
    from ._calls import Call
    from ._pool import PooledThread
    from ._schedule_check import ScheduleCheck
    from ._mailbox import Event, Mailbox


__all__: list[str] = []


def _uninterruptible(step: Callable[[], object]) -> BaseException | None:
    """Run ``step`` to its end even if Ctrl-C comes; returns the Ctrl-C, for the
    caller to raise once it has done what must be done.

    ``step`` must be safe to run again from the start. ``SystemExit`` counts
    as a Ctrl-C: a SIGINT handler of the user's may raise it.
    """
    interrupt: BaseException | None = None
    while True:
        try:
            step()
        except (KeyboardInterrupt, SystemExit) as error:
            interrupt = interrupt or error
            continue
        return interrupt


def _retire(threads: list[PooledThread]) -> None:
    for thread in threads:
        thread.retire()


def _add_note(error: BaseException, note: str) -> None:
    # BaseException.add_note is new in Python 3.11; 3.10 keeps the notes unprinted.
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", ()), note]


class Coordinator:
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
        self._feeder = Feeder(items, detector, self._numbering, max_workers)
        self._report_hang_after = report_hang_after
        self._check = check
        self._detector = detector
        self._coalesce = coalesce
        self._held = HeldCalls()
        self._issuer = Issuer(detector)
        self._turn = Turn(
            workers_may_hold=check is None and _collective_hook.fn is None
        )
        self._workers = [
            Worker(fn, state, self._feeder, self._turn, self._issuer, coalesce)
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
                self._check.at_end(self._turn.issued)
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
            # likely the cause of any item's failure
            except CollectiveBypassError as error:
                self._add_item_errors(error)
                raise
        if self._errors:
            raise self._first_error()
        return [self._results[i] for i in range(in_slots)]

    def _shut_down(self, threads: list[PooledThread], clean: bool) -> None:
        """Release the workers; after a failure or an interrupt, end their threads.

        What must happen for the threads to end at all (stopping the items,
        retiring the threads) cannot be interrupted: a Ctrl-C during it is
        raised once the threads have ended. Waiting for them can be: a
        second Ctrl-C stops the wait, and the retired threads still exit as
        soon as their item does.
        """
        try:
            interrupt = _uninterruptible(self._stop)
            if clean and interrupt is None:
                for thread in threads:
                    thread.wait()
                pool.release(threads)
                return
        # Ctrl-C anywhere before the threads are back in the pool (between
        # two steps, say): the threads end, as after a failure. Left neither
        # idle nor retired, a pooled thread would wait for a job for good.
        except BaseException:
            _uninterruptible(lambda: _retire(threads))
            for thread in threads:
                thread.join()
            raise
        interrupt = _uninterruptible(lambda: _retire(threads)) or interrupt
        for thread in threads:
            thread.join()
        if interrupt is not None:
            raise interrupt

    def _stop(self) -> None:
        """Issue nothing more; cancel the items taken and not ended. Idempotent."""
        self._turn.stop(self._feeder.close())

    def _loop(self) -> int:
        """Run the schedule; returns how many items had a slot."""
        first: list[Mailbox] = []
        while len(first) < len(self._workers):
            box = self._box_for_slot(len(first))
            if box is None:
                break
            first.append(box)
        in_slots = len(first)
        self._turn.fill(first)
        self._pull_ahead(in_slots)
        while (taken := self._next_event()) is not None:
            box, event = taken
            if not isinstance(event, ItemEnded):
                self._schedule(box, event)
                self._turn.after_call(event)
                continue
            if event.error is None:
                self._results[box.index] = event.result
            else:
                self._errors[box.index] = event.error
            following = None if self._errors else self._box_for_slot(in_slots)
            if following is None and self._errors:
                # no new item starts; those in slots finish
                self._feeder.stop_at(in_slots)
            if following is not None:
                in_slots += 1
            self._turn.after_end(following)
            if following is not None:
                self._pull_ahead(in_slots)
        return in_slots

    def _pull_ahead(self, in_slots: int) -> None:
        """Keep up to ``max_workers`` items pulled beyond those with a slot.

        Called only where an item enters a slot, so the iterable is advanced
        at the same points on every rank.
        """
        while self._feeder.pulled < in_slots + len(self._workers):
            if self._feeder.pull() is None:
                return

    def _box_for_slot(self, index: int) -> Mailbox | None:
        box = self._feeder.box_for_slot(index)
        if (
            box is None
            and self._feeder.error is not None
            and self._feeder.error[0] == index
        ):
            # The iterable raised where this item would be: a failure at this index.
            self._errors[index] = self._feeder.error[1]
        return box

    def _next_event(self) -> tuple[Mailbox, Event] | None:
        """The event at the position; None once no slot holds an item."""
        while (visit := self._turn.take(self._held.boxes)) is not None:
            box, event = visit
            if event is Visit.FLUSH:  # its call goes out before a wait on it
                self._issue_held()
            elif event is not None:
                return box, event
            else:
                self._wait_for_turn(box)
        return None

    def _wait_for_turn(self, box: Mailbox) -> None:
        if self._report_hang_after is None:
            self._turn.wait(None)
            return
        # Workers may pass the turn among themselves for long: only a wait in
        # which nothing was issued is a hang.
        started, issued = time.monotonic(), self._turn.issued
        while not self._turn.wait(self._report_hang_after):
            if self._turn.issued != issued:
                started, issued = time.monotonic(), self._turn.issued
                continue
            awaited = self._turn.at_position() or box
            report_hang(self._workers, awaited, time.monotonic() - started, issued)

    def _schedule(self, box: Mailbox, call: Call) -> None:
        """Issue ``call``, or hold it back to be coalesced."""
        key = coalescing_key(call) if self._coalesce else None
        if self._held.must_go_before(key):
            self._issue_held()
        if self._check is not None:
            self._check.before_issue(self._turn.issued, call)
        if key is None:
            self._issuer.check(call)
            box.replies.put(self._issuer.issue(call, on_worker=False))
        else:
            self._held.add(box, call, key)

    def _issue_held(self) -> None:
        held = self._held.take()
        if len(held) == 1:
            box, call = held[0]
            self._issuer.check(call)
            box.replies.put(self._issuer.issue(call, on_worker=False))
            return
        replies = self._issuer.issue_coalesced([call for _, call in held])
        for (box, _), reply in zip(held, replies, strict=True):
            box.replies.put(reply)

    def _first_error(self) -> BaseException:
        first, *others = sorted(self._errors)
        error = self._errors[first]
        self._add_item_errors(error, others)
        return error

    def _add_item_errors(
        self, error: BaseException, indices: list[int] | None = None
    ) -> None:
        for index in sorted(self._errors) if indices is None else indices:
            other = self._errors[index]
            _add_note(
                error,
                f"parallel_map: item {index} also failed: {type(other).__name__}: {other}",
            )
