# Owner(s): ["oncall: distributed"]
"""parallel_map's schedule shows in a torch.profiler trace, per thread."""

from __future__ import annotations

import time

import torch
from torch.distributed.threading import _profiling, parallel_map

from fake_collectives import IssueLog, fake_collective, fake_object_collective


def test_trace_shows_items_waits_and_issues_per_thread():
    log = IssueLog()

    def item(i: int) -> int:
        if i == 0:  # the schedule waits at slot 0 while item 1 calls early
            time.sleep(0.05)
        fake_collective(log, (i, 0))
        fake_collective(log, (i, 1))
        if i == 3:
            fake_object_collective(log, (i, 2))  # always issued by the coordinating thread
        return i

    # Python threads are recorded only with profile_all_threads.
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, experimental_config=config) as prof:
        assert parallel_map(item, range(4), max_workers=2) == [0, 1, 2, 3]
    events = [(e.name, e.thread) for e in prof.events()]
    names = [name for name, _ in events]
    for i in range(4):
        assert names.count(f"parallel_map item {i}") == 1
        for k in range(2):
            assert names.count(f"parallel_map issue fake_collective (item {i}, call {k})") == 1
    assert "parallel_map wait fake_collective" in names  # item 1 waited for its turn
    item_threads = {thread for name, thread in events if name.startswith("parallel_map item")}
    assert len(item_threads) == 2  # the two workers
    issuing = {thread for name, thread in events if name.startswith("parallel_map issue")}
    assert issuing & item_threads  # workers issue at their turn
    coordinator = {thread for name, thread in events
                   if name == "parallel_map issue fake_object_collective (item 3, call 2)"}
    assert len(coordinator) == 1 and not coordinator & item_threads  # so does the coordinator


def test_items_are_recorded_by_the_callers_profiler():
    # Items run under the caller's profiler state, as the loop's body would:
    # a plain profile started on the calling thread records their spans and
    # ops on the worker threads, without profile_all_threads.
    def item(i: int) -> torch.Tensor:
        return torch.ones(4).mul(i)

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(1).sub(1)  # on the calling thread
        parallel_map(item, range(4), max_workers=2)
    events = [(e.name, e.thread) for e in prof.events()]
    items = sorted(name for name, _ in events if name.startswith("parallel_map item"))
    assert items == [f"parallel_map item {i}" for i in range(4)]
    caller = {thread for name, thread in events if name == "aten::sub"}
    muls = [thread for name, thread in events if name == "aten::mul"]
    assert len(muls) == 4 and len(caller) == 1 and not caller & set(muls)


def test_no_span_without_a_profiler():
    assert _profiling.span("item", 0) is _profiling.span("issue", 1)  # the shared no-op
