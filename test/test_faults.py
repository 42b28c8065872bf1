"""Fault injection: parallel_map never turns a failure into a hang or a leak.

Each scenario runs on real gloo ranks in fresh processes (see ``ranks.py``)
and prints its time-to-error, measured inside the ranks.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
import tracemalloc

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import parallel_map

from fake_collectives import IssueLog, fake_collective
from ranks import run_ranks
from signals import ctrl_c_raises

PG_TIMEOUT_S = 3.0


def _report(name: str, outcomes) -> None:
    for rank, o in enumerate(outcomes):
        print(f"[{name}] rank {rank}: {o.status} after {o.seconds:.2f} s: {o.value}")


def _all_reduce_item(i: int) -> float:
    t = torch.full((2,), float(i))
    dist.all_reduce(t)
    return t[0].item()


# -- scenarios, run inside the ranks ------------------------------------------


def symmetric_failure(rank, world, failing, max_workers):
    def item(i):
        value = _all_reduce_item(i)
        if i == failing:
            raise ValueError(f"item {i} failed")
        return value + _all_reduce_item(i)

    try:
        parallel_map(item, range(8), max_workers=max_workers)
    except ValueError as e:
        error = str(e)
    # A collective after the failed call must still pair up across ranks.
    t = torch.full((1,), float(rank))
    dist.all_reduce(t)
    return error, t.item()


def asymmetric_failure(rank, world):
    def item(i):
        if i == 2 and rank == 0:
            raise ValueError("only rank 0 fails")
        return _all_reduce_item(i)

    try:
        parallel_map(item, range(6), max_workers=2)
    finally:
        if rank == 0:
            # Stay alive, as a process handling its error would: rank 1 must then
            # rely on the process group's timeout, not on a closed connection.
            time.sleep(3 * PG_TIMEOUT_S)


def sleeps_past_timeout(rank, world):
    def item(i):
        if i == 1 and rank == 1:
            time.sleep(3 * PG_TIMEOUT_S)
        return _all_reduce_item(i)

    parallel_map(item, range(4), max_workers=2)


def peer_killed(rank, world):
    def item(i):
        if i == 3 and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return _all_reduce_item(i)

    parallel_map(item, range(8), max_workers=3)


def ctrl_c(rank, world):
    main = threading.main_thread().ident
    cancelled = []

    def item(i):
        if i == 0:
            time.sleep(0.3)  # the coordinator waits on this slot
            signal.pthread_kill(main, signal.SIGINT)
            time.sleep(0.3)
            return 0.0
        try:
            return _all_reduce_item(i)  # waits for slot 0's turn, which never comes
        except RuntimeError as e:
            cancelled.append(type(e).__name__)
            raise

    start = time.monotonic()
    try:
        with ctrl_c_raises():
            parallel_map(item, range(4), max_workers=4)
    except KeyboardInterrupt:
        interrupted_after = time.monotonic() - start
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("parallel_map")]
    return interrupted_after, sorted(cancelled), leftover


# -- tests ---------------------------------------------------------------------


@pytest.mark.parametrize(("failing", "max_workers"), [(0, 2), (3, 3), (7, 2), (2, 8)])
def test_symmetric_failure(failing, max_workers):
    outcomes = run_ranks(symmetric_failure, 2, failing, max_workers, pg_timeout_s=30)
    _report(f"symmetric k={failing} W={max_workers}", outcomes)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert [o.value for o in outcomes] == [(f"item {failing} failed", 1.0)] * 2
    assert all(o.threads_after == 1 for o in outcomes)


def test_asymmetric_failure_times_out_instead_of_hanging():
    outcomes = run_ranks(asymmetric_failure, 2, pg_timeout_s=PG_TIMEOUT_S, deadline_s=60)
    _report("asymmetric", outcomes)
    assert outcomes[0].status == "error" and "only rank 0 fails" in outcomes[0].value
    assert outcomes[1].status == "error", outcomes[1]
    assert "timed out" in outcomes[1].value.lower()
    # Within the process group's timeout (plus slack for this noisy machine).
    assert outcomes[1].seconds < PG_TIMEOUT_S + 10
    assert all(o.threads_after == 1 for o in outcomes)


def test_collective_timeout_surfaces_in_worker_and_call():
    outcomes = run_ranks(sleeps_past_timeout, 2, pg_timeout_s=PG_TIMEOUT_S, deadline_s=60)
    _report("timeout", outcomes)
    assert outcomes[0].status == "error"
    assert "timed out" in outcomes[0].value.lower() or "timeout" in outcomes[0].value.lower()
    assert outcomes[0].seconds < PG_TIMEOUT_S + 10
    assert outcomes[0].threads_after == 1


def test_peer_killed_mid_schedule():
    outcomes = run_ranks(peer_killed, 2, pg_timeout_s=PG_TIMEOUT_S, deadline_s=60)
    _report("peer killed", outcomes)
    assert outcomes[1].status == "killed"
    assert outcomes[0].status == "error"
    assert outcomes[0].seconds < PG_TIMEOUT_S + 10
    assert outcomes[0].threads_after == 1


def test_ctrl_c_releases_workers_waiting_on_collectives():
    outcomes = run_ranks(ctrl_c, 2, pg_timeout_s=30)
    _report("ctrl-c", outcomes)
    for o in outcomes:
        assert o.status == "ok", o
        interrupted_after, cancelled, leftover = o.value
        assert interrupted_after < 2.0
        assert cancelled == ["CollectiveCancelledError"] * 3
        assert leftover == []


def test_many_calls_leave_threads_hooks_and_memory_flat():
    log = IssueLog()

    def item(i):
        fake_collective(log, i)
        return i

    def call():
        assert parallel_map(item, range(3), max_workers=2) == [0, 1, 2]
        log.entries.clear()
        log.threads.clear()
        log.works.clear()
        log.states.clear()

    for _ in range(200):  # warm-up: caches, lazily created objects
        call()
    gc.collect()
    threads = threading.active_count()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    start = time.monotonic()
    for _ in range(10_000):
        call()
    elapsed = time.monotonic() - start
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    print(f"[hygiene] 10,000 calls in {elapsed:.1f} s, traced memory grew {grown} bytes")
    assert threading.active_count() == threads
    assert _collective_hook.fn is None
    assert grown < 256 * 1024
