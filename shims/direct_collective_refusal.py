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
attaches the two functions. The first time a thread refuses, each collective
method is replaced, for the life of the process, by a function that checks
the calling thread's flag and calls the original. Until then (in a process
that never runs ``parallel_map``) every thread runs torch's own methods.
Replacing them once, rather than while some thread refuses, keeps setting
the flag as cheap as the patch's: a worker clears and sets it around each
call it issues, and putting ~50 class attributes back and forth on every
issue would cost more than the issue itself. The price is a Python call in
front of each direct method call once a ``parallel_map`` has run, where the
patch's check is one C++ branch. Other differences from the patch: a method
looked up before the first thread refused (``f = pg.allreduce``) is not
checked, and ``METHODS`` also lists the five ``*_single`` methods of torch
2.13, which the patch does not reach yet. Nothing in the series imports
this module.
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
    refuse = False


_flag = _Flag()
_lock = threading.Lock()
_refusing = 0  # threads whose flag is set (for tests: workers clear theirs)
_installed = False
# (class, name, guarded), filled by _attach
_guards: list[tuple[type, str, Callable[..., Any]]] = []


def _set_refuse_direct_collectives(refuse: bool) -> None:
    global _refusing
    refuse = bool(refuse)
    if _flag.refuse == refuse:
        return
    if refuse and not _installed:
        _install_guards()  # before the flag is set: no call slips through
    with _lock:
        _refusing += 1 if refuse else -1
    _flag.refuse = refuse


def _refuses_direct_collectives() -> bool:
    return _flag.refuse


def _install_guards() -> None:
    global _installed
    with _lock:
        if not _installed:
            for cls, name, guarded in _guards:
                setattr(cls, name, guarded)
            _installed = True


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, /, *args: Any, **kwargs: Any) -> Any:
        if _flag.refuse:
            raise RuntimeError(MESSAGE)
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
                _guards.append((cls, name, _guarded(original)))


_attach()
