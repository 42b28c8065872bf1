"""What the items of ``parallel_map`` inherit from the thread that called it.

Every item runs under the state the caller's loop would have given it: the
caller's whole ``ThreadState`` (see ``_thread_state``: grad and inference
mode, autocast, mode stacks, saved-tensor hooks, functorch transforms and
the rest of ``at::ThreadLocalState``), its depth of autocast regions, its
CUDA device and stream (with ``stream_per_worker``, a stream of the worker's
own, ordered after the caller's), and a copy of its ``contextvars`` context;
its autograd nodes are numbered in the loop's order
(``_thread_state.Numbering``). The worker's own ``ThreadState``, autocast
depth and context are back after each item, so none of those reaches the
next item; Python ``threading.local`` values are not carried or reset.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
from torch.utils._pytree import tree_leaves

from ._calls import cuda_is_initialized
from ._item_rng import call_place, enter_item as enter_item_place
from ._profiling import span
from ._thread_state import ThreadState


if TYPE_CHECKING:
    from collections.abc import Callable

    from ._thread_state import ItemNumbers


__all__: list[str] = []


@dataclass(frozen=True)
class CallerState:
    """What the thread that called ``parallel_map`` gives every item."""

    thread: ThreadState
    autocast_nesting: int
    cuda_stream: torch.cuda.Stream | None
    context: contextvars.Context
    intra_op_threads: int
    stream_per_worker: bool = False
    # What the items' own generators are seeded from (see ``_item_rng``).
    item_seed: int = 0
    item_path: tuple[int, ...] = ()

    @classmethod
    def capture(
        cls, intra_op_threads: int, stream_per_worker: bool = False
    ) -> CallerState:
        cuda_stream = None
        if cuda_is_initialized():
            cuda_stream = torch.cuda.current_stream()
        item_seed, item_path = call_place()
        nesting = torch.autocast_increment_nesting() - 1
        torch.autocast_decrement_nesting()
        return cls(
            thread=ThreadState.capture(),
            autocast_nesting=nesting,
            cuda_stream=cuda_stream,
            context=contextvars.copy_context(),
            intra_op_threads=intra_op_threads,
            stream_per_worker=stream_per_worker and cuda_stream is not None,
            item_seed=item_seed,
            item_path=item_path,
        )

    def enter_worker_thread(self) -> torch.cuda.Stream | None:
        """Per-thread settings that hold for the worker's whole life.

        Returns the worker's own CUDA stream, with ``stream_per_worker``.
        """
        # Each thread owns its intra-op (OpenMP) team; W workers each using the
        # caller's full count would oversubscribe the cores W times over.
        torch.set_num_threads(self.intra_op_threads)
        if self.cuda_stream is None:
            return None
        torch.cuda.set_device(self.cuda_stream.device)
        if not self.stream_per_worker:
            torch.cuda.set_stream(self.cuda_stream)
            return None
        own: torch.cuda.Stream = torch.cuda.Stream(self.cuda_stream.device)  # type: ignore[no-untyped-call]
        torch.cuda.set_stream(own)
        return own

    def leave_worker_thread(self) -> None:
        """Undo what outlives a job on a pooled thread: its current stream."""
        if self.cuda_stream is not None:
            torch.cuda.set_stream(torch.cuda.default_stream(self.cuda_stream.device))

    def run_inline(self, fn: Callable[[Any], Any], item: Any, index: int) -> Any:
        """Run ``fn(item)`` on the calling thread itself, in a copy of its context."""
        return self.context.copy().run(self._run_inline, fn, item, index)

    def _run_inline(self, fn: Callable[[Any], Any], item: Any, index: int) -> Any:
        enter_item_place(self.item_seed, self.item_path, index)
        return fn(item)

    def run(
        self,
        fn: Callable[[Any], Any],
        item: Any,
        own_stream: torch.cuda.Stream | None,
        *,
        index: int,
        numbers: ItemNumbers,
    ) -> Any:
        """Run ``fn(item)``, the ``index``-th item, on a worker: under the caller's
        state, in a copy of its context, with the item's autograd ``numbers``.

        On a worker's own stream, the item starts after the work the caller had
        queued on its stream, and the caller's stream waits for the item.
        """
        if own_stream is None:
            return self._run_as_caller(fn, item, index, numbers)
        caller = self.cuda_stream
        if caller is None:
            raise AssertionError(
                "parallel_map: a worker stream without the caller's stream"
            )
        own_stream.wait_stream(caller)
        try:
            result = self._run_as_caller(fn, item, index, numbers)
            # Tensors made on the worker's stream and used on the caller's: keep
            # the allocator from reusing their memory before the caller is done.
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                    leaf.record_stream(caller)
            return result
        finally:
            caller.wait_stream(own_stream)

    def _run_as_caller(
        self, fn: Callable[[Any], Any], item: Any, index: int, numbers: ItemNumbers
    ) -> Any:
        own = self.thread.make_current()
        # As deep in autocast regions as the caller, so that leaving one the
        # item enters does not clear autocast's (process-wide) cache of casts.
        for _ in range(self.autocast_nesting):
            torch.autocast_increment_nesting()
        failed = True
        try:
            result = self.context.copy().run(self._run_item, fn, item, index, numbers)
            failed = False
        finally:
            try:
                numbers.leave(index, failed)
            finally:
                for _ in range(self.autocast_nesting):
                    torch.autocast_decrement_nesting()
                own.make_current()
        return result

    def _run_item(
        self, fn: Callable[[Any], Any], item: Any, index: int, numbers: ItemNumbers
    ) -> Any:
        # in the item's own context
        enter_item_place(self.item_seed, self.item_path, index)
        numbers.enter()
        with span("item", index):  # under the caller's profiler, as the loop's body
            return fn(item)
