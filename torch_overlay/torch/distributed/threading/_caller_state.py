"""The thread-local state that items of ``parallel_map``, and their collectives, run under.

Every item runs under the state the caller's loop would have given it: grad
and inference mode, the full autocast state (enabled or not, for every
device type), the ``__torch_function__`` and ``__torch_dispatch__`` mode
stacks, the CUDA device and stream, and a copy of the caller's context.

A collective an item calls runs under the *item's* grad mode, inference mode
and mode stacks at the point of the call, whichever thread issues it: the
worker captures them (``ItemModes``) and the coordinator, which has the
caller's, issues under them instead. So a functional collective's output
under an item's ``no_grad`` does not require grad, and a mode that the caller
(or the item) entered sees every collective exactly once, as serially.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, NamedTuple, TYPE_CHECKING

import torch
from torch.utils._pytree import tree_leaves

from ._calls import cuda_is_initialized
from ._item_rng import call_place, enter_item


if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


__all__: list[str] = []

# Device types whose autocast state is carried over. Types this build does not
# know are skipped when the state is captured.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def _device_types() -> list[str]:
    return sorted({*_AUTOCAST_DEVICE_TYPES, torch._C._get_privateuse1_backend_name()})


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """(device type, enabled, dtype) for every device type this build knows."""
    state = []
    for device_type in _device_types():
        try:
            enabled = torch.is_autocast_enabled(device_type)
            state.append((device_type, enabled, torch.get_autocast_dtype(device_type)))
        except RuntimeError:  # device type unknown to this build
            continue
    return tuple(state)


def _function_modes() -> tuple[Any, ...]:
    count = torch._C._len_torch_function_stack()
    return tuple(torch._C._get_function_stack_at(i) for i in range(count)) if count else ()


def _dispatch_modes() -> tuple[Any, ...]:
    count = torch._C._len_torch_dispatch_stack()
    return tuple(torch._C._get_dispatch_stack_at(i) for i in range(count)) if count else ()


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


@contextlib.contextmanager
def _mode_stacks(function_modes: tuple[Any, ...],
                 dispatch_modes: tuple[Any, ...]) -> Iterator[None]:
    """Run with this thread's mode stacks replaced by the given ones (bottom first).

    The modes are pushed as they are, not entered: they are already active
    on the thread they come from.
    """
    old_function, old_dispatch = _function_modes(), _dispatch_modes()
    if _same(old_function, function_modes) and _same(old_dispatch, dispatch_modes):
        yield
        return
    _replace_stacks(old_function, old_dispatch, function_modes, dispatch_modes)
    try:
        yield
    finally:
        _replace_stacks(_function_modes(), _dispatch_modes(), old_function, old_dispatch)


def _replace_stacks(old_function: tuple[Any, ...], old_dispatch: tuple[Any, ...],
                    function_modes: tuple[Any, ...], dispatch_modes: tuple[Any, ...]) -> None:
    for _ in old_function:
        torch._C._pop_torch_function_stack()
    for _ in old_dispatch:
        torch._C._pop_torch_dispatch_stack(None)
    for mode in function_modes:
        torch._C._push_on_torch_function_stack(mode)
    for mode in dispatch_modes:
        torch._C._push_on_torch_dispatch_stack(mode)


class ItemModes(NamedTuple):
    """An item's modes at one of its collectives, to issue it under them.

    Captured for every handed-over call, so kept cheap: a tuple, and one
    shared instance for the common case (grad on, no inference mode, no
    modes).
    """

    grad_enabled: bool
    inference_mode: bool
    function_modes: tuple[Any, ...]
    dispatch_modes: tuple[Any, ...]

    @staticmethod
    def capture() -> ItemModes:
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        function_modes, dispatch_modes = _function_modes(), _dispatch_modes()
        if grad and not inference and not function_modes and not dispatch_modes:
            return _PLAIN
        return ItemModes(grad, inference, function_modes, dispatch_modes)

    def are_this_threads(self) -> bool:
        """Whether this thread already runs under them."""
        return (
            torch.is_grad_enabled() == self.grad_enabled
            and torch.is_inference_mode_enabled() == self.inference_mode
            and _same(_function_modes(), self.function_modes)
            and _same(_dispatch_modes(), self.dispatch_modes)
        )

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Make them this thread's for the duration."""
        with contextlib.ExitStack() as stack:
            if torch.is_inference_mode_enabled() != self.inference_mode:
                stack.enter_context(torch.inference_mode(self.inference_mode))
            if torch.is_grad_enabled() != self.grad_enabled:
                stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            stack.enter_context(_mode_stacks(self.function_modes, self.dispatch_modes))
            yield


_PLAIN = ItemModes(True, False, (), ())


@dataclass(frozen=True)
class CallerState:
    """Thread-local state of the thread that called ``parallel_map``.

    Grad mode, inference mode, autocast, the mode stacks, the current CUDA
    device and stream are all per-thread in PyTorch, so a worker thread would
    otherwise run ``fn`` with defaults (or what an earlier item left behind)
    instead of what the caller's loop would have used.
    """

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, bool, torch.dtype], ...]
    function_modes: tuple[Any, ...]
    dispatch_modes: tuple[Any, ...]
    cuda_stream: torch.cuda.Stream | None
    context: contextvars.Context
    intra_op_threads: int
    stream_per_worker: bool = False
    # What the items' own generators are seeded from (see ``_item_rng``).
    item_seed: int = 0
    item_path: tuple[int, ...] = ()

    @classmethod
    def capture(cls, intra_op_threads: int, stream_per_worker: bool = False) -> CallerState:
        cuda_stream = None
        if cuda_is_initialized():
            cuda_stream = torch.cuda.current_stream()
        item_seed, item_path = call_place()
        return cls(
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            autocast=_autocast_state(),
            function_modes=_function_modes(),
            dispatch_modes=_dispatch_modes(),
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

    def run(self, fn: Callable[[Any], Any], item: Any,
            own_stream: torch.cuda.Stream | None = None, *, index: int) -> Any:
        """Run ``fn(item)``, the ``index``-th item, in a copy of the caller's context and modes.

        On a worker's own stream, the item starts after the work the caller had
        queued on its stream, and the caller's stream waits for the item.
        """
        if own_stream is None:
            return self.context.copy().run(self._run_in_modes, fn, item, index)
        caller = self.cuda_stream
        assert caller is not None
        own_stream.wait_stream(caller)
        try:
            result = self.context.copy().run(self._run_in_modes, fn, item, index)
            # Tensors made on the worker's stream and used on the caller's: keep
            # the allocator from reusing their memory before the caller is done.
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                    leaf.record_stream(caller)
            return result
        finally:
            caller.wait_stream(own_stream)

    def _run_in_modes(self, fn: Callable[[Any], Any], item: Any, index: int) -> Any:
        enter_item(self.item_seed, self.item_path, index)  # in the item's own context
        with contextlib.ExitStack() as stack:
            if self.inference_mode:
                stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            # The whole state, enabled or not: a pooled thread may carry what
            # an earlier item left on.
            for device_type, enabled, dtype in self.autocast:
                if torch.is_autocast_enabled(device_type) != enabled or (
                    enabled and torch.get_autocast_dtype(device_type) != dtype
                ):
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            stack.enter_context(_mode_stacks(self.function_modes, self.dispatch_modes))
            return fn(item)
