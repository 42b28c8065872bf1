"""The functional collective ops, routed through the collective hook.

The Python entry points of ``distributed_c10d`` and of functional collectives
call the thread's collective hook, but compiled code never runs them: Dynamo
traces through them (it does not trace into the hook, see
``distributed_c10d._CollectiveHook``) and records the dispatcher ops they end
in, ``torch.ops._c10d_functional.*``; ``aot_eager``'s FX graph and inductor's
Python wrapper code then call those ops directly. DTensor's redistributions
traced by AOTAutograd end up the same way. So the ops check the hook
themselves: :func:`install` wraps the callable that each ``OpOverload`` and
``OpOverloadPacket`` of those namespaces calls (its ``_op``) in a
:class:`_HookedOp`, which hands the call to the hook when the current thread
has one, and otherwise calls the original, at the cost of one thread-local
lookup.

The op objects keep their type and hash (inductor checks ``type(op) is
OpOverload``, and ops are dict keys), so only the callable changes, and
every graph, traced on any thread, is the same graph. ``wait_tensor`` only
waits for an issued collective, so it is left alone: the worker waits itself.

These ops only enqueue the collective and return its output, so whoever
issues them at their turn in the schedule issues them without waiting.
A thread that calls them while tracing, not running, is handled by the hook
(see ``_coordinator``). C++ callers (inductor's C++ wrapper, AOTInductor)
are not reached here; the bypass detector reports them.
"""

from __future__ import annotations

import threading
from typing import Any, TYPE_CHECKING

import torch
from torch.distributed.distributed_c10d import _collective_hook

from ._calls import call_functional_op


if TYPE_CHECKING:
    from collections.abc import Callable


__all__: list[str] = []

# Namespaces whose ops issue a collective (or a point-to-point transfer).
NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "_dtensor")
_NOT_COLLECTIVES = frozenset({"_c10d_functional::wait_tensor"})

_install_lock = threading.Lock()


class _HookedOp:
    """Stands in for an op's C++ callable; see the module docstring."""

    __slots__ = ("_op", "_original")

    def __init__(self, op: Any, original: Callable[..., Any]) -> None:
        self._op = op  # the OpOverload or OpOverloadPacket that calls us
        self._original = original

    def __call__(self, /, *args: Any, **kwargs: Any) -> Any:
        if (hook := _collective_hook.fn) is None:
            return self._original(*args, **kwargs)
        return hook(call_functional_op, op=self._op, args=args, kwargs=kwargs)

    def __hash__(self) -> int:
        return hash(self._original)  # OpOverload's hash is its callable's

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)

    def __repr__(self) -> str:
        return f"_HookedOp({self._original!r})"


def _hook(op: Any) -> None:
    if not isinstance(op._op, _HookedOp):
        op._op = _HookedOp(op, op._op)


def collective_op_names() -> list[str]:
    """Qualified names (``namespace::name``) of the ops :func:`install` hooks."""
    return sorted(
        name
        for name in torch._C._dispatch_get_all_op_names()
        if name.split("::")[0] in NAMESPACES and name not in _NOT_COLLECTIVES
    )


def install() -> None:
    """Hook every functional collective op; idempotent."""
    with _install_lock:
        for qualified in collective_op_names():
            namespace, name = qualified.split("::")
            packet = getattr(getattr(torch.ops, namespace), name)
            _hook(packet)
            for overload in packet.overloads():
                _hook(getattr(packet, overload))
