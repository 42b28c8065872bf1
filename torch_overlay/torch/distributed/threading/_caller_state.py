"""The caller's thread-local state that every item of ``parallel_map`` runs under."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

import torch
from torch.utils._pytree import tree_leaves

from ._calls import cuda_is_initialized


if TYPE_CHECKING:
    from collections.abc import Callable


__all__: list[str] = []

# Device types whose autocast state is carried over. Types this build does not
# know are skipped when the state is captured.
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def _autocast_state() -> tuple[tuple[str, torch.dtype], ...]:
    enabled = []
    device_types = {*_AUTOCAST_DEVICE_TYPES, torch._C._get_privateuse1_backend_name()}
    for device_type in sorted(device_types):
        try:
            if torch.is_autocast_enabled(device_type):
                enabled.append((device_type, torch.get_autocast_dtype(device_type)))
        except RuntimeError:  # device type unknown to this build
            continue
    return tuple(enabled)


@dataclass(frozen=True)
class CallerState:
    """Thread-local state of the thread that called ``parallel_map``.

    Grad mode, inference mode, autocast, the current CUDA device and stream are
    all per-thread in PyTorch, so a fresh worker thread would otherwise run
    ``fn`` with defaults instead of what the caller's loop would have used.
    """

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, torch.dtype], ...]
    cuda_stream: torch.cuda.Stream | None
    context: contextvars.Context
    intra_op_threads: int
    stream_per_worker: bool = False

    @classmethod
    def capture(cls, intra_op_threads: int, stream_per_worker: bool = False) -> CallerState:
        cuda_stream = None
        if cuda_is_initialized():
            cuda_stream = torch.cuda.current_stream()
        return cls(
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            autocast=_autocast_state(),
            cuda_stream=cuda_stream,
            context=contextvars.copy_context(),
            intra_op_threads=intra_op_threads,
            stream_per_worker=stream_per_worker and cuda_stream is not None,
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
            own_stream: torch.cuda.Stream | None = None) -> Any:
        """Run ``fn(item)`` in a copy of the caller's context and modes.

        On a worker's own stream, the item starts after the work the caller had
        queued on its stream, and the caller's stream waits for the item.
        """
        if own_stream is None:
            return self.context.copy().run(self._run_in_modes, fn, item)
        caller = self.cuda_stream
        assert caller is not None
        own_stream.wait_stream(caller)
        try:
            result = self.context.copy().run(self._run_in_modes, fn, item)
            # Tensors made on the worker's stream and used on the caller's: keep
            # the allocator from reusing their memory before the caller is done.
            for leaf in tree_leaves(result):
                if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                    leaf.record_stream(caller)
            return result
        finally:
            caller.wait_stream(own_stream)

    def _run_in_modes(self, fn: Callable[[Any], Any], item: Any) -> Any:
        with contextlib.ExitStack() as stack:
            if self.inference_mode:
                stack.enter_context(torch.inference_mode())
            stack.enter_context(torch.set_grad_enabled(self.grad_enabled))
            for device_type, dtype in self.autocast:
                stack.enter_context(torch.autocast(device_type, dtype=dtype))
            return fn(item)
