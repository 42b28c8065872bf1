"""The functional collective ops, routed through the collective hook.

The Python entry points of ``distributed_c10d`` and of functional collectives
call the thread's collective hook, but compiled code never runs them: Dynamo
traces through them (it does not trace into the hook, see
``distributed_c10d._CollectiveHook``) and records the dispatcher ops they end
in, ``torch.ops._c10d_functional.*``; ``aot_eager``'s FX graph and inductor's
Python wrapper code then call those ops directly. DTensor's redistributions
traced by AOTAutograd end up the same way. So the ops check the hook
themselves: while a top-level ``parallel_map`` runs (:class:`HookedOps`), the
callable that the ``OpOverload`` and ``OpOverloadPacket`` of each collective
op calls (its ``_op``) is a :class:`_HookedOp`, which hands the call to the
hook when the current thread has one, and otherwise calls the original. The
originals are back as soon as the outermost call returns, so code outside
``parallel_map`` runs exactly what it ran before (a wrapper that stayed would
cost every functional collective a Python call and a thread-local lookup).
Swapping is safe for threads that call the ops
meanwhile: the attribute holds either callable, and both issue the op.

The op objects keep their type and hash (inductor checks ``type(op) is
OpOverload``, and ops are dict keys), their copies are themselves, and a
packet's callable stays a TorchScript builtin, so only what a call does on a
worker changes, and every graph, traced on any thread, is the same graph.
The ops are a fixed list (``COLLECTIVE_OPS``): the namespaces also hold ops
that are not collectives, and which of those exist depends on what the
process imported, which must not change the schedule of one rank only.
``wait_tensor`` only waits for an issued collective: the worker waits itself.

These ops only enqueue the collective and return its output, so whoever
issues them at their turn in the schedule issues them without waiting.
A thread that calls them while tracing, not running, is handled by the hook
(see ``_coordinator``). C++ callers (inductor's C++ wrapper, AOTInductor)
are not reached here; the bypass detector reports them.
"""

from __future__ import annotations

from typing import Any, TYPE_CHECKING

import torch
from torch.distributed.distributed_c10d import _collective_hook

from ._calls import call_functional_op
from ._swap import Swap, SwappedWhileEntered


if TYPE_CHECKING:
    from collections.abc import Callable


__all__: list[str] = []

# The ops that issue a collective (or a point-to-point transfer), by namespace.
# A fixed list, not whatever the namespaces hold: other ops live there too
# (funcol's Python-defined _wrap_tensor_autograd, DTensor's
# mesh_get_process_group, wait_tensor, which only waits), and which of those
# are registered depends on what a process imported. Ops a release lacks are
# skipped.
COLLECTIVE_OPS = {
    "_c10d_functional": (
        "all_gather_into_tensor",
        "all_gather_into_tensor_coalesced",
        "all_gather_into_tensor_out",
        "all_reduce",
        "all_reduce_",
        "all_reduce_coalesced",
        "all_reduce_coalesced_",
        "all_to_all_single",
        "batch_p2p_ops",
        "broadcast",
        "broadcast_",
        "irecv",
        "isend",
        "reduce_scatter_tensor",
        "reduce_scatter_tensor_coalesced",
        "reduce_scatter_tensor_out",
    ),
    "_c10d_functional_autograd": (
        "all_gather_into_tensor",
        "all_to_all_single",
        "reduce_scatter_tensor",
    ),
    "_dtensor": ("shard_dim_alltoall",),
}


class _HookedOp:
    """Stands in for an op's C++ callable; see the module docstring."""

    __slots__ = ("__weakref__", "_op", "_original")

    def __init__(self, op: Any, original: Callable[..., Any]) -> None:
        self._op = op  # the OpOverload or OpOverloadPacket that calls us
        self._original = original
        # TorchScript resolves a packet by its callable: keep it a builtin.
        if (builtin := torch.jit._builtins._find_builtin(original)) is not None:  # type: ignore[no-untyped-call]
            torch.jit._builtins._register_builtin(self, builtin)

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        if (hook := _collective_hook.fn) is None:
            return self._original(*args, **kwargs)
        return hook(call_functional_op, op=self._op, args=args, kwargs=kwargs)

    def __hash__(self) -> int:
        return hash(self._original)  # OpOverload's hash is its callable's

    def __getattr__(self, name: str) -> Any:
        if name in _HookedOp.__slots__:  # not set yet: a copy being built
            raise AttributeError(name)
        return getattr(self._original, name)

    def __copy__(self) -> _HookedOp:
        return self  # like the op objects themselves

    def __deepcopy__(self, memo: dict[int, Any]) -> _HookedOp:
        return self

    def __repr__(self) -> str:
        return f"_HookedOp({self._original!r})"


def collective_op_names() -> list[str]:
    """Qualified names (``namespace::name``) of the ops :class:`HookedOps` hooks."""
    registered = set(torch._C._dispatch_get_all_op_names())
    return [
        qualified
        for namespace, names in COLLECTIVE_OPS.items()
        for name in names
        if (qualified := f"{namespace}::{name}") in registered
    ]


class HookedOps(SwappedWhileEntered):
    """While entered, the collective ops hand their calls to the collective hook.

    Entered by a top-level ``parallel_map`` around its schedule (see ``_swap``).
    """

    @classmethod
    def build_swaps(cls) -> list[Swap]:
        swaps: list[Swap] = []
        for qualified in collective_op_names():
            namespace, name = qualified.split("::")
            packet = getattr(getattr(torch.ops, namespace), name)
            ops = [
                packet,
                *(getattr(packet, overload) for overload in packet.overloads()),
            ]
            swaps.extend((op, "_op", op._op, _HookedOp(op, op._op)) for op in ops)
        return swaps
