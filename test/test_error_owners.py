# Owner(s): ["oncall: distributed"]
"""Every error has one owner: the item whose call or code raised it.

In one process, with fake collectives and a fake bypass detector. Each test
runs ``parallel_map`` on a helper thread with a deadline, so that a bug
that would hang the call fails the test instead.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest
from torch.distributed.threading import _caller_state, _parallel_map, CollectiveBypassError
from torch.distributed.threading import parallel_map

from fake_collectives import fake_torch_only_collective, IssueLog


def run_with_deadline(call: Any, deadline: float = 30.0) -> BaseException | Any:
    """``call()`` on a helper thread; its result or exception. Fails if it hangs."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # returned to the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    assert not thread.is_alive(), f"parallel_map hung for {deadline} s"
    return outcome[0]


class FakeDetector:
    """The bypass detector's interface; ``after_issue`` raises for ``fail_after``'s
    item, and from the ``refuse_from``-th issue on it sees a change."""

    def __init__(self, fail_after: int | None = None, refuse_from: int | None = None) -> None:
        self.fail_after, self.refuse_from, self.issues = fail_after, refuse_from, 0

    def clear_to_issue(self) -> bool:
        return self.refuse_from is None or self.issues < self.refuse_from

    def before_issue(self, call: Any) -> None:
        if not self.clear_to_issue():
            raise CollectiveBypassError("fake: a counter moved")

    def after_issue(self, call: Any) -> None:
        self.issues += 1
        if call.item == self.fail_after:
            raise RuntimeError(f"detector failed after item {call.item}'s issue")

    def before_iterable(self) -> None:
        pass

    def after_iterable(self) -> None:
        pass

    def at_end(self) -> None:
        pass


def served_pair(log: IssueLog, outcomes: dict[int, Any]) -> Any:
    """Items 0 and 1: item 1 posts at once, item 0 later, so that item 0's
    worker takes the turn and serves item 1's waiting call."""

    def item(i: int) -> int:
        if i == 0:
            time.sleep(0.3)
        try:
            fake_torch_only_collective(log, i, async_op=True).wait()
        except Exception as error:
            outcomes[i] = error
            raise
        outcomes[i] = threading.current_thread()
        return i

    return item


def test_a_detector_error_after_a_served_issue_is_the_served_items(monkeypatch):
    monkeypatch.setattr(_parallel_map, "make_detector", lambda exclude: FakeDetector(fail_after=1))
    log, outcomes = IssueLog(), {}
    error = run_with_deadline(lambda: parallel_map(served_pair(log, outcomes), range(2),
                                                   max_workers=2))
    assert isinstance(error, RuntimeError) and "after item 1's issue" in str(error)
    assert outcomes[1] is error, "the error was not raised in item 1, whose call it was"
    assert [entry[1] for entry in log.entries] == [0, 1]
    assert log.threads[1] is outcomes[0], "item 0's worker did not serve item 1's call"


def test_a_bypass_seen_while_serving_goes_to_the_coordinator(monkeypatch):
    # The holder may not issue item 1's call once the detector sees a change:
    # it hands the call and the turn back to the coordinator, which raises.
    monkeypatch.setattr(_parallel_map, "make_detector", lambda exclude: FakeDetector(refuse_from=1))
    log, outcomes = IssueLog(), {}
    error = run_with_deadline(lambda: parallel_map(served_pair(log, outcomes), range(2),
                                                   max_workers=2))
    assert isinstance(error, CollectiveBypassError), error
    assert [entry[1] for entry in log.entries] == [0]


def test_a_worker_that_cannot_start_fails_its_items(monkeypatch):
    # Every worker's setup fails: before, the pool logged and swallowed the
    # error, and the call waited for items that no thread would run.
    def cannot_start(self: Any) -> None:
        raise RuntimeError("no intra-op threads for you")

    monkeypatch.setattr(_caller_state.CallerState, "enter_worker_thread", cannot_start)
    error = run_with_deadline(lambda: parallel_map(lambda i: i, range(5), max_workers=3))
    assert isinstance(error, RuntimeError) and "no intra-op threads" in str(error)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
