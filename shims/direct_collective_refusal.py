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
attaches the two functions. When a thread refuses while torch's own methods
are in place, each collective method is replaced by a function that checks
the calling thread's flag and calls the original. Torch's own come back when
no thread refuses and a thread that never refused (the one that called
``parallel_map``, after it returned) calls one of the methods. So a process
that never runs ``parallel_map`` runs torch's methods, so does the caller
once its calls have returned, and setting a flag, which a worker does twice
around each call it issues, replaces nothing while other threads refuse or
the issuing worker itself makes the call. (Putting them back as soon as no
thread refused, an earlier form of this shim, put ~50 class attributes back
and forth on every issue of a lone worker's calls: more than the issue
itself costs.) Setting a flag is still a Python call that takes a lock, to
keep the count of refusing threads (issues are one at a time, so the lock
is not contended), where the patch's is a C++ ``thread_local`` write; while
the methods are replaced, each direct call passes a Python check, where the
patch's is one C++ branch. Other differences from the patch: a method looked
up while torch's own are in place (``f = pg.allreduce`` before a
``parallel_map`` call) and called on a refusing thread is not checked; a
thread that ends with its flag set stays in the count and keeps the methods
replaced; and ``METHODS`` also lists the five ``*_single`` methods of torch
2.13, which the patch does not reach yet. Nothing in the series imports this
module.
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


class _Flag(threading.local):
    refuse = False  # this thread refuses direct calls
    refused = False  # it has refused at some time


_flag = _Flag()
_lock = threading.Lock()  # guards _refusing and _installed, and the swaps
_refusing = 0  # threads whose flag is set (tests read it: workers clear theirs)
_installed = False
# (class, name, original, guarded), filled by _attach
_guards: list[tuple[type, str, Callable[..., Any], Callable[..., Any]]] = []


def _set_refuse_direct_collectives(refuse: bool) -> None:
    global _refusing, _installed
    refuse = bool(refuse)
    if _flag.refuse == refuse:
        return
    with _lock:
        if refuse:
            _flag.refused = True
            if not _installed:  # before the flag is set: no call slips through
                for cls, name, _, guarded in _guards:
                    setattr(cls, name, guarded)
                _installed = True
        _refusing += 1 if refuse else -1
        _flag.refuse = refuse


def _refuses_direct_collectives() -> bool:
    return _flag.refuse


def _put_back() -> None:
    """Torch's own methods again, unless a thread refuses meanwhile."""
    global _installed
    with _lock:
        if _installed and not _refusing:
            # First: an interrupt in the loop (the caller's thread gets Ctrl-C)
            # must leave the next refusal to install every guard again.
            _installed = False
            for cls, name, original, _ in _guards:
                setattr(cls, name, original)


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _flag.refuse:
            raise RuntimeError(MESSAGE)
        if not _refusing and not _flag.refused:
            _put_back()
        return original(self, *args, **kwargs)

    method.__name__ = method.__qualname__ = original.__name__
    method.__doc__ = original.__doc__
    return method


def _attach() -> None:
    c10d = getattr(torch._C, "_distributed_c10d", None)
    if c10d is None:  # a build without torch.distributed
        return
    c10d._set_refuse_direct_collectives = _set_refuse_direct_collectives
    c10d._refuses_direct_collectives = _refuses_direct_collectives
    for cls in (c10d.ProcessGroup, c10d.Backend):
        for name in METHODS:
            if name in cls.__dict__:
                original = cls.__dict__[name]
                _guards.append((cls, name, original, _guarded(original)))


_attach()
