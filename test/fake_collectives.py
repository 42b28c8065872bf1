"""Fake collective entry points for testing the schedule in one process.

Each fake calls the thread's collective hook exactly as the patched entry
points in ``distributed_c10d.py`` do, so ``parallel_map`` schedules it; when it
really runs (on the coordinating thread, or on its worker at its turn) it
appends to an ``IssueLog`` instead of talking to other ranks.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading._calls import TORCH_ONLY_ENTRY_POINTS
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack


def issue_state() -> tuple[Any, ...]:
    """The thread-local state a collective issued now would run under."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        tuple(_get_current_function_mode_stack()),
        tuple(_get_current_dispatch_mode_stack()),
    )


@dataclass
class FakeWork:
    """What an async fake returns; records that someone waited on it."""

    entry: tuple[Any, ...]
    waited: threading.Event = field(default_factory=threading.Event)

    def wait(self) -> bool:
        self.waited.set()
        return True


@dataclass
class IssueLog:
    """Everything the fakes issued, in order, with the issuing thread.

    ``overlapped`` records whether two issues ever ran at the same time, which
    the schedule must never allow; ``hold_s`` makes each issue last that long,
    so that an overlap would be seen.
    """

    hold_s: float = 0.0
    entries: list[tuple[Any, ...]] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    works: list[FakeWork] = field(default_factory=list)
    # (grad mode, inference mode, function modes, dispatch modes) at each issue.
    states: list[tuple[Any, ...]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    issuing: int = 0
    overlapped: bool = False

    def add(self, entry: tuple[Any, ...]) -> None:
        with self.lock:
            self.entries.append(entry)
            self.threads.append(threading.current_thread())
            self.states.append(issue_state())
            self.issuing += 1
            self.overlapped = self.overlapped or self.issuing > 1
        if self.hold_s:
            time.sleep(self.hold_s)
        with self.lock:
            self.issuing -= 1

    def issued_by_schedule(self) -> bool:
        """One issue at a time, each on the coordinating thread or a worker."""
        main = threading.main_thread()
        return not self.overlapped and all(
            t is main or t.name.startswith("parallel_map-worker") for t in self.threads
        )


def fake_collective(log: IssueLog, tag: Any, async_op: bool = False) -> FakeWork | None:
    """Like a c10d collective: returns a Work when ``async_op``, else None."""
    if (hook := _collective_hook.fn) is not None:
        return hook(fake_collective, log=log, tag=tag, async_op=async_op)
    log.add(("collective", tag))
    if async_op:
        work = FakeWork(("collective", tag))
        log.works.append(work)
        return work
    return None


def fake_torch_only_collective(
    log: IssueLog, tag: Any, tensor: Any = None, async_op: bool = False,
    raises: BaseException | None = None,
) -> FakeWork | None:
    """Like ``fake_collective``, registered as running only torch's code when
    issued (as torch.distributed's entry points are), so that a worker holding
    the turn may issue it for another item; ``tensor`` stands for its tensor
    argument. Its issue raises ``raises``, if given."""
    if (hook := _collective_hook.fn) is not None:
        return hook(fake_torch_only_collective, log=log, tag=tag, tensor=tensor,
                    async_op=async_op, raises=raises)
    if raises is not None:
        raise raises
    return fake_collective(log, tag, async_op=async_op)


TORCH_ONLY_ENTRY_POINTS.add(fake_torch_only_collective)


def fake_object_collective(log: IssueLog, tag: Any) -> Any:
    """Like an object collective: no async form, returns a value."""
    if (hook := _collective_hook.fn) is not None:
        return hook(fake_object_collective, log=log, tag=tag)
    log.add(("object", tag))
    return ("done", tag)


def fake_failing_collective(log: IssueLog, tag: Any) -> None:
    """A collective whose issue raises (bad arguments, say)."""
    if (hook := _collective_hook.fn) is not None:
        return hook(fake_failing_collective, log=log, tag=tag)
    log.add(("failing", tag))
    raise ValueError(f"bad collective {tag}")


def fake_collective_doing(
    log: IssueLog, tag: Any, on_issue: Any, async_op: bool = False
) -> FakeWork | None:
    """Like ``fake_collective``, but calls ``on_issue()`` (which may raise) when issued.

    It has an ``async_op`` argument, so a worker may issue it at its turn.
    """
    if (hook := _collective_hook.fn) is not None:
        return hook(fake_collective_doing, log=log, tag=tag, on_issue=on_issue, async_op=async_op)
    on_issue()
    return fake_collective(log, tag, async_op=async_op)


@dataclass
class ReferenceRun:
    order: list[tuple[int, int]]  # (item, call number) in issue order
    slotted: set[int]  # items that got a slot, i.e. ran


def reference_schedule(
    calls_per_item: list[int], max_workers: int, failing: frozenset[int] = frozenset()
) -> ReferenceRun:
    """The issue order the schedule promises, computed without threads.

    Slot ``s`` starts with item ``s``; slots are visited cyclically; each visit
    consumes one event of the slot's item: its next call, or its end, after
    which the slot takes the next item unless an item in ``failing`` has ended.
    """
    n = len(calls_per_item)
    slots = list(range(min(max_workers, n)))
    next_item = len(slots)
    done = [0] * n
    order: list[tuple[int, int]] = []
    slotted = set(slots)
    failed = False
    position = 0
    while slots:
        item = slots[position]
        if done[item] < calls_per_item[item]:
            order.append((item, done[item]))
            done[item] += 1
        else:
            failed = failed or item in failing
            if failed or next_item == n:
                del slots[position]
                if slots:
                    position %= len(slots)
                continue
            slots[position] = next_item
            slotted.add(next_item)
            next_item += 1
        position = (position + 1) % len(slots)
    return ReferenceRun(order, slotted)
