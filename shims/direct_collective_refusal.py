# Overlay shim, not part of the upstream series.
# Imitates: torch/csrc/distributed/c10d/init.cpp
"""What the series' c10d C++ patch does, for an installed wheel.

The patch ("[c10d] Let a thread refuse collectives called directly on a
ProcessGroup") gives the pybind bindings of ``ProcessGroup``'s and
``Backend``'s collective methods a first call guard that raises
``RuntimeError`` on a thread that refuses them, and binds the thread's flag
in ``torch._C._distributed_c10d``:

    _set_refuse_direct_collectives(refuse)  set this thread's flag
    _refuses_direct_collectives()           read it

A wheel's bindings cannot receive that edit, so ``scripts/overlay install``
installs this file as ``torch/_direct_collective_refusal_shim.py`` and
appends one import line to the wheel's ``torch/__init__.py``. Loading it
attaches the two functions. While at least one thread refuses, each
collective method is replaced by a function that checks the calling thread's
flag and calls the original; when the last thread stops refusing, the
originals are back. So while no thread refuses (no ``parallel_map`` runs),
every thread runs torch's own methods; while one does, every thread's call
passes the check, where the patch's is one C++ branch. Differences from the
patch: a method looked up before the first thread refused (``f =
pg.allreduce``) is not checked; a thread that ends with its flag set keeps
the methods replaced for good (workers clear theirs as they stop); and
``METHODS`` also lists the five ``*_single`` methods of torch 2.13, which the
patch does not reach yet. Nothing in the series imports this module.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

# What the patch's guard raises: the same text.
MESSAGE = (
    "This thread refuses collectives called directly on a ProcessGroup or Backend: its "
    "collectives go through torch.distributed's functions, which its caller orders (e.g. "
    "torch.distributed.threading.parallel_map). Call the torch.distributed function "
    "instead (dist.all_reduce, dist.broadcast, ...)."
)

# The methods the patch guards (a release binds a subset).
# fmt: off
METHODS = (
    "allreduce", "allreduce_coalesced", "broadcast", "allgather", "_allgather_base",
    "allgather_coalesced", "allgather_into_tensor_coalesced", "all_gather_single",
    "all_gather_single_coalesced", "gather", "scatter", "reduce", "reduce_scatter",
    "_reduce_scatter_base", "reduce_scatter_single", "reduce_scatter_single_coalesced",
    "reduce_scatter_tensor_coalesced", "alltoall", "alltoall_base", "all_to_all_single",
    "barrier", "monitored_barrier", "send", "recv", "recv_anysource", "_start_coalescing",
    "_end_coalescing", "eager_connect_single_device",
)
# fmt: on

_flag = threading.local()
_lock = threading.Lock()
_refusing = 0  # threads whose flag is set
# (class, name, original, guarded), filled by _install
_swaps: list[tuple[type, str, Callable[..., Any], Callable[..., Any]]] = []


def _set_refuse_direct_collectives(refuse: bool) -> None:
    global _refusing
    refuse = bool(refuse)
    if getattr(_flag, "refuse", False) == refuse:
        return
    with _lock:
        _flag.refuse = refuse
        _refusing += 1 if refuse else -1
        if _refusing == (1 if refuse else 0):  # the first one in, or the last one out
            for cls, name, original, guarded in _swaps:
                setattr(cls, name, guarded if refuse else original)


def _refuses_direct_collectives() -> bool:
    return getattr(_flag, "refuse", False)


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        if getattr(_flag, "refuse", False):
            raise RuntimeError(MESSAGE)
        return original(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = original.__name__
    method.__doc__ = original.__doc__
    return method


def _install() -> None:
    c10d = getattr(torch._C, "_distributed_c10d", None)
    if c10d is None:  # a build without torch.distributed
        return
    c10d._set_refuse_direct_collectives = _set_refuse_direct_collectives
    c10d._refuses_direct_collectives = _refuses_direct_collectives
    for cls in (c10d.ProcessGroup, c10d.Backend):
        for name in METHODS:
            if name in cls.__dict__:
                original = cls.__dict__[name]
                _swaps.append((cls, name, original, _guarded(original)))


_install()
