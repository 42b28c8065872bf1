"""``coordinated``: run a function on the coordinating thread when called from a worker."""

from __future__ import annotations

import functools
from typing import Any, TYPE_CHECKING, TypeVar

import torch
from torch.distributed.distributed_c10d import _collective_hook

from ._calls import call_coordinated


if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["coordinated"]

_R = TypeVar("_R")


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
