"""``parallel_map`` and ``coordinated``: the public entry points."""

from __future__ import annotations

import threading
from typing import Any, overload, TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import DebugLevel, get_debug_level
from torch.distributed.distributed_c10d import _collective_hook

from ._bypass import make_detector
from ._caller_state import CallerState
from ._coordinator import Coordinator
from ._interrupts import deferring_interrupts, shielded
from ._schedule_check import _check_groups, ScheduleCheck
from ._thread_state import refuse_order_dependent_hooks


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


__all__ = ["parallel_map"]

_T = TypeVar("_T")
_R = TypeVar("_R")

# The thread coordinating a top-level parallel_map (its ident), if any. Two
# top-level schedules issuing into the same process groups from different
# threads would interleave in a timing-dependent order, so a call from another
# thread is refused instead. The owner itself may call again (from the
# iterable, from a coordinated function, or from fn when it runs inline): its
# schedule is paused meanwhile, so the inner call's collectives go out at a
# fixed point of it. Only the owner sets or clears it from its own ident.
_owner_lock = threading.Lock()
_owner: int | None = None


def _claim_top_level() -> None:
    global _owner
    me = threading.get_ident()
    with shielded, _owner_lock:
        if _owner is None:
            _owner = me
        elif _owner != me:
            raise RuntimeError(
                "parallel_map is already running on another thread of this process. Its "
                "collectives and this call's would be issued in a timing-dependent order. "
                "Call parallel_map from one thread at a time, or nest it inside fn."
            )


def _release_top_level() -> None:
    global _owner
    with shielded, _owner_lock:
        _owner = None


# The schedule depends on max_workers, so its default must be the same on
# every rank: a constant, not the CPUs a rank sees (affinity, LOCAL_WORLD_SIZE),
# which can differ between ranks.
DEFAULT_MAX_WORKERS = 4


@overload
def parallel_map(
    fn: Callable[[_T], _R],
    iterable: Iterable[_T],
    /,
    *,
    strict: bool = ...,
    max_workers: int | None = ...,
    intra_op_threads: int | None = ...,
    check_schedule: bool | None = ...,
    report_hang_after: float | None = ...,
    stream_per_worker: bool = ...,
    coalesce_all_reduces: bool = ...,
) -> list[_R]: ...


@overload
def parallel_map(
    fn: Callable[..., _R],
    iterable: Iterable[Any],
    iterable2: Iterable[Any],
    /,
    *iterables: Iterable[Any],
    strict: bool = ...,
    max_workers: int | None = ...,
    intra_op_threads: int | None = ...,
    check_schedule: bool | None = ...,
    report_hang_after: float | None = ...,
    stream_per_worker: bool = ...,
    coalesce_all_reduces: bool = ...,
) -> list[_R]: ...


def parallel_map(
    fn: Callable[..., _R],
    iterable: Iterable[Any],
    /,
    *iterables: Iterable[Any],
    strict: bool = False,
    max_workers: int | None = None,
    intra_op_threads: int | None = None,
    check_schedule: bool | None = None,
    report_hang_after: float | None = 300.0,
    stream_per_worker: bool = False,
    coalesce_all_reduces: bool = False,
) -> list[_R]:
    """Apply ``fn`` to every item on worker threads, with collectives made safe.

    Equivalent to ``list(map(fn, iterable, *iterables))`` (so to ``[fn(x) for
    x in iterable]``), but items run concurrently on up to ``max_workers``
    threads, which pays off on free-threaded Python (3.14t) and whenever ``fn``
    spends time outside the GIL. ``fn`` may call ``torch.distributed``
    collectives, point-to-point operations, object collectives, group creation
    and functional collectives (so DTensor): each goes to a schedule that
    issues them one at a time in an order that depends only on each item's own
    sequence of calls and on ``max_workers``, never on thread timing. Every
    rank therefore issues the same sequence, provided every rank calls
    ``parallel_map`` with the same items and the same ``max_workers``. How the
    schedule works is in the "Design" section of the
    ``torch.distributed.threading`` docs.

    Each item runs under the caller's thread-local state (grad and inference
    mode, autocast, mode stacks, saved-tensor hooks, CUDA device and stream)
    in a copy of its :mod:`contextvars` context, and its autograd graph
    numbers its nodes in the serial loop's order, so a backward through the
    results computes the loop's gradients. Each collective runs under the
    item's state at that call, whichever thread issues it. Only the calling
    thread advances ``iterable``, in order, at fixed points of the schedule.

    Limits: items share the global random number generators, so draws that
    decide an item's collectives can differ between ranks (draw from
    :func:`item_generator`). Items must not wait for each other: an item's
    collective is issued only at its slot's turn, so an item waiting for
    another's later work can deadlock where the loop would not (the hang
    report says so). A direct ``ProcessGroup`` or ``Backend`` collective
    method call on a worker is refused. The rest of what reaches a process
    group neither through ``torch.distributed``'s functions nor through the
    functional collective ops (threads that ``fn`` starts, C++ callers such as
    DDP's reducer or AOTInductor) is not scheduled; the detector raises
    :class:`CollectiveBypassError` for most of it (docs: "What reaches a
    process group").

    Args:
        fn: Called once per item, on a worker thread, with one argument
            per iterable, as by :func:`map`.
        iterable: The items; consumed once, lazily, on the calling thread,
            up to ``max_workers`` items ahead of the schedule.
        *iterables: More iterables, consumed in step with ``iterable``:
            item ``i`` calls ``fn(iterable[i], iterables[0][i], ...)``. As
            with :func:`map` and :func:`zip`, the items end with the shortest
            iterable.
        strict: With several iterables, raise a ``ValueError`` (as
            ``zip(..., strict=True)`` does, in place of the first missing
            item) if they do not all have the same length.
        max_workers: Number of worker threads. Must be the same on every
            rank: the schedule depends on it. Defaults to 4 on every rank
            (not the CPUs a rank sees, which can differ between ranks); set
            it to the cores each rank may use. With 1 (and no
            ``check_schedule``), ``fn`` runs on the calling thread.
        intra_op_threads: Intra-op threads per worker (see
            :func:`torch.set_num_threads`). Defaults to the caller's count
            divided by ``max_workers``, at least 1, so that the workers
            together use no more threads than the caller would.
        check_schedule: Before each collective, check that every rank is
            about to issue the same one (item, call number, op, input
            shapes) and that ``max_workers`` agrees, raising
            :class:`ScheduleMismatchError` at the first difference. Costs a
            round trip per collective. Defaults to on when
            ``TORCH_DISTRIBUTED_DEBUG=DETAIL``. Needs an initialized default
            process group; ignored in a nested call (the outer one checks).
        report_hang_after: When the calling thread has waited this many
            seconds for a slot's next event, log a warning (logger
            ``torch.distributed.threading``), once per interval, naming
            what each worker waits on, with its stack. ``None`` disables it.
        stream_per_worker: On CUDA, give each worker its own stream on the
            caller's device, so that the items' kernels can overlap; each
            item starts after, and the caller's stream waits for, the work
            queued before (docs: "CUDA streams").
        coalesce_all_reduces: Issue the synchronous ``all_reduce`` calls of
            small tensors that the schedule meets in one visit of the slots
            as one ``all_reduce`` of their concatenation, where they agree
            on group (one that runs only torch's code), op, dtype, device
            and stream (docs: "Coalescing small all_reduces"). Fewer
            collectives, at the cost of a held call waiting for up to one
            visit of the other slots.

    Returns:
        ``fn``'s results, in the order of the items.

    Raises:
        TypeError: ``fn`` is not callable or an iterable is not iterable.
        ValueError: ``max_workers`` or ``intra_op_threads`` is less than 1,
            or ``report_hang_after`` is not positive.
        RuntimeError: another thread is running a top-level ``parallel_map``;
            refused before anything is communicated. (A call from ``fn`` is
            nested: it goes through the outer call's schedule.)
        CollectiveBypassError: a collective reached a process group outside
            the schedule (see the docs' "What reaches a process group").
        ScheduleMismatchError: with ``check_schedule``, the ranks were about
            to issue different collectives.
        Exception: the exception of the lowest-index item that failed (an
            ``Exception`` the iterable raises counts as the failure of the
            item at that index); the failures of other items are attached as
            notes. After a failure no new item starts; items in slots finish,
            so that their collectives still match those of the other ranks,
            and items that started ahead of the schedule get
            :class:`CollectiveCancelledError` at their next collective.
        BaseException: anything else the iterable raises, and Ctrl-C, at
            once. When ``parallel_map`` raises, none of its threads is
            running; after a clean call they idle for up to a second,
            holding nothing, for the next call to reuse.

    Example::

        >>> # xdoctest: +SKIP("needs an initialized process group")
        >>> import torch.distributed as dist
        >>> from torch.distributed.threading import parallel_map
        >>> def step(x):
        ...     loss = (x @ x).sum()
        ...     dist.all_reduce(loss)
        ...     return loss.item()
        >>> losses = parallel_map(step, batches, max_workers=4)

    With several iterables, as :func:`map` (``multi_apply`` of detection
    code: call per pair, then one list per output)::

        >>> # xdoctest: +SKIP("needs an initialized process group")
        >>> def layer_loss(cls_scores, bbox_preds):
        ...     ...  # match, encode labels, all_reduce the number of positives
        ...     return loss_cls, loss_bbox
        >>> results = parallel_map(layer_loss, all_cls_scores, all_bbox_preds)
        >>> losses_cls, losses_bbox = map(list, zip(*results))
    """
    if not callable(fn):
        raise TypeError(
            f"parallel_map() expects a callable fn, got {type(fn).__name__}"
        )
    items = iter(iterable)  # TypeError for a non-iterable, as in a for loop
    if iterables:  # as map(): fn(*item), items up to the shortest iterable
        items = zip(items, *[iter(it) for it in iterables], strict=strict)
        fn = _star(fn)
    if max_workers is None:
        max_workers = DEFAULT_MAX_WORKERS
    elif isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, got {type(max_workers).__name__}")
    elif max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    caller_threads = torch.get_num_threads()
    if intra_op_threads is None:
        intra_op_threads = max(1, caller_threads // max_workers)
    elif isinstance(intra_op_threads, bool) or not isinstance(intra_op_threads, int):
        raise TypeError(
            f"intra_op_threads must be an int, got {type(intra_op_threads).__name__}"
        )
    elif intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
    if report_hang_after is not None and not report_hang_after > 0:
        raise ValueError(
            f"report_hang_after must be positive or None, got {report_hang_after}"
        )

    # A Ctrl-C must not leave a lock held (see _interrupts).
    with deferring_interrupts():
        nested = _collective_hook.fn is not None  # we are a worker of an outer call
        # Set before anything can be interrupted: if this thread does not own the
        # top level yet, this call releases it, whenever it has claimed it.
        me = threading.get_ident()
        outermost = not nested and _owner != me
        try:
            # Refuse a call from another thread before anything communicates.
            if not nested:
                _claim_top_level()
            if check_schedule is None:
                check_schedule = (
                    dist.is_initialized() and get_debug_level() == DebugLevel.DETAIL
                )
            # Nested calls are checked by the outer call, whose schedule carries theirs.
            check = (
                ScheduleCheck(max_workers) if check_schedule and not nested else None
            )
            if max_workers == 1 and check is None:
                # Nothing to overlap: run on the caller, as the loop would.
                state = CallerState.capture(caller_threads)
                return [
                    state.run_inline(fn, item, index)
                    for index, item in enumerate(items)
                ]
            refuse_order_dependent_hooks()
            state = CallerState.capture(intra_op_threads, stream_per_worker)
            # The outer call's detector sees what a nested call issues.
            detector = None if nested else make_detector(exclude=_check_groups.values())
            schedule = Coordinator(
                fn,
                items,
                max_workers,
                state,
                report_hang_after=report_hang_after,
                check=check,
                detector=detector,
                coalesce=coalesce_all_reduces,
            )
            return schedule.run()
        finally:
            with shielded:  # a Ctrl-C here must not leave the top level claimed
                if outermost and _owner == me:
                    _release_top_level()
                # Workers set the process-wide default that new threads start with.
                torch.set_num_threads(caller_threads)


def _star(fn: Callable[..., _R]) -> Callable[[tuple[Any, ...]], _R]:
    """``fn`` taking its arguments as one tuple, as items of several iterables come."""

    def call_with_args(args: tuple[Any, ...]) -> _R:
        return fn(*args)

    return call_with_args
