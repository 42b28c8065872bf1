"""How a collective handed over by a worker is issued, and finished.

The schedule only *issues*: a collective that the worker asked for
synchronously is issued asynchronously and the worker waits on the returned
``Work`` itself, so the coordinator is free to issue the next slot's
collective while this one is in flight. Such single asynchronous calls may
also be issued by the calling worker itself, at its turn in the schedule
(see ``_coordinator``).
Calls without an asynchronous form (object collectives, group creation,
``monitored_barrier``, functions wrapped with
:func:`~torch.distributed.threading.coordinated`) run to completion on the
coordinating thread. Functional collective ops reached by compiled code (see
``_op_hook``) only enqueue by nature, and are issued as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.distributed_c10d import _collective_hook


if TYPE_CHECKING:
    from ._caller_state import ItemModes


__all__: list[str] = []

# torch.cuda.is_initialized is unannotated; this alias gives it a type (and
# saves an attribute lookup on the hot path).
cuda_is_initialized: Callable[[], bool] = torch.cuda.is_initialized


class _IssuePlan:
    """Run at the call's turn in the schedule (``issue``), then on the worker (``finish``)."""

    def __init__(self, *, worker_may_issue: bool) -> None:
        # Whether ``issue`` only enqueues work, so that a worker holding the
        # schedule's turn may run it; else it runs on the coordinating thread.
        self.worker_may_issue = worker_may_issue

    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return fn(**kwargs)

    def finish(self, issued: Any, kwargs: dict[str, Any]) -> Any:
        return issued


class _IssueAsyncThenWait(_IssuePlan):
    """A synchronous call of an entry point that takes ``async_op``."""

    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return fn(**{**kwargs, "async_op": True})

    def finish(self, issued: Any, kwargs: dict[str, Any]) -> None:
        if issued is not None:  # None: this rank is not in the group
            issued.wait()


class _IssueSendAsIsend(_IssueAsyncThenWait):
    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        # send's own argument check, which isend (it may send to itself) lacks.
        group = c10d._group_or_default_group(kwargs["group"])
        group_dst = c10d._canonicalize_group_rank(group, kwargs["dst"], kwargs["group_dst"])
        c10d._check_not_self_rank(group, group_dst, "destination")
        return c10d.isend(kwargs["tensor"], group=group, tag=kwargs["tag"], group_dst=group_dst)


class _IssueRecvAsIrecv(_IssuePlan):
    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return c10d.irecv(**kwargs)

    def finish(self, issued: Any, kwargs: dict[str, Any]) -> int:
        # recv's contract: the sender's global rank, -1 when not in the group.
        if issued is None:
            return -1
        issued.wait()
        src: int | None = kwargs["src"]
        if src is not None:
            return src
        group_src: int | None = kwargs["group_src"]
        if group_src is None:
            group_src = issued._source_rank()
        group = c10d._group_or_default_group(kwargs["group"])
        c10d._check_not_self_rank(group, group_src, "source")  # as recv does
        return c10d.get_global_rank(group, group_src)


_RUN_AS_IS = _IssuePlan(worker_may_issue=False)
_ASYNC_AS_IS = _IssuePlan(worker_may_issue=True)
ASYNC_THEN_WAIT = _IssueAsyncThenWait(worker_may_issue=True)
_SEND = _IssueSendAsIsend(worker_may_issue=True)
_RECV = _IssueRecvAsIrecv(worker_may_issue=True)


def plan_for(fn: Callable[..., Any], kwargs: dict[str, Any]) -> _IssuePlan:
    if fn is call_functional_op:
        return _ASYNC_AS_IS
    async_op = kwargs.get("async_op")
    if async_op is False:
        return ASYNC_THEN_WAIT
    if fn is c10d.send:
        return _SEND
    if fn is c10d.recv:
        return _RECV
    if async_op is True:
        return _ASYNC_AS_IS
    return _RUN_AS_IS


def op_name(fn: Callable[..., Any], kwargs: dict[str, Any] | None = None) -> str:
    """The entry point's name, or the op's (``_c10d_functional.all_reduce.default``)."""
    if fn is call_functional_op and kwargs is not None:
        return str(kwargs["op"])
    return getattr(fn, "__name__", repr(fn))


@dataclass
class Call:
    """One call a worker hands to the schedule."""

    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    plan: _IssuePlan
    item: int
    seq: int
    cuda_stream: torch.cuda.Stream | None
    # The item's grad/inference mode and mode stacks at the call.
    modes: ItemModes | None = None

    @property
    def name(self) -> str:
        return op_name(self.fn, self.kwargs)

    def __str__(self) -> str:
        return f"{self.name} (item {self.item}, call {self.seq})"

    def issue(self) -> Any:
        """Issue on the coordinating thread, on the calling worker's CUDA
        stream, under the calling item's modes."""
        modes = self.modes
        if modes is not None and not modes.are_this_threads():
            with modes.applied():
                return self._issue_on_stream()
        return self._issue_on_stream()

    def _issue_on_stream(self) -> Any:
        if self.cuda_stream is None:
            return self.plan.issue(self.fn, self.kwargs)
        with torch.cuda.stream(self.cuda_stream):
            return self.plan.issue(self.fn, self.kwargs)


def call_coordinated(
    target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Entry point that :func:`coordinated` hands to the collective hook.

    Like a collective, it goes to the outermost schedule: the coordinating
    thread of a nested ``parallel_map`` is a worker of the outer one, so
    there it is handed on through that thread's hook.
    """
    if (hook := _collective_hook.fn) is not None:
        return hook(call_coordinated, target=target, args=args, kwargs=kwargs)
    return target(*args, **kwargs)


def call_functional_op(
    op: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """Entry point that a functional collective op hands to the collective hook."""
    return op(*args, **kwargs)
