"""Coalescing of small synchronous all_reduces into one collective.

With ``coalesce_all_reduces``, the schedule holds back the synchronous
``all_reduce`` calls of small dense tensors that it meets during one visit
of the slots, and issues those that can share one collective (same group,
op, dtype, device, CUDA stream and mode stacks) as a single ``all_reduce``
of their concatenation; what c10d refuses (a conjugate view, say) goes
alone, so that each such call raises as it does serially. Each worker then
waits for that collective and copies its part back into its own tensor, so
its ``all_reduce`` returns as it would have. When to hold and when to issue
depends only on the schedule, so every rank coalesces the same calls.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, TYPE_CHECKING

import torch
import torch.distributed.distributed_c10d as c10d
from torch.distributed.distributed_c10d import ReduceOp

from ._calls import ASYNC_THEN_WAIT, backends_are_torchs, group_of
from ._thread_state import Issuing


if TYPE_CHECKING:
    from ._calls import Call
    from ._mailbox import Mailbox


__all__: list[str] = []

# Larger tensors gain little from sharing a collective and would cost a copy.
MAX_BYTES = 64 * 1024

# Elementwise reductions only: those give the same result on a concatenation.
_OPS = (ReduceOp.SUM, ReduceOp.AVG, ReduceOp.PRODUCT, ReduceOp.MIN, ReduceOp.MAX)


def coalescing_key(call: Call) -> tuple[Any, ...] | None:
    """What must agree for calls to share a collective; None if ``call`` cannot."""
    if call.fn is not c10d.all_reduce or call.plan is not ASYNC_THEN_WAIT:
        return None
    # A group written in Python, issuing for several items at once, could
    # need what one of them holds (and may lack the coalesced forms).
    if not backends_are_torchs(group_of(call)):
        return None
    tensor = call.kwargs["tensor"]
    # Anything c10d might refuse, or that a copy back could treat differently
    # from c10d, goes alone.
    if (
        type(tensor) is not torch.Tensor
        or tensor.layout != torch.strided
        or not tensor.is_contiguous()
        or tensor.is_inference()
        or tensor.is_conj()  # c10d refuses these; a concatenation would resolve them
        or tensor.is_neg()
        or torch._C._functorch.is_functorch_wrapped_tensor(tensor)
    ):
        return None
    if tensor.numel() * tensor.element_size() > MAX_BYTES:
        return None
    op = next((known for known in _OPS if call.kwargs["op"] == known), None)
    if op is None:
        return None
    # The stream only matters on CUDA; a CPU call's recorded stream depends on
    # whether any thread has initialized CUDA yet, which is timing.
    stream = call.cuda_stream if tensor.is_cuda else None
    # The collective goes out under the first call's state: its modes must agree.
    modes: tuple[int, ...] = ()
    if call.state is not None:
        modes = tuple(map(id, call.state.modes))
    return (call.kwargs["group"], op, tensor.dtype, tensor.device, stream, modes)


def issue_coalesced(calls: list[Call]) -> list[Any]:
    """Issue ``calls``, which share a key, as one all_reduce.

    Returns, for each call, what its plan's ``finish`` waits on: an object
    whose ``wait`` also copies the call's part of the result back.
    """
    first = calls[0]
    tensors = [call.kwargs["tensor"] for call in calls]
    stream = first.cuda_stream if tensors[0].is_cuda else None
    on_stream = (
        torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    )
    issuing = None if first.state is None else Issuing(first.state)
    try:
        with torch.no_grad(), on_stream:
            flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
            work = c10d.all_reduce(
                flat, op=first.kwargs["op"], group=first.kwargs["group"], async_op=True
            )
    finally:
        if issuing is not None:
            issuing.restore()  # under no_grad: no autograd node to number
    if work is None:  # this rank is not in the group: nothing to reduce
        return [None] * len(calls)
    shared = _WaitOnce(work)
    parts: list[Any] = []
    start = 0
    for tensor in tensors:
        parts.append(_Part(shared, flat, start, tensor))
        start += tensor.numel()
    return parts


class _WaitOnce:
    """The shared collective; waited for once, by the first part's worker.

    On CUDA, ``wait`` makes the current stream wait for the collective. The
    parts share one stream, and the lock orders every later part's copy
    after that wait on it.
    """

    def __init__(self, work: Any) -> None:
        self._work = work
        self._lock = threading.Lock()
        self._done = False

    def wait(self) -> None:
        with self._lock:
            if not self._done:
                self._work.wait()
                self._done = True


class _Part:
    """One call's share of a coalesced all_reduce, as its plan's ``finish`` sees it."""

    def __init__(
        self, shared: _WaitOnce, flat: torch.Tensor, start: int, tensor: torch.Tensor
    ) -> None:
        self._shared = shared
        self._flat = flat
        self._start = start
        self._tensor = tensor

    def wait(self) -> bool:
        self._shared.wait()
        tensor = self._tensor
        part = self._flat[self._start : self._start + tensor.numel()]
        # Through .data, so that autograd's version counter stays as c10d's
        # in-place all_reduce leaves it: a tensor saved for backward stays usable.
        tensor.data.copy_(part.view(tensor.shape))
        return True


class HeldCalls:
    """The all_reduces the coordinator holds back, all with one key, with their items.

    Held calls go out together right before anything else is issued, and
    before the coordinator waits on a slot whose call it holds: at the latest
    when its visit comes back round.
    """

    def __init__(self) -> None:
        self.boxes: list[Mailbox] = []  # the items whose calls are held
        self._calls: list[Call] = []
        self._key: tuple[Any, ...] | None = None

    def must_go_before(self, key: tuple[Any, ...] | None) -> bool:
        """Whether the held calls go out before a call with ``key`` (None: not coalescable)."""
        return bool(self.boxes) and key != self._key

    def add(self, box: Mailbox, call: Call, key: tuple[Any, ...]) -> None:
        self.boxes.append(box)
        self._calls.append(call)
        self._key = key

    def take(self) -> list[tuple[Mailbox, Call]]:
        held = list(zip(self.boxes, self._calls, strict=True))
        self.boxes, self._calls, self._key = [], [], None
        return held
