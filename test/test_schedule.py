# Owner(s): ["oncall: distributed"]
"""Single-process tests of parallel_map's schedule, with fake collectives.

Fast: no process group. The fakes call the collective hook like the real
entry points, and log what the schedule issues, so the issue order can be
compared with ``reference_schedule`` under random delays.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import random
import signal
import sys
import sysconfig
import threading
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import _pool, coordinated, parallel_map

from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fake_collectives import (
    IssueLog,
    issue_state,
    fake_collective,
    fake_collective_doing,
    fake_failing_collective,
    fake_object_collective,
    reference_schedule,
)
from signals import ctrl_c_raises, interrupting_items


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("parallel_map-worker")]


@pytest.fixture(autouse=True)
def no_leftovers():
    yield
    # Threads kept for the next call must be idle in the pool, nothing else.
    assert len(worker_threads()) == _pool.pool.idle_count(), "a busy worker outlived the call"
    assert _collective_hook.fn is None


def test_gil_state_matches_build():
    if sysconfig.get_config_var("Py_GIL_DISABLED"):
        assert not sys._is_gil_enabled(), "free-threaded build running with the GIL on"


def make_item(log: IssueLog, calls: list[int], delays: list[float], failing: frozenset[int]):
    def item(i: int) -> int:
        rng = random.Random(delays[i])
        for k in range(calls[i]):
            time.sleep(rng.random() * delays[i])
            kind = (i + k) % 3
            if kind == 0:
                fake_collective(log, (i, k))  # sync: issued async, waited in the worker
            elif kind == 1:
                work = fake_collective(log, (i, k), async_op=True)
                assert work is not None
                work.wait()
            else:
                assert fake_object_collective(log, (i, k)) == ("done", (i, k))
        if i in failing:
            raise RuntimeError(f"item {i} failed")
        return i * 10

    return item


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(st.integers(0, 4), max_size=10),
    max_workers=st.integers(1, 6),
    delays=st.data(),
)
def test_issue_order_is_the_reference_schedule(calls, max_workers, delays):
    delay = delays.draw(st.lists(st.sampled_from([0.0, 0.0005, 0.002]),
                                 min_size=len(calls), max_size=len(calls)))
    log = IssueLog(hold_s=0.0002)
    results = parallel_map(make_item(log, calls, delay, frozenset()), range(len(calls)),
                           max_workers=max_workers)
    assert results == [i * 10 for i in range(len(calls))]
    expected = reference_schedule(calls, max_workers).order
    assert [entry[1] for entry in log.entries] == expected
    assert log.issued_by_schedule()
    assert all(work.waited.is_set() for work in log.works)


@settings(max_examples=40, deadline=None)
@given(
    calls=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    max_workers=st.integers(2, 5),
    data=st.data(),
)
def test_failures_stop_new_items_and_raise_lowest_index(calls, max_workers, data):
    failing = frozenset(data.draw(st.sets(st.integers(0, len(calls) - 1), min_size=1)))
    delay = data.draw(st.lists(st.sampled_from([0.0, 0.001]),
                               min_size=len(calls), max_size=len(calls)))
    log = IssueLog()
    with pytest.raises(RuntimeError) as caught:
        parallel_map(make_item(log, calls, delay, failing), range(len(calls)),
                     max_workers=max_workers)
    reference = reference_schedule(calls, max_workers, failing)
    assert [entry[1] for entry in log.entries] == reference.order
    failed_in_slots = sorted(failing & reference.slotted)
    assert str(caught.value) == f"item {failed_in_slots[0]} failed"
    notes = getattr(caught.value, "__notes__", [])
    assert notes == [f"parallel_map: item {i} also failed: RuntimeError: item {i} failed"
                     for i in failed_in_slots[1:]]


def test_slots_do_not_wait_for_each_other():
    # Item 0 runs until item 3 has run: with waves, or with a slot that waits
    # for the coordinator's visit to take its next item, this would time out.
    item3_ran = threading.Event()

    def item(i: int) -> int:
        if i == 0:
            assert item3_ran.wait(timeout=10), "item 3 never ran while item 0 was running"
        if i == 3:
            item3_ran.set()
        return i

    assert parallel_map(item, range(4), max_workers=2) == [0, 1, 2, 3]


def test_sync_collective_is_issued_async_and_waited_by_the_worker():
    log = IssueLog()
    waited_in = []

    def item(i: int) -> None:
        fake_collective(log, i)
        waited_in.append(threading.current_thread().name)

    parallel_map(item, range(3), max_workers=3)
    assert len(log.works) == 3  # issued with async_op=True
    assert all(work.waited.is_set() for work in log.works)
    assert all(name.startswith("parallel_map-worker") for name in waited_in)


def test_worker_at_the_turn_issues_and_hands_the_turn_to_the_next_waiting_call():
    log = IssueLog()
    ran_on = {}

    def item(i: int) -> None:
        ran_on[i] = threading.current_thread()
        if i == 0:
            time.sleep(0.2)  # nothing at the turn's slot: its worker takes the turn
            fake_collective(log, i)
        elif i == 1:
            fake_collective(log, i)  # ahead of its turn: item 0's worker hands it the turn
        else:
            time.sleep(0.4)  # its turn is open too, but it has no async form
            fake_object_collective(log, i)

    parallel_map(item, range(3), max_workers=3)
    assert [entry[1] for entry in log.entries] == [0, 1, 2]
    assert log.threads == [ran_on[0], ran_on[1], threading.main_thread()]
    assert not log.overlapped


def test_the_turn_goes_to_the_waiting_calls_of_the_following_slots_in_order():
    # Items 1 to 3 post their calls before item 0 does: item 0's worker takes
    # the turn, and the turn goes from worker to worker, each issuing its own
    # call in the schedule's order, up to the object collective, which only
    # the coordinator runs.
    log = IssueLog(hold_s=0.001)
    ran_on = {}
    posted = threading.Barrier(3, timeout=10)

    def item(i: int) -> None:
        ran_on[i] = threading.current_thread()
        if i == 0:
            time.sleep(0.3)  # the others' calls are pending by now
            fake_collective(log, (i, 0))
            fake_object_collective(log, (i, 1))
        else:
            fake_collective(log, (i, 0))
            posted.wait()  # every item's second call also waits for its turn
            fake_collective(log, (i, 1))

    parallel_map(item, range(4), max_workers=4)
    expected = reference_schedule([2, 2, 2, 2], 4).order
    assert [entry[1] for entry in log.entries] == expected
    assert log.threads[:4] == [ran_on[i] for i, _ in expected[:4]]
    assert log.threads[4] is threading.main_thread()  # item 0's object collective
    assert log.issued_by_schedule()


def test_a_call_is_issued_on_its_own_thread_not_inside_another_items_call():
    # Item 0 holds a lock around its collective; item 1's call waits for its
    # turn, and its issue takes the same lock (as a mode or a tensor subclass
    # might). Had item 0's worker issued item 1's call from inside its own,
    # it would wait for itself forever.
    log = IssueLog()
    lock = threading.Lock()

    def take_lock() -> None:
        with lock:
            pass

    def item(i: int) -> int:
        if i == 0:
            time.sleep(0.2)  # item 1's call waits for its turn by now
            with lock:
                fake_collective(log, i)
        else:
            fake_collective_doing(log, i, take_lock)
        return i

    result: list[list[int]] = []
    runner = threading.Thread(
        target=lambda: result.append(parallel_map(item, range(2), max_workers=2)), daemon=True
    )
    runner.start()
    runner.join(10)
    assert not runner.is_alive(), "parallel_map deadlocked"
    assert result == [[0, 1]]
    assert [entry[1] for entry in log.entries] == [0, 1]


def test_no_hang_report_while_workers_pass_the_turn(caplog):
    # The coordinator sleeps while workers pass the turn among themselves:
    # that is progress, not a hang, however long it lasts.
    log = IssueLog()

    def item(i: int) -> None:
        for k in range(60):
            time.sleep(0.01)
            fake_collective(log, (i, k))

    with caplog.at_level(logging.WARNING, logger="torch.distributed.threading"):
        parallel_map(item, range(2), max_workers=2, report_hang_after=0.2)
    assert len(log.entries) == 120
    assert not [r for r in caplog.records if "has waited" in r.getMessage()]


def test_failing_collective_raises_in_the_worker():
    log = IssueLog()
    seen = []

    def item(i: int) -> int:
        try:
            fake_failing_collective(log, i)
        except ValueError as e:
            seen.append((i, str(e)))
        return i

    assert parallel_map(item, range(4), max_workers=2) == [0, 1, 2, 3]
    assert sorted(seen) == [(i, f"bad collective {i}") for i in range(4)]


def test_results_in_order_for_any_iterable():
    def gen():
        yield from range(7)

    assert parallel_map(lambda x: x * x, gen(), max_workers=3) == [x * x for x in range(7)]
    assert parallel_map(str, [], max_workers=3) == []
    assert parallel_map(str, [5], max_workers=3) == ["5"]
    assert parallel_map(str, iter([1, 2]), max_workers=3) == ["1", "2"]


def test_iterable_error_is_raised_in_order():
    def gen():
        yield 1
        yield 2
        raise KeyError("iterable broke")

    with pytest.raises(KeyError, match="iterable broke"):
        parallel_map(lambda x: x, gen(), max_workers=2)


def test_inline_runs_on_caller():
    log = IssueLog()
    caller = threading.current_thread()
    ran_on = []

    def item(i: int) -> int:
        ran_on.append(threading.current_thread())
        fake_collective(log, i)
        return i

    assert parallel_map(item, range(3), max_workers=1) == [0, 1, 2]
    assert ran_on == [caller] * 3
    assert log.works == []  # not intercepted: called directly, synchronously


def test_bad_input():
    with pytest.raises(TypeError, match="callable"):
        parallel_map(42, [1, 2])
    with pytest.raises(TypeError):
        parallel_map(str, 42)
    with pytest.raises(ValueError, match="at least 1"):
        parallel_map(str, [1, 2], max_workers=0)
    with pytest.raises(TypeError, match="max_workers must be an int"):
        parallel_map(str, [1, 2], max_workers=2.5)
    with pytest.raises(ValueError, match="intra_op_threads"):
        parallel_map(str, [1, 2], intra_op_threads=0)
    with pytest.raises(TypeError, match="callable"):
        coordinated(None)


def test_default_max_workers_runs():
    assert parallel_map(lambda x: x + 1, range(10)) == list(range(1, 11))


def test_nested_parallel_map_goes_through_the_outer_schedule():
    log = IssueLog()
    outer_threads = set()

    def inner(j: int) -> int:
        fake_collective(log, ("inner", j))
        return j

    def outer(i: int) -> list[int]:
        outer_threads.add(threading.current_thread())
        fake_collective(log, ("outer", i))
        return parallel_map(inner, range(3), max_workers=2)

    assert parallel_map(outer, range(3), max_workers=2) == [[0, 1, 2]] * 3
    assert len(log.entries) == 3 + 9
    # An inner schedule issues through the outer one: on this thread, or on an
    # outer worker at its turn; never on an inner worker.
    assert log.issued_by_schedule()
    assert set(log.threads) <= outer_threads | {threading.main_thread()}


def test_concurrent_top_level_calls_are_refused():
    inside = threading.Event()
    release = threading.Event()
    errors = []

    def slow(i: int) -> int:
        inside.set()
        release.wait(timeout=10)
        return i

    def other_thread():
        inside.wait(timeout=10)
        try:
            parallel_map(str, range(4), max_workers=2)
        except RuntimeError as e:
            errors.append(str(e))
        finally:
            release.set()

    t = threading.Thread(target=other_thread)
    t.start()
    assert parallel_map(slow, range(2), max_workers=2) == [0, 1]
    t.join()
    assert len(errors) == 1 and "already running on another thread" in errors[0]


def test_coordinated_runs_on_coordinator_in_schedule_order():
    log = IssueLog()
    calls = []

    @coordinated
    def record(i: int) -> int:
        """Doc."""
        calls.append((i, threading.current_thread()))
        return -i

    def item(i: int) -> int:
        fake_collective(log, i)
        return record(i)

    assert parallel_map(item, range(4), max_workers=2) == [0, -1, -2, -3]
    assert [i for i, _ in calls] == [0, 1, 2, 3]
    assert all(t is threading.main_thread() for _, t in calls)
    assert record.__name__ == "record" and record.__doc__ == "Doc."
    assert record.__wrapped__ is not None
    assert record(5) == -5  # outside parallel_map: a plain call


_var: contextvars.ContextVar[str] = contextvars.ContextVar("_var", default="unset")


def test_caller_state_is_propagated():
    def observe(_: int):
        _var.set("changed by item")  # must not leak into other items or the caller
        return (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
            torch.get_num_threads(),
        )

    torch.set_num_threads(4)
    token = _var.set("caller value")
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            seen = parallel_map(lambda i: (_var.get(), observe(i)), range(4), max_workers=2)
        assert set(seen) == {("caller value", (False, False, True, torch.bfloat16, 2))}
        with torch.inference_mode():
            seen = parallel_map(observe, range(2), max_workers=2, intra_op_threads=3)
        assert set(seen) == {(False, True, False, torch.bfloat16, 3)}
        seen = parallel_map(observe, range(2), max_workers=2)
        assert {s[:3] for s in seen} == {(True, False, False)}
        assert _var.get() == "caller value"
        assert torch.get_num_threads() == 4
    finally:
        _var.reset(token)


def test_hang_report_names_waits_and_stacks(caplog):
    log = IssueLog()
    release = threading.Event()

    def item(i: int) -> int:
        if i == 0:
            release.wait(timeout=10)  # the coordinator waits on this slot
            return i
        fake_collective(log, i)
        return i

    def release_later():
        time.sleep(0.6)
        release.set()

    threading.Thread(target=release_later).start()
    with caplog.at_level("WARNING", logger="torch.distributed.threading"):
        parallel_map(item, range(2), max_workers=2, report_hang_after=0.2)
    reports = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
    # Once per interval (about 3 in 0.6 s), not continuously; generous for a loaded machine.
    assert 1 <= len(reports) <= 10
    first = reports[0]
    assert "for the next event of item 0" in first
    assert "item 0: running fn" in first
    assert "item 1: waiting for its turn to issue fake_collective (item 1, call 0)" in first
    assert "release.wait(timeout=10)" in first  # the waiting worker's stack
    with pytest.raises(ValueError, match="report_hang_after"):
        parallel_map(str, [1, 2], report_hang_after=0)


def test_idle_workers_are_reused_then_exit(monkeypatch):
    names = lambda: {t.name for t in worker_threads()}  # noqa: E731
    parallel_map(str, range(3), max_workers=3)
    first = names()
    parallel_map(str, range(3), max_workers=3)
    assert names() == first  # the same threads served the second call
    monkeypatch.setattr(_pool, "IDLE_TIMEOUT_S", 0.05)
    parallel_map(str, range(3), max_workers=3)  # they now wait 0.05 s for work
    deadline = time.monotonic() + 5
    while worker_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert worker_threads() == []


def test_no_thread_or_hook_left_after_failure():
    def item(i: int) -> int:
        if i == 1:
            raise ValueError("boom")
        return i

    before = threading.active_count()
    with pytest.raises(ValueError, match="boom"):
        parallel_map(item, range(6), max_workers=3)
    assert threading.active_count() == before


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_ctrl_c_on_coordinator_releases_waiting_workers():
    log = IssueLog()
    cancelled: list[str] = []
    item = interrupting_items(log, cancelled)
    start = time.monotonic()
    with ctrl_c_raises(), pytest.raises(KeyboardInterrupt):
        parallel_map(item, range(3), max_workers=3)
    assert time.monotonic() - start < 5
    assert cancelled == ["CollectiveCancelledError", "CollectiveCancelledError"]
    assert log.entries == []


def test_iterable_runs_on_the_caller_in_its_state_at_fixed_points():
    # A loop advances its iterable on the calling thread, under the caller's
    # modes and context; a collective the iterable calls (a sampler that
    # broadcasts) must go out at the same point of the schedule every time.
    def one_run(seed: int) -> tuple[list[tuple[object, ...]], list[object]]:
        log = IssueLog()
        rng = random.Random(seed)
        delays = [rng.choice([0.0, 0.001, 0.003]) for _ in range(8)]
        seen = []

        def items():
            for i in range(8):
                seen.append((threading.current_thread(), torch.is_grad_enabled(), _var.get()))
                if i % 3 == 0:
                    fake_collective(log, ("iterable", i))
                yield i

        def item(i: int) -> int:
            time.sleep(delays[i])
            fake_collective(log, ("item", i))
            return i

        token = _var.set("caller value")
        try:
            with torch.no_grad():
                assert parallel_map(item, items(), max_workers=3) == list(range(8))
        finally:
            _var.reset(token)
        assert seen == [(threading.main_thread(), False, "caller value")] * 8
        assert log.issued_by_schedule()
        return [entry[1] for entry in log.entries], log.threads

    orders = [one_run(seed)[0] for seed in range(8)]
    assert all(order == orders[0] for order in orders), orders
    assert len(orders[0]) == 8 + 3


def test_no_item_starts_once_a_failure_is_seen():
    ran = []

    def item(i: int) -> int:
        ran.append(i)
        if i == 0:
            time.sleep(0.1)  # the other worker runs ahead meanwhile
            raise ValueError("item 0 failed")
        return i

    with pytest.raises(ValueError, match="item 0 failed"):
        parallel_map(item, range(1000), max_workers=2)
    # Items 0 and 1 have slots; at most max_workers more are pulled ahead.
    assert sorted(ran) == list(range(len(ran))) and len(ran) <= 4, ran


def test_item_runs_before_the_next_is_pulled():
    # Serial code raises item 0's error, not the iterable's at index 1.
    def items():
        yield 0
        raise KeyError("iterable broke at 1")

    def item(i: int) -> int:
        raise ValueError(f"item {i} failed")

    with pytest.raises(ValueError, match="item 0 failed") as caught:
        parallel_map(item, items(), max_workers=2)
    assert caught.value.__notes__ == [
        "parallel_map: item 1 also failed: KeyError: 'iterable broke at 1'"
    ]

    # A work queue that fn feeds: the next item exists only once fn has run.
    import queue

    work: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    work.put(0)

    def feed(i: int) -> int:
        work.put(i + 1 if i < 5 else None)
        return i * 10

    assert parallel_map(feed, iter(work.get, None), max_workers=3) == [0, 10, 20, 30, 40, 50]


def _drain_pool(monkeypatch) -> None:
    monkeypatch.setattr(_pool, "IDLE_TIMEOUT_S", 0.05)
    _wait_for_no_workers(timeout=5)


def _wait_for_no_workers(timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while worker_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    return not worker_threads()


def test_ctrl_c_while_threads_start_leaves_no_thread(monkeypatch):
    _drain_pool(monkeypatch)
    real_start = threading.Thread.start
    started = []

    def start(thread: threading.Thread) -> None:
        if thread.name.startswith("parallel_map-worker"):
            if len(started) == 2:
                raise KeyboardInterrupt
            started.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        parallel_map(str, range(8), max_workers=4)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    assert len(started) == 2
    assert _wait_for_no_workers(timeout=5), "threads started before the Ctrl-C leaked"
    assert parallel_map(str, range(3), max_workers=2) == ["0", "1", "2"]


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_second_ctrl_c_during_cleanup_leaves_no_thread(monkeypatch):
    _drain_pool(monkeypatch)
    log = IssueLog()
    main = threading.main_thread().ident

    def item(i: int) -> int:
        if i == 0:
            time.sleep(0.2)  # keep the coordinator waiting on slot 0
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.3)  # the cleanup waits for this item
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.3)
            return i
        fake_collective(log, i)  # cancelled
        return i

    with ctrl_c_raises(), pytest.raises(KeyboardInterrupt):
        parallel_map(item, range(3), max_workers=3)
    assert _wait_for_no_workers(timeout=5), "a second Ctrl-C leaked the worker threads"
    assert parallel_map(str, range(3), max_workers=2) == ["0", "1", "2"]


def test_ctrl_c_right_after_claiming_the_top_level_releases_it(monkeypatch):
    from torch.distributed.threading import _parallel_map

    real_claim = _parallel_map._claim_top_level

    def claim_then_interrupt() -> None:
        real_claim()
        raise KeyboardInterrupt

    monkeypatch.setattr(_parallel_map, "_claim_top_level", claim_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        parallel_map(str, range(4), max_workers=2)
    monkeypatch.setattr(_parallel_map, "_claim_top_level", real_claim)
    results = []
    t = threading.Thread(target=lambda: results.append(parallel_map(str, range(2), max_workers=2)))
    t.start()
    t.join()
    assert results == [["0", "1"]]


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_collectives_are_issued_under_the_items_modes():
    # Whoever issues (the coordinator, or a worker at its turn) issues under
    # the calling item's grad mode, inference mode and mode stacks, as the
    # item itself would have: the caller's, as changed by the item.
    log = IssueLog()
    function_mode, dispatch_mode = _PassThroughFunctionMode(), _PassThroughDispatchMode()

    def item(i: int) -> tuple[object, ...]:
        time.sleep(0.05 if i % 2 else 0)  # some issue at their turn, some are handed over
        fake_collective(log, (i, 0))
        with torch.no_grad():
            fake_object_collective(log, (i, 1))  # always handed over
            fake_collective(log, (i, 2))
        return issue_state()

    with function_mode, dispatch_mode:
        in_items = parallel_map(item, range(6), max_workers=3)
    caller = (True, False, (function_mode,), (dispatch_mode,))
    assert in_items == [caller] * 6
    by_tag = dict(zip([entry[1] for entry in log.entries], log.states, strict=True))
    for i in range(6):
        assert by_tag[(i, 0)] == caller, i
        assert by_tag[(i, 1)] == by_tag[(i, 2)] == (False, *caller[1:]), i
    assert issue_state() == (True, False, (), ())  # the caller's stacks are restored


@pytest.fixture
def world_of_one():
    """A real gloo process group of one rank, in this process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_items_have_the_op_hook_and_the_caller_not_when_a_call_raises():
    # Workers set the functional ops' hook with the collective hook; the
    # caller, which issues, never has it, however the call ends.
    from torch._ops import _collective_op_hook
    from torch.distributed.threading import _op_hook

    def item(i: int) -> int:
        assert _collective_op_hook.fn is _op_hook.functional_op_hook
        if i == 2:
            raise ValueError("item 2 failed")
        return i

    with pytest.raises(ValueError, match="item 2 failed"):
        parallel_map(item, range(4), max_workers=2)
    assert _collective_op_hook.fn is None


def test_no_worker_refuses_direct_calls_once_a_failed_call_returned():
    # Workers clear their flag as they leave for the pool, however the call
    # ended: here, the overlay's shim counts the threads that refuse.
    from torch import _direct_collective_refusal_shim as shim

    def item(i: int) -> int:
        if i == 2:
            raise ValueError("item 2 failed")
        return i

    with pytest.raises(ValueError, match="item 2 failed"):
        parallel_map(item, range(6), max_workers=3)
    deadline = time.monotonic() + 30
    while shim._refusing and time.monotonic() < deadline:
        time.sleep(0.01)
    assert shim._refusing == 0


def test_the_iterables_window_forgives_only_what_the_iterable_issues(world_of_one):
    # The iterable runs on the coordinating thread at fixed points of the
    # schedule, so what it issues is the schedule's; a collective that reached
    # the group before its window opened is still a bypass.
    import torch.distributed as dist
    from torch.distributed.threading import CollectiveBypassError
    from torch.distributed.threading._bypass import BypassDetector
    from torch.distributed.threading._calls import ASYNC_THEN_WAIT, Call

    call = Call(dist.all_reduce, {}, ASYNC_THEN_WAIT, 0, 0, None)
    t = torch.ones(1)
    for bypass_first in (False, True):
        detector = BypassDetector()
        if bypass_first:
            dist.all_reduce(t)  # outside any window
        detector.before_iterable()
        dist.all_reduce(t)  # the iterable's own
        detector.after_iterable()
        if bypass_first:
            with pytest.raises(CollectiveBypassError, match="before all_reduce"):
                detector.before_issue(call)
        else:
            detector.before_issue(call)


def test_send_to_self_keeps_sends_own_error(world_of_one):
    import torch.distributed as dist

    def send_to_self(_: int) -> str:
        with pytest.raises(ValueError) as caught:
            dist.send(torch.ones(2), dst=0)
        return str(caught.value)

    serial = send_to_self(0)
    assert "Invalid destination rank" in serial
    assert parallel_map(send_to_self, range(4), max_workers=2) == [serial] * 4


def test_recv_returns_the_senders_global_rank(world_of_one, monkeypatch):
    # recv is issued as irecv; its finish must turn what irecv's Work knows
    # into recv's return value. A fake irecv and a fake group-to-global map
    # (group rank + 10) let one process check every case.
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    class FakeRecvWork:
        def wait(self) -> bool:
            return True

        def _source_rank(self) -> int:
            return 3

    def fake_irecv(tensor, src=None, group=None, tag=0, group_src=None):
        return None if tag == 99 else FakeRecvWork()  # None: not in the group

    monkeypatch.setattr(c10d, "irecv", fake_irecv)
    monkeypatch.setattr(c10d, "get_global_rank", lambda group, rank: rank + 10)
    calls = [{"src": 5}, {"group_src": 2}, {}, {"tag": 99}]

    def item(i: int) -> int:
        return dist.recv(torch.zeros(1), **calls[i])

    assert parallel_map(item, range(4), max_workers=2) == [5, 12, 13, -1]


def test_hang_report_explains_items_that_wait_for_each_other(caplog):
    # Item 1 waits for an event that item 0 sets only after its second
    # collective, which the schedule issues only after item 1's next event:
    # a deadlock that serial code would not have (the wait times out here).
    log = IssueLog()
    after_second = threading.Event()

    def item(i: int) -> bool:
        if i == 0:
            fake_collective(log, (0, 0))
            fake_collective(log, (0, 1))
            after_second.set()
            return True
        return after_second.wait(timeout=1.0)

    with caplog.at_level("WARNING", logger="torch.distributed.threading"):
        assert parallel_map(item, range(2), max_workers=2, report_hang_after=0.3) == [True, False]
    reports = [r.getMessage() for r in caplog.records if "has waited" in r.getMessage()]
    assert reports
    assert "item 1: running fn" in reports[0]
    assert "item 0: waiting for its turn to issue fake_collective (item 0, call 1)" in reports[0]
    assert (
        "Item 1 is running fn; the schedule issues the waiting calls of items 0 only after "
        "item 1's next collective or its end." in reports[0]
    )
    assert "items must not wait for each other" in reports[0]


def test_an_issue_error_is_logged_once_by_c10d(world_of_one, monkeypatch):
    # The issue runs the entry point without c10d's exception-logging
    # wrapper: the worker's own call, inside that wrapper, logs the error.
    import torch.distributed as dist
    from torch.distributed import c10d_logger

    logged = []
    monkeypatch.setattr(c10d_logger._c10d_logger, "debug", logged.append)

    def item(_: int) -> str:
        with pytest.raises(ValueError, match="complex") as caught:
            dist.all_reduce(torch.zeros(1, dtype=torch.cfloat), op=dist.ReduceOp.MAX)
        return str(caught.value)

    serial = item(0)
    assert len(logged) == 1
    logged.clear()
    assert parallel_map(item, range(4), max_workers=2) == [serial] * 4
    assert len(logged) == 4


def test_a_deprecated_collective_warns_once_per_call(world_of_one):
    # The issue runs the entry point without its decorators: the worker's own
    # call has warned already.
    import warnings

    import torch.distributed as dist

    def item(_: int) -> None:
        dist.all_reduce_coalesced([torch.ones(1)])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        item(0)
        serial = len(caught)
        parallel_map(item, range(4), max_workers=2)
    assert serial == 1
    assert len(caught) == 5, [str(w.message) for w in caught]


def test_a_stop_while_a_served_worker_runs_on_still_reaches_it():
    # Worker 0 holds the turn and issues item 1's waiting call for it. As soon
    # as item 1 has its reply it posts its next call, and the coordinator
    # stops the schedule (Ctrl-C, say). Item 1's next call must get CANCEL: had
    # the holder still counted item 1 as owed a reply when the stop came,
    # the stop would skip it and item 1 would wait forever.
    from torch.distributed.threading._calls import ASYNC_THEN_WAIT, Call
    from torch.distributed.threading._issue import Issuer
    from torch.distributed.threading._order import Route
    from torch.distributed.threading._mailbox import Mailbox, Reply, Signal
    from torch.distributed.threading._turn import Holder, Posted, Turn
    from torch.distributed.threading._worker import Worker

    turn = Turn(workers_may_hold=True)
    holder_box, served_box = Mailbox(0, 0, None), Mailbox(1, 1, None)
    turn.fill([holder_box, served_box])

    def call(box: Any, seq: int) -> Call:
        return Call(lambda **_: None, {}, ASYNC_THEN_WAIT, box.index, seq, None, state=object())

    # Item 0 posts at an open turn and holds it; item 1 waits with a call any holder may issue.
    assert turn.take([]) == (holder_box, None)  # the turn opens
    assert turn.post(holder_box, call(holder_box, 0), Route.ANY_HOLDER) is Posted.HOLD_TURN
    assert turn.post(served_box, call(served_box, 0), Route.ANY_HOLDER) is Posted.QUEUED

    def served_worker_runs_on() -> None:  # item 1's worker, then the coordinator
        assert isinstance(served_box.replies.get(), Reply)
        turn.post(served_box, call(served_box, 1), Route.ANY_HOLDER)
        turn.stop([holder_box, served_box])

    class Replies(queue.SimpleQueue):
        def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
            super().put(item, *args, **kwargs)
            if isinstance(item, Reply):  # the holder replies
                runner = threading.Thread(target=served_worker_runs_on, daemon=True)
                runner.start()
                runner.join(0.5)  # it runs now, or once the holder lets it

    served_box.replies = Replies()
    worker = Worker(lambda x: x, None, None, turn, Issuer(None), coalesce=False)
    worker._serve_then_pass(call(holder_box, 0))
    assert served_box.replies.get(timeout=5) is Signal.CANCEL
    assert turn._holder is Holder.OPEN


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
