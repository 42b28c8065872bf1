"""``parallel_map`` and ``coordinated``: the public entry points."""

from __future__ import annotations

import functools
import os
import threading
from typing import Any, overload, TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import DebugLevel, get_debug_level
from torch.distributed.distributed_c10d import _collective_hook

from . import _op_hook
from ._bypass import make_detector, refuse_cpp_collectives, RefuseProcessGroupCallsOnWorkers
from ._caller_state import CallerState
from ._calls import call_coordinated
from ._coordinator import Schedule
from ._schedule_check import _check_groups, ScheduleCheck
from ._thread_state import refuse_order_dependent_hooks


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable


__all__ = ["coordinated", "parallel_map"]

# DDP calls C++ collectives: make them refuse on workers (compiled code's
# functional collective ops are hooked while a call runs, see _op_hook).
refuse_cpp_collectives()

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
    with _owner_lock:
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
    with _owner_lock:
        _owner = None


def _default_max_workers() -> int:
    if hasattr(os, "process_cpu_count"):  # Python >= 3.13
        cpus = os.process_cpu_count() or 1
    else:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
        cpus = cpus or os.cpu_count() or 1
    # Ranks that share a machine share its cores (torchrun sets LOCAL_WORLD_SIZE).
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(32, cpus // ranks_here))


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

    Equivalent to ``list(map(fn, iterable, *iterables))``, so to
    ``[fn(x) for x in iterable]`` with one iterable, but items run concurrently on
    up to ``max_workers`` threads, which pays off on free-threaded Python
    (3.14t) and whenever ``fn`` spends time outside the GIL. ``fn`` may call
    ``torch.distributed`` collectives, point-to-point operations, object
    collectives, group creation and functional collectives (so DTensor): they
    are handed to the calling thread, which has them issued one at a time in
    an order that depends only on each item's own sequence of calls and on
    ``max_workers``, never on thread timing. Every rank therefore issues the same sequence, as
    its process groups require, provided every rank calls ``parallel_map`` with
    the same items and the same ``max_workers``.

    The schedule: ``max_workers`` slots, slot ``s`` starting with item ``s``.
    The calling thread visits the busy slots in turn and waits for each one's
    next event: a collective, which it issues (asynchronously where the API
    allows: the worker waits for the result itself) before moving on, or the
    item's end, after which the slot takes the next item not yet started. So
    items may issue any number of collectives, and no slot waits for the
    others to finish. Calls that only enqueue work (a collective with an
    ``async_op`` argument, ``send``, ``recv``) need not wait for the calling
    thread: the worker whose call is next in the schedule issues it itself,
    then issues the calls already waiting at the next slots too, as long as
    their issue runs only torch's code (plain tensors, no modes; else it
    hands that call's worker the turn), so the calling thread wakes only for
    what it alone does (an item's end,
    object collectives, group creation, :func:`coordinated` functions).

    Each item runs with the caller's grad mode, inference mode, autocast state
    (enabled or not), ``__torch_function__`` and ``__torch_dispatch__`` mode
    stacks, current CUDA device and stream, in a copy of the caller's
    :mod:`contextvars` context; each of its collectives (and
    :func:`coordinated` calls) runs under the item's modes at that call,
    whichever thread issues it. Each worker thread uses
    ``intra_op_threads`` threads for intra-op parallelism. After a call that
    succeeded, the worker threads idle for up to a second, holding nothing,
    so that back-to-back calls reuse them; after a failure they have exited
    by the time the exception is raised.

    Only the calling thread advances ``iterable``, in order, under its own
    modes and context, and at fixed points of the schedule: the items of the
    first slots, then one more each time an item enters a slot, keeping up to
    ``max_workers`` items pulled ahead for free workers. A collective the
    iterable calls is thus issued at the same point on every rank; while it
    runs nothing else is issued, so it must not wait for something an item
    does after a collective.

    Limits: items share the global random number generators, so random
    draws that decide an item's collectives can differ between ranks; draw
    from :func:`item_generator` instead. Items must not wait
    for each other: an item's collective is issued only at its slot's turn,
    so an item waiting for another's later work can deadlock where the
    loop would not (the hang report says so).

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
            rank. Defaults to the CPUs available to this process divided by
            ``LOCAL_WORLD_SIZE`` (set by torchrun), at most 32. With 1 (and
            no ``check_schedule``), ``fn`` runs on the calling thread.
        intra_op_threads: Intra-op threads per worker (see
            :func:`torch.set_num_threads`). Defaults to the caller's count
            divided by ``max_workers``, at least 1, so that the workers
            together use no more threads than the caller would.
        check_schedule: Before each collective, check that every rank is
            about to issue the same one (item, call number, op, input
            shapes) and that ``max_workers`` agrees, raising a
            ``RuntimeError`` that names the first difference. Costs a round
            trip per collective. Defaults to on when
            ``TORCH_DISTRIBUTED_DEBUG=DETAIL``. Needs an initialized default
            process group; ignored in a nested call (the outer one checks).
        report_hang_after: When the calling thread has waited this many
            seconds for a slot's next event, log a warning (logger
            ``torch.distributed.threading``), once per interval, naming
            what each worker waits on, with its stack. ``None`` disables it.
        stream_per_worker: On CUDA, give each worker thread its own stream on
            the caller's device instead of the caller's stream, so that the
            items' kernels can overlap. Each item's stream waits for the
            caller's stream before the item runs, the caller's stream waits
            for the item's afterwards, and CUDA tensors in the results are
            recorded on the caller's stream. Collectives are issued on the
            worker's stream. Ignored when CUDA is not initialized.
        coalesce_all_reduces: Issue the synchronous ``all_reduce`` calls of
            small tensors (up to 64 KiB each) that the calling thread meets
            during one visit of the slots as a single ``all_reduce`` of their
            concatenation, when they agree on group, op (one of ``SUM``,
            ``AVG``, ``PRODUCT``, ``MIN``, ``MAX``), dtype, device and CUDA
            stream. Each call still returns once its tensor holds the result
            (on CUDA, in stream order, as serially). This saves collectives
            when many items reduce small values such as losses or metrics,
            at the cost of a held call waiting for up to one visit of the
            other slots. Every rank coalesces the same calls.

    Returns:
        ``fn``'s results, in the order of the items.

    Raises:
        TypeError: ``fn`` is not callable or an iterable is not iterable.
        ValueError: ``max_workers`` or ``intra_op_threads`` is less than 1,
            or ``report_hang_after`` is not positive.
        RuntimeError: another thread is running a top-level ``parallel_map``;
            refused before anything is communicated.
        Exception: The exception of the lowest-index item that failed (an
            ``Exception`` the iterable raises counts as the failure of the
            item at that index); the failures of other items are attached as
            notes. Once the coordinator has seen a failure, no new item
            starts; items in slots finish, so that their collectives still
            match those of the other ranks, and items that started ahead of
            the schedule get ``CancelledError`` at their first collective.
        BaseException: anything else the iterable raises, and Ctrl-C, at
            once; no worker thread outlives the call.

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
        raise TypeError(f"parallel_map() expects a callable fn, got {type(fn).__name__}")
    items = iter(iterable)  # TypeError for a non-iterable, as in a for loop
    if iterables:  # as map(): fn(*item), items up to the shortest iterable
        items = zip(items, *[iter(it) for it in iterables], strict=strict)
        fn = _star(fn)
    if max_workers is None:
        max_workers = _default_max_workers()
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
        raise ValueError(f"report_hang_after must be positive or None, got {report_hang_after}")

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
            check_schedule = dist.is_initialized() and get_debug_level() == DebugLevel.DETAIL
        # Nested calls are checked by the outer call, whose schedule carries theirs.
        check = ScheduleCheck(max_workers) if check_schedule and not nested else None
        if max_workers == 1 and check is None:
            # Nothing to overlap: run on the caller, as the loop would.
            state = CallerState.capture(caller_threads)
            return [state.run_inline(fn, item, index) for index, item in enumerate(items)]
        refuse_order_dependent_hooks()
        state = CallerState.capture(intra_op_threads, stream_per_worker)
        # The outer call's detector sees what a nested call issues.
        detector = None if nested else make_detector(exclude=_check_groups.values())
        schedule = Schedule(
            fn,
            items,
            max_workers,
            state,
            report_hang_after=report_hang_after,
            check=check,
            detector=detector,
            coalesce=coalesce_all_reduces,
        )
        if nested:  # the outer call refuses direct process-group calls
            return schedule.run()
        with RefuseProcessGroupCallsOnWorkers(), _op_hook.HookedOps():
            return schedule.run()
    finally:
        # Worker threads set the process-wide default that new threads start with.
        torch.set_num_threads(caller_threads)
        if outermost and _owner == me:
            _release_top_level()


def _star(fn: Callable[..., _R]) -> Callable[[tuple[Any, ...]], _R]:
    """``fn`` taking its arguments as one tuple, as items of several iterables come."""

    def call_with_args(args: tuple[Any, ...]) -> _R:
        return fn(*args)

    return call_with_args


def coordinated(fn: Callable[..., _R]) -> Callable[..., _R]:
    """Make ``fn`` run on the coordinating thread when called from a worker.

    Called from a :func:`parallel_map` worker, the returned function hands the
    call to the thread coordinating that ``parallel_map`` (the outermost one,
    when calls are nested), which runs it at this point of its schedule, as
    it would a collective, under the calling item's modes: use it for calls
    that are not thread-safe or whose order must be the same on every rank.
    Called anywhere else, it simply calls ``fn``.

    ``torch.compile`` does not trace into the returned function: compiled
    code breaks its graph there and calls it, so the call is handed over at
    run time. Under ``fullgraph=True`` compiling such code raises; call the
    function outside the compiled region instead.

    Args:
        fn: The function to wrap.

    Returns:
        A wrapper with ``fn``'s name, docstring and ``__wrapped__``.

    Example::

        >>> # xdoctest: +SKIP("needs an initialized process group")
        >>> @coordinated
        ... def log_metrics(step, value):
        ...     writer.add_scalar("loss", value, step)
    """
    if not callable(fn):
        raise TypeError(f"coordinated() expects a callable, got {type(fn).__name__}")

    @functools.wraps(fn)
    def run_on_coordinator(*args: Any, **kwargs: Any) -> _R:
        hook = _collective_hook.fn
        if hook is None:
            return fn(*args, **kwargs)
        result: _R = hook(call_coordinated, target=fn, args=args, kwargs=kwargs)
        return result

    # Traced, fn would be inlined into the graph and run by each worker itself.
    opaque: Callable[..., _R] = torch._dynamo.disable(  # type: ignore[no-untyped-call]
        run_on_coordinator,
        reason="torch.distributed.threading.coordinated functions run on parallel_map's "
        "coordinating thread at run time; call them outside a fullgraph=True region",
    )
    opaque.__wrapped__ = fn  # type: ignore[attr-defined]
    return opaque
