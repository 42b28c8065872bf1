"""How a collective handed over by a worker is issued, and finished.

The schedule only *issues*: a collective that the worker asked for
synchronously is issued asynchronously and the worker waits on the returned
``Work`` itself, so the schedule is free to issue the next slot's
collective while this one is in flight. Such single asynchronous calls may
also be issued by a worker that holds the schedule's turn: the calling
worker itself, or, when the issue runs only torch's code
(``issue_runs_torch_only``), any worker holding the turn (see ``_order.Route``).
Calls without an asynchronous form (object collectives, group creation,
``monitored_barrier``, functions wrapped with
:func:`~torch.distributed.threading.coordinated`) run to completion on the
coordinating thread. Functional collective ops reached by compiled code (see
``_op_hook``) only enqueue by nature, and are issued as they are.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.distributed_c10d import _collective_hook

from ._thread_state import Issuing, ThreadState, user_code_may_run


if TYPE_CHECKING:
    import contextvars
    from collections.abc import Callable, Iterable

    from ._thread_state import CallState


__all__: list[str] = []

# torch.cuda.is_initialized is unannotated; this alias gives it a type (and
# saves an attribute lookup on the hot path).
cuda_is_initialized: Callable[[], bool] = torch.cuda.is_initialized


@functools.cache
def _undecorated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ``distributed_c10d`` entry point without its decorators, for its issue.

    The worker's own call has already been through them (c10d's exception
    logging, ``deprecated``), and every error of the issue is raised inside
    that call: so an error is logged once and a deprecation warned once, as
    serially, and the issue runs no warning filter or handler of whichever
    thread issues it. It also saves a call layer.
    """
    return inspect.unwrap(fn) if fn.__module__ == c10d.__name__ else fn


class _IssuePlan:
    """Run at the call's turn in the schedule (``issue``), then on the worker (``finish``)."""

    def __init__(self, *, worker_may_issue: bool) -> None:
        # Whether ``issue`` only enqueues work, so that a worker holding the
        # schedule's turn may run it; else it runs on the coordinating thread.
        self.worker_may_issue = worker_may_issue

    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return _undecorated(fn)(**kwargs)

    def finish(self, issued: Any, kwargs: dict[str, Any]) -> Any:
        return issued


class _IssueAsyncThenWait(_IssuePlan):
    """A synchronous call of an entry point that takes ``async_op``."""

    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        return _undecorated(fn)(**{**kwargs, "async_op": True})

    def finish(self, issued: Any, kwargs: dict[str, Any]) -> None:
        if issued is not None:  # None: this rank is not in the group
            issued.wait()


class _IssueSendAsIsend(_IssueAsyncThenWait):
    def issue(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        # send's own argument check, which isend (it may send to itself) lacks.
        group = c10d._group_or_default_group(kwargs["group"])
        group_dst = c10d._canonicalize_group_rank(
            group, kwargs["dst"], kwargs["group_dst"]
        )
        c10d._check_not_self_rank(group, group_dst, "destination")
        return c10d.isend(
            kwargs["tensor"], group=group, tag=kwargs["tag"], group_dst=group_dst
        )


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


def _only_plain_tensors(
    values: Iterable[Any], device: torch.device | None, depth: int = 2
) -> bool:
    """Whether every tensor in ``values`` (and in lists, tuples and dicts in them,
    ``depth`` deep) is a plain Tensor, on the CPU or on ``device`` (the CUDA
    device of the call's stream)."""
    for value in values:
        if isinstance(value, torch.Tensor):
            if type(value) is not torch.Tensor or (
                value.is_cuda and value.device != device
            ):
                return False
        elif isinstance(value, (list, tuple, dict)):
            inner = value.values() if isinstance(value, dict) else value
            if not depth or not _only_plain_tensors(inner, device, depth - 1):
                return False
    return True


# Entry points outside distributed_c10d whose issue runs only torch's code
# (tests add their fakes).
TORCH_ONLY_ENTRY_POINTS: set[Callable[..., Any]] = set()

# The backends whose collectives are torch's own code.
_TORCH_BACKENDS = frozenset({"gloo", "nccl", "ucc", "mpi", "xccl", "fake"})


def group_of(call: Call) -> c10d.ProcessGroup | None:
    """The process group ``call`` runs on; None when that is not known."""
    if call.fn is call_functional_op:
        args, kwargs = call.kwargs["args"], call.kwargs["kwargs"]
        # every functional collective op takes the group's name last
        name = kwargs.get("group_name", args[-1] if args else None)
        if isinstance(name, c10d.ProcessGroup):  # some callers pass the group
            return name
        if not isinstance(name, str):
            return None
        try:
            resolve = torch._C._distributed_c10d._resolve_process_group
            return resolve(c10d.GroupName(name))
        except RuntimeError:  # no group of that name
            return None
    if "group" not in call.kwargs:  # an entry point without one: not known
        return None
    group = call.kwargs["group"]
    return c10d.GroupMember.WORLD if group is None else group


def backends_are_torchs(group: c10d.ProcessGroup | None) -> bool:
    """Whether ``group`` runs only torch's own code: torch's ``ProcessGroup``
    (not a subclass written in Python, which ``Backend.register_backend``
    also accepts) over backends that torch ships (by their registered names)."""
    if type(group) is not c10d.ProcessGroup:
        return False
    config = c10d._world.pg_backend_config.get(group)
    return config is not None and _names_torchs_backends(config)


@functools.cache  # asked per waiting call; a process has few configs
def _names_torchs_backends(config: str) -> bool:
    """Whether a backend config (``"cpu:gloo,cuda:nccl"``) names only torch's backends."""
    return all(
        entry.rpartition(":")[2] in _TORCH_BACKENDS for entry in config.split(",")
    )


def issue_runs_torch_only(call: Call) -> bool:
    """Whether issuing ``call`` runs no code but torch's own, so that any thread may.

    Asked on the calling item's worker, at the call.

    True for a torch.distributed entry point (or a functional collective op)
    called on plain tensors with no ``__torch_function__`` or
    ``__torch_dispatch__`` mode and no saved-tensor hooks active: no user code
    (a mode, a tensor subclass, a pack hook) runs on its issue path that could
    need something held by the thread that issues it. CUDA tensors must be on
    the device of the call's stream, the only CUDA state that the issue takes
    from its item. The call's group must run only torch's code
    (:func:`backends_are_torchs`): a process group written in Python is user
    code, which may take a lock that another item holds around its
    collective, or read its item's context.
    """
    fn = call.fn
    if fn not in TORCH_ONLY_ENTRY_POINTS and not (
        (fn is call_functional_op or fn.__module__ == c10d.__name__)
        and backends_are_torchs(group_of(call))
    ):
        return False
    if user_code_may_run():
        return False
    stream = call.cuda_stream
    return _only_plain_tensors(
        call.kwargs.values(), None if stream is None else stream.device
    )


@dataclass(slots=True)
class Call:
    """One call a worker hands to the schedule."""

    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    plan: _IssuePlan
    item: int
    seq: int
    cuda_stream: torch.cuda.Stream | None
    # The item's thread-local state and sequence number at the call.
    state: CallState | None = None
    # A copy of the item's context, for a call that runs user code elsewhere
    # (a ``coordinated`` function, a collective whose issue may run user
    # code), whose changes go back to the item.
    context: contextvars.Context | None = None
    # Set by ``issue``: the item's next autograd sequence number after it,
    # and, for a call with a context, the item's state after it.
    sequence_nr_after: int | None = None
    state_after: ThreadState | None = None

    @property
    def name(self) -> str:
        return op_name(self.fn, self.kwargs)

    def __str__(self) -> str:
        return f"{self.name} (item {self.item}, call {self.seq})"

    def issue(self) -> Any:
        """Issue on this thread for the item's worker (this thread is the
        coordinating thread, or a worker holding the turn): on the worker's
        CUDA stream, under the item's state and sequence number, in a copy of
        its context if it has one. ``sequence_nr_after`` is the item's next
        number afterwards; with a context (user code), ``state_after`` is the
        item's state as the call left it."""
        if self.state is None:
            return self._issue_in_context()
        issuing = Issuing(self.state)
        try:
            return self._issue_in_context()
        finally:
            # user code: what it set here goes back to the item
            if self.context is not None:
                self.state_after = ThreadState.capture()
            self.sequence_nr_after = issuing.restore()

    def _issue_in_context(self) -> Any:
        if self.context is None:
            return self._issue_on_stream()
        return self.context.run(self._issue_on_stream)

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
