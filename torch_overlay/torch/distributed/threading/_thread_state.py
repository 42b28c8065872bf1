"""The per-thread state an item's work sees, whichever thread does it.

An item runs on a worker thread, and its calls may be issued by another (the
coordinating thread, or a worker holding the schedule's turn). PyTorch keeps
much of its state per thread, so each of those threads must take on the
state the serial loop's single thread would have had:

* ``at::ThreadLocalState``: the set the autograd engine carries to its own
  threads, captured and applied whole (``torch._C._autograd._ThreadLocalState``):
  grad, inference and forward-grad mode, the multithreading and view-replay
  flags, the dispatch key sets (autocast per device, functorch transforms,
  Python modes), autocast dtypes, the ``__torch_function__`` and
  ``__torch_dispatch__`` mode stacks, saved-tensor hooks, the Python
  dispatcher, functionalization, DTensor's implicit replication, profiler
  callbacks and debug info, and thread-local Python objects. A piece that a
  later release adds to that set is carried too.
* What that set leaves out: autocast's cache flag (the cache itself is
  process-wide); the autograd sequence number, which numbers each item's
  nodes in loop order (``Numbering``); the depth of autocast regions, the
  CUDA device and stream, intra-op threads and ``contextvars``
  (``_caller_state``).

``Numbering``: the autograd engine runs ready nodes highest sequence number
first, and each thread numbers the nodes it creates from its own counter. A
loop on one thread numbers item 0's nodes below item 1's, and the caller's
nodes from before the loop below those, from after it above. A call gives
item ``k`` the numbers from ``start + k * span`` on: the iterable's
``next()`` for item ``k`` runs there on the coordinating thread, the item
continues where it ended on its worker, and a thread that issues a call for
the item takes the item's number for the issue and hands the next one back.
Afterwards the caller continues above every number the items used, so any
backward over what the items built visits their nodes in the loop's order,
on every rank, whichever thread ran which item. A top-level call's items get
``2**32`` numbers each; a call nested in an item (or in the iterable's
``next()``) divides the range of that item (or of the item ``next()``
yields) among its own items, ``span >> 10`` each. Ranges are reserved,
numbers used: a call that builds no graph uses none. An item that uses more numbers than its
range holds raises instead of overlapping the next item's.
"""

from __future__ import annotations

import contextvars
from typing import Any, NamedTuple

import torch
from torch._C._autograd import (
    _get_sequence_nr,
    _set_sequence_nr,
    _set_thread_local_state,
    _ThreadLocalState,
    _top_saved_tensors_default_hooks,
)


__all__: list[str] = []

TOP_LEVEL_SPAN = 1 << 32
_NESTED_SHIFT = 10
# Sequence numbers stay below this; AccumulateGrad nodes use the largest one.
_LIMIT = 1 << 63

# The span of the item running in this context (set in each item's own
# context), from which a nested call divides its items' ranges.
_item_span: contextvars.ContextVar[int] = contextvars.ContextVar(
    "torch.distributed.threading.item_span", default=TOP_LEVEL_SPAN << _NESTED_SHIFT
)

get_sequence_nr = _get_sequence_nr
set_sequence_nr = _set_sequence_nr


class ThreadState(NamedTuple):
    """A thread's ``at::ThreadLocalState`` and autocast cache flag."""

    tls: _ThreadLocalState
    autocast_cache: bool

    @staticmethod
    def capture() -> ThreadState:
        return ThreadState(_ThreadLocalState(), torch.is_autocast_cache_enabled())

    def make_current(self) -> ThreadState:
        """Make this the calling thread's state; returns the state it replaced."""
        replaced = ThreadState.capture()
        _set_thread_local_state(self.tls)
        torch.set_autocast_cache_enabled(self.autocast_cache)
        return replaced


def _function_modes() -> tuple[Any, ...]:
    count = torch._C._len_torch_function_stack()
    return (
        tuple(torch._C._get_function_stack_at(i) for i in range(count)) if count else ()
    )


def _dispatch_modes() -> tuple[Any, ...]:
    count = torch._C._len_torch_dispatch_stack()
    return (
        tuple(torch._C._get_dispatch_stack_at(i) for i in range(count)) if count else ()
    )


def user_code_may_run() -> bool:
    """Whether this thread's state may run user code in an op: a mode, or a
    saved-tensor hook."""
    return bool(
        torch._C._len_torch_function_stack()
        or torch._C._len_torch_dispatch_stack()
        or _top_saved_tensors_default_hooks(True) is not None
    )


class CallState(NamedTuple):
    """An item's state at one of its calls, to issue the call under it anywhere.

    ``modes``: the mode stacks, bottom first (calls coalesce only under the
    same ones).
    """

    thread: ThreadState
    sequence_nr: int
    modes: tuple[Any, ...]

    @staticmethod
    def capture() -> CallState:
        modes: tuple[Any, ...] = ()
        if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
            modes = (*_function_modes(), *_dispatch_modes())
        return CallState(ThreadState.capture(), get_sequence_nr(), modes)


class Issuing:
    """On the thread that issues an item's call: take on the item's state,
    then give this thread its own back (``restore``), returning the item's
    next sequence number."""

    __slots__ = ("_own", "_own_number")

    def __init__(self, state: CallState) -> None:
        self._own_number = get_sequence_nr()
        self._own = state.thread.make_current()
        set_sequence_nr(state.sequence_nr)

    def restore(self) -> int:
        item_number = get_sequence_nr()
        self._own.make_current()
        set_sequence_nr(self._own_number)
        return item_number


class ItemNumbers:
    """An item's sequence numbers: from ``first`` up to (not including) ``limit``."""

    __slots__ = ("_used", "first", "limit", "span")

    def __init__(self, first: int, limit: int, span: int, used: list[int]) -> None:
        self.first, self.limit, self.span = first, limit, span
        self._used = used  # the call's list of numbers used up to

    def enter(self) -> None:
        """In the item's own context, on the thread about to run it."""
        _item_span.set(self.span)
        set_sequence_nr(self.first)

    def leave(self, index: int, failed: bool) -> None:
        """After item ``index`` (on the same thread): note what it used, and
        raise, unless it ``failed`` already, if that is beyond its range."""
        end = get_sequence_nr()
        if end > self.first:
            self._used.append(end)
        if end > self.limit and not failed:
            raise RuntimeError(
                f"parallel_map: item {index} used more than its {self.span} autograd sequence "
                "numbers (the nodes it created, and the ranges of the items of parallel_map "
                "calls nested in it), so the backward could no longer visit the items in the "
                "serial loop's order. Split the item's work, or nest fewer items in it."
            )


class Numbering:
    """The sequence numbers of one call's items; on the coordinating thread.

    Ranges are reserved, numbers are used: after the call the caller goes
    on just above the highest number that a pull or an item used, so a
    call that builds no graph uses none.
    """

    def __init__(self) -> None:
        self._start = get_sequence_nr()
        self._span = _item_span.get() >> _NESTED_SHIFT
        self._pulls = 0  # items pulled so far
        self._used: list[int] = []  # ends of pulls and items that used numbers
        self._pull_span: contextvars.Token[int] | None = None

    def before_pull(self) -> None:
        """Number what the iterable's ``next()`` creates: the next item's range
        starts here, and a call nested in ``next()`` divides that range."""
        base = self._start + self._pulls * self._span
        if base + self._span >= _LIMIT:
            raise RuntimeError(
                "parallel_map: this thread has used up autograd's sequence numbers "
                f"(at {base}); each call reserves {self._span} per item"
            )
        set_sequence_nr(base)
        self._pull_span = _item_span.set(self._span)

    def after_pull(self, pulled: bool) -> ItemNumbers | None:
        """After ``next()``: the item's numbers if it gave one (``pulled``)."""
        if self._pull_span is not None:
            _item_span.reset(self._pull_span)
            self._pull_span = None
        end = get_sequence_nr()
        if end > self._start + self._pulls * self._span:
            self._used.append(end)
        if not pulled:
            return None
        self._pulls += 1
        return ItemNumbers(
            end, self._start + self._pulls * self._span, self._span, self._used
        )

    def finish(self) -> None:
        """The caller's counter after the call: above every number used."""
        set_sequence_nr(max([self._start, *self._used]))


def refuse_order_dependent_hooks() -> None:
    """Refuse to run items under saved-tensor hooks that match tensors by order.

    Items pack their saved tensors concurrently, in an order that depends on
    timing. Non-reentrant ``torch.utils.checkpoint`` pairs each tensor that
    its recomputation saves with the one saved at the same position, so
    around ``parallel_map`` it could pair tensors of different items.
    """
    hooks = _top_saved_tensors_default_hooks(True)
    if (
        hooks is not None
        and getattr(hooks[0], "__module__", None) == "torch.utils.checkpoint"
    ):
        raise RuntimeError(
            "parallel_map cannot run inside torch.utils.checkpoint(..., use_reentrant=False): "
            "checkpointing pairs the tensors that recomputation saves with the original ones "
            "by the order of saving, which threads do not keep. Checkpoint inside fn (per "
            "item) instead, or use use_reentrant=True."
        )
