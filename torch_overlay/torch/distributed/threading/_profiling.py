"""Spans that show parallel_map's schedule in a ``torch.profiler`` trace.

Users find their bottleneck with ``torch.profiler`` and a trace viewer
(Perfetto, ``chrome://tracing``), so the schedule labels what each thread
does there, as ``record_function`` spans:

* ``parallel_map item <i>``: a worker runs ``fn`` on item ``i``;
* ``parallel_map wait <op>``: a worker waits for the schedule to issue its
  call (its turn), then for the issue's outcome;
* ``parallel_map issue <op> (item <i>, call <k>)``: a thread issues a call at
  its turn (the coordinating thread, or a worker holding the schedule's
  turn: the calling worker, or the one before it issuing it for that item).

A worker waiting for an issued collective to complete is inside the
collective itself, which the profiler already records. Items run under the
caller's profiler state (see ``_thread_state``), so a profiler started on the
calling thread records them, with their ops, as it would the loop's body;
what a worker does outside an item is recorded only with
``torch.profiler.profile(experimental_config=torch._C._profiler.
_ExperimentalConfig(profile_all_threads=True))``. With no profiler
active, :func:`span` is one read of the flag ``torch.profiler`` sets when a
profile starts, and returns a shared no-op context; the per-call paths
(an issue, a wait) read that flag themselves first, since even a no-op
context costs Python calls there.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.autograd.profiler as autograd_profiler


if TYPE_CHECKING:
    from contextlib import AbstractContextManager


__all__: list[str] = []

_NO_SPAN = contextlib.nullcontext()


def span(what: str, detail: object) -> AbstractContextManager[object]:
    """A ``parallel_map <what> <detail>`` span while a profiler records; else a no-op."""
    if not autograd_profiler._is_profiler_enabled:
        return _NO_SPAN
    return torch.profiler.record_function(f"parallel_map {what} {detail}")
