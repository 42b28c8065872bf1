"""The functional collective ops, handed to the collective hook.

The Python entry points of ``distributed_c10d`` and of functional collectives
call the thread's collective hook, but compiled code never runs them: Dynamo
traces through them (it does not trace into the hook, see
``distributed_c10d._CollectiveHook``) and records the dispatcher ops they end
in, ``torch.ops._c10d_functional.*``; ``aot_eager``'s FX graph and inductor's
Python wrapper code then call those ops directly, as does the backward of a
functional collective. DTensor's redistributions traced by AOTAutograd end
up the same way. Those ops call ``torch._ops``' own per-thread hook
(``_CollectiveOpHook``), which a thread with a collective hook sets to
:func:`functional_op_hook` (see ``_bypass.set_collective_hook``): the op's
call goes to the schedule like any entry point's, as a
:func:`~torch.distributed.threading._calls.call_functional_op`. Other threads,
and other ops, are untouched.

These ops only enqueue the collective and return its output, so whoever
issues them at their turn in the schedule issues them without waiting.
``wait_tensor`` only waits for an issued collective: the worker waits itself.
A thread that calls them while tracing, not running, is handled by the hook
(see ``_worker``). C++ callers (inductor's C++ wrapper, AOTInductor) are not
reached here; the bypass detector reports them.
"""

from __future__ import annotations

from typing import Any

from torch.distributed.distributed_c10d import _collective_hook

from ._calls import call_functional_op


__all__: list[str] = []


def functional_op_hook(op: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``torch._ops``' collective op hook on a thread with a collective hook."""
    hook = _collective_hook.fn
    if hook is None:  # set and cleared together with it: a bug
        raise AssertionError(
            f"{op} reached the op hook of a thread without a collective hook"
        )
    return hook(call_functional_op, op=op, args=args, kwargs=kwargs)
