# Owner(s): ["oncall: distributed"]
"""The schedule's turn, driven without threads.

(``SlotCycle``'s order is checked by the series' own SlotOrderTest.) The
turn (``_turn.Turn``) is driven by a hypothesis state machine that plays the
coordinator, every item's worker and the holder of the turn one step at a
time, in any interleaving, with stops and hand-backs (the bypass detector
refusing an issue), and checks after every step:

* one holder; while the turn is open the item at the position has nothing
  pending (``Turn.check_invariants``);
* each posted call is settled exactly once (issued by its own worker, or one
  ``Reply`` or ``CANCEL``), and a worker that waits for nothing has no
  message but a stale ``CANCEL``;
* a reply owed by the holder is sent under the turn's lock;
* nothing is taken for issue once the turn has stopped;
* at the end, whatever runs can always go on (no one waits forever), and
  without a stop the issue order is ``reference_schedule``'s, whichever
  thread issued each call.
"""

from __future__ import annotations

import enum
import queue
import sys
from typing import Any

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule, RuleBasedStateMachine

from torch.distributed.threading._calls import ASYNC_THEN_WAIT, Call
from torch.distributed.threading._order import route, Route
from torch.distributed.threading._mailbox import BoxState, ItemEnded, Mailbox, Reply, Signal
from torch.distributed.threading._turn import Holder, Passed, Posted, Serve, Turn

from fake_collectives import reference_schedule


def test_route() -> None:
    assert route(only_enqueues=False, coalesced=False, runs_torch_only=True) is Route.COORDINATOR
    assert route(only_enqueues=True, coalesced=True, runs_torch_only=True) is Route.COORDINATOR
    assert route(only_enqueues=True, coalesced=False, runs_torch_only=True) is Route.ANY_HOLDER
    assert route(only_enqueues=True, coalesced=False, runs_torch_only=False) is Route.OWN_WORKER
    # Routed before it is known (its worker issues it if it takes the turn at once).
    assert route(only_enqueues=True, coalesced=False) is Route.OWN_WORKER


def _posted_call(turn: Turn, box: Mailbox, seq: int, route_: Route) -> tuple[Call, Posted]:
    call = _call(box, seq)
    call.state = object()  # type: ignore[assignment]  # as if captured
    return call, turn.post(box, call, route_)


def test_a_call_taken_to_serve_and_handed_back_after_the_stop_is_cancelled() -> None:
    # The holder took item 1's call to serve it (OWED: the stop sends it
    # nothing), then may not issue it: item 1 must get CANCEL, or wait forever.
    turn = Turn(workers_may_hold=True)
    first, second = Mailbox(0, 0, None), Mailbox(1, 1, None)
    turn.fill([first, second])
    assert turn.take([]) == (first, None)  # the turn opens
    served, posted = _posted_call(turn, second, 0, Route.ANY_HOLDER)
    assert posted is Posted.QUEUED
    own, posted = _posted_call(turn, first, 0, Route.ANY_HOLDER)
    assert posted is Posted.HOLD_TURN
    assert turn.advance(own, may_serve=True) == Serve(second, served)
    turn.stop([first, second])
    assert second.replies.empty() and second.state is BoxState.OWED
    turn.hand_back(second, served)
    assert second.replies.get_nowait() is Signal.CANCEL
    assert second.replies.empty()


def test_a_call_without_its_state_never_waits() -> None:
    # A worker posts its call first without its state, routed before it knows
    # whether any holder may issue it; such a call may only take the turn. One
    # that would wait is refused (NEEDS_STATE) and nothing of it is queued, so
    # it is queued only once posted again with its state and its full route.
    turn = Turn(workers_may_hold=True)
    first, second = Mailbox(0, 0, None), Mailbox(1, 1, None)
    turn.fill([first, second])
    unrouted = route(only_enqueues=True, coalesced=False)
    waiting = _call(second, 0)  # not at the position, coordinator holding: it would wait
    assert turn.post(second, waiting, unrouted) is Posted.NEEDS_STATE
    assert second.pending is None and second.state is BoxState.RUNNING
    assert turn.take([]) == (first, None)  # the turn opens at item 0
    own = _call(first, 0)  # at the open position: its worker takes the turn, no state needed
    assert turn.post(first, own, unrouted) is Posted.HOLD_TURN
    assert own.state is None
    turn.check_invariants()


class W(enum.Enum):
    READY = enum.auto()  # runs fn; posts its next event when it likes
    WAITING = enum.auto()  # posted a call, waits for a message
    TAKING = enum.auto()  # holds the turn for its own call, not issued yet
    HOLDING = enum.auto()  # holds the turn after issuing
    DONE = enum.auto()
    CANCELLED = enum.auto()


class RecordingQueue(queue.SimpleQueue):  # type: ignore[type-arg]
    """A worker's replies; a Reply must be put under the turn's lock."""

    def __init__(self, turn: Turn, machine: TurnMachine) -> None:
        super().__init__()
        self._turn, self._machine = turn, machine

    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(item, Reply) and self._machine.holder_replying:
            assert self._turn._lock.locked(), "the holder's Reply was put outside the turn's lock"
        super().put(item, *args, **kwargs)


def _call(box: Mailbox, seq: int) -> Call:
    return Call(lambda **_: None, {}, ASYNC_THEN_WAIT, box.index, seq, None)


class TurnMachine(RuleBasedStateMachine):
    @initialize(
        workers=st.integers(1, 3),
        routes=st.lists(
            st.lists(st.sampled_from(list(Route)), max_size=3), min_size=1, max_size=5
        ),
    )
    def start(self, workers: int, routes: list[list[Route]]) -> None:
        self.routes = routes
        self.workers = workers
        self.turn = Turn(workers_may_hold=True)
        self.holder_replying = False
        self.boxes = [Mailbox(i, i, None) for i in range(len(routes))]
        for box in self.boxes:
            box.replies = RecordingQueue(self.turn, self)
        self.state = [W.READY] * len(routes)
        self.next_call = [0] * len(routes)
        self.waiting_on: list[Call | None] = [None] * len(routes)
        self.taking: dict[int, Call] = {}  # worker -> its own call, to issue
        self.holding: dict[int, Call] = {}  # worker -> the call it issued last
        self.serving: dict[int, Serve] = {}  # worker -> the call it took to serve
        self.settled: dict[tuple[int, int], int] = {}
        self.order: list[tuple[int, int]] = []
        self.stopped = False
        self.coordinator = "run"  # run, sleep, done
        in_slots = min(workers, len(routes))
        self.turn.fill(self.boxes[:in_slots])
        self.following = in_slots

    # -- bookkeeping ---------------------------------------------------------

    def taken_for_issue(self, call: Call, issued_now: bool = True) -> None:
        assert not self.stopped, f"{call} taken for issue after the stop"
        if issued_now:
            self.order.append((call.item, call.seq))

    def settle(self, call: Call) -> None:
        key = (call.item, call.seq)
        self.settled[key] = self.settled.get(key, 0) + 1
        assert self.settled[key] == 1, f"{call} settled twice"

    def actions(self) -> list[tuple[str, int]]:
        found: list[tuple[str, int]] = []
        if self.coordinator == "run" and not self.stopped:
            found.append(("coordinator", -1))
        if self.coordinator == "sleep" and not self.stopped and not self.turn._wake.empty():
            found.append(("wake", -1))
        for i, state in enumerate(self.state):
            if state is W.READY:
                found.append(("post", i))
            elif state is W.WAITING and not self.boxes[i].replies.empty():
                found.append(("deliver", i))
            elif state is W.TAKING:
                found.append(("take", i))
            elif state is W.HOLDING:
                found.append(("hold", i))
        return found

    # -- the actors ----------------------------------------------------------

    def coordinator_step(self) -> None:
        visit = self.turn.take([])
        if visit is None:
            self.coordinator = "done"
            return
        box, event = visit
        if event is None:
            self.coordinator = "sleep"
            return
        if isinstance(event, ItemEnded):
            following = self.boxes[self.following] if self.following < len(self.boxes) else None
            self.following += 1
            self.turn.after_end(following)
            return
        self.taken_for_issue(event)
        box.replies.put(Reply("by the coordinator"))
        self.turn.after_call(event)

    def post(self, i: int, detector_clear: bool) -> None:
        box = self.boxes[i]
        if self.next_call[i] == len(self.routes[i]):
            self.turn.post(box, ItemEnded(i), Route.COORDINATOR)
            self.state[i] = W.DONE
            return
        call = _call(box, self.next_call[i])
        call_route = self.routes[i][self.next_call[i]]
        self.next_call[i] += 1
        posted = self.turn.post(box, call, call_route)
        if posted is Posted.NEEDS_STATE:
            assert call_route is Route.COORDINATOR or self.turn._holder is not Holder.OPEN or (
                self.turn.at_position() is not box
            )
            call.state = object()  # type: ignore[assignment]
            posted = self.turn.post(box, call, call_route)
            assert posted is not Posted.NEEDS_STATE
        if posted is Posted.CANCELLED:
            self.settle(call)
            self.state[i] = W.CANCELLED
        elif posted is Posted.QUEUED:
            self.waiting_on[i], self.state[i] = call, W.WAITING
        else:
            assert posted is Posted.HOLD_TURN
            self.own_turn(i, call)

    def own_turn(self, i: int, call: Call) -> None:
        self.taken_for_issue(call, issued_now=False)  # on its next step
        self.taking[i], self.state[i] = call, W.TAKING

    def take(self, i: int, detector_clear: bool) -> None:
        call = self.taking.pop(i)
        if not detector_clear:  # the coordinator gets the call, and raises
            call.state = call.state or object()  # type: ignore[assignment]
            self.turn.hand_back(self.boxes[i], call)
            self.waiting_on[i], self.state[i] = call, W.WAITING
            return
        self.order.append((call.item, call.seq))
        self.settle(call)
        self.holding[i], self.state[i] = call, W.HOLDING

    def deliver(self, i: int) -> None:
        box, call = self.boxes[i], self.waiting_on[i]
        assert call is not None
        message = box.replies.get()
        if message is Signal.YOUR_TURN:
            if self.turn.take_handed(box):
                self.own_turn(i, call)
            else:
                self.settle(call)
                self.state[i] = W.CANCELLED
            return
        self.settle(call)
        self.waiting_on[i] = None
        self.state[i] = W.CANCELLED if message is Signal.CANCEL else W.READY

    def hold(self, i: int, serve: bool, detector_clear: bool) -> None:
        if (taken := self.serving.pop(i, None)) is not None:
            if not detector_clear:
                self.turn.hand_back(taken.box, taken.call)
                self.end_holding(i)
                return
            self.order.append((taken.call.item, taken.call.seq))  # issued now
            self.holder_replying = True
            try:
                self.turn.reply(taken.box, Reply("served"))
            finally:
                self.holder_replying = False
            self.holding[i] = taken.call
            return
        outcome = self.turn.advance(self.holding[i], may_serve=serve)
        if isinstance(outcome, Serve):
            self.taken_for_issue(outcome.call, issued_now=False)  # on its next step
            self.serving[i] = outcome
            return
        assert isinstance(outcome, Passed)
        self.end_holding(i)

    def end_holding(self, i: int) -> None:
        del self.holding[i]
        self.state[i] = W.READY

    @rule(pick=st.integers(0, 2**16), serve=st.booleans(), clear=st.integers(0, 3))
    def act(self, pick: int, serve: bool, clear: int) -> None:
        found = self.actions()
        if not found:
            return
        self.do(found[pick % len(found)], serve, detector_clear=clear != 0)

    def do(self, action: tuple[str, int], serve: bool, detector_clear: bool) -> None:
        what, i = action
        if what == "coordinator":
            self.coordinator_step()
        elif what == "wake":
            assert self.turn.wait(0)
            self.coordinator = "run"
        elif what == "post":
            self.post(i, detector_clear)
        elif what == "deliver":
            self.deliver(i)
        elif what == "take":
            self.take(i, detector_clear)
        else:
            self.hold(i, serve, detector_clear)

    @precondition(lambda self: not self.stopped)
    @rule(weight=st.integers(0, 3))
    def stop(self, weight: int) -> None:
        if weight == 0:  # now and then, so that many runs go to their end
            self.stopped = True
            self.turn.stop(self.boxes)

    @invariant()
    def turn_is_consistent(self) -> None:
        self.turn.check_invariants()
        for i, box in enumerate(self.boxes):
            # OWED only while the holder owes the waiting worker its message.
            owed = self.state[i] is W.WAITING and (
                any(s.box is box for s in self.serving.values())
                or (not box.replies.empty() and self._peek(i) is Signal.YOUR_TURN)
            )
            assert (box.state is BoxState.OWED) == owed, (box, self.state[i])
        for i, state in enumerate(self.state):
            if state is not W.WAITING:
                left = []
                while not self.boxes[i].replies.empty():
                    left.append(self.boxes[i].replies.get())
                assert all(m is Signal.CANCEL for m in left) and len(left) <= 1, (i, state, left)
                for m in left:
                    self.boxes[i].replies.put(m)

    def _peek(self, i: int) -> Any:
        replies = self.boxes[i].replies
        left = []
        while not replies.empty():
            left.append(replies.get())
        for message in left:
            replies.put(message)
        return left[0] if left else None

    def teardown(self) -> None:
        if not hasattr(self, "turn"):
            return
        # Whatever runs can always go on: drain, deterministically.
        for _ in range(10_000):
            found = self.actions()
            if not found:
                break
            self.do(found[0], serve=True, detector_clear=True)
        waiting = [i for i, s in enumerate(self.state) if s not in (W.DONE, W.CANCELLED)]
        assert not waiting, f"items {waiting} can never go on: {self.state}, holder {self.turn._holder}"
        if not self.stopped:
            assert self.coordinator == "done"
            calls = [len(r) for r in self.routes]
            assert self.order == reference_schedule(calls, self.workers).order


TestTurn = TurnMachine.TestCase
TestTurn.settings = settings(max_examples=500, stateful_step_count=50, deadline=None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
