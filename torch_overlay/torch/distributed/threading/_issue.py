"""Issuing a call at its turn: one path for every thread that holds the turn.

Whoever holds the turn (the coordinating thread, or a worker: for its own
call, or serving another item's) issues through :class:`Issuer`:

* on a worker, with the collective hook off, so the call is issued rather
  than handed over again (the coordinating thread of a nested call keeps its
  hook: it issues through the outer schedule);
* in a ``torch.profiler`` span (see ``_profiling``);
* inside the bypass detector's window (see ``_bypass``): the counters are
  checked right before the issue (:meth:`Issuer.clear_to_issue` on a worker,
  which leaves the call to the coordinator if they moved;
  :meth:`Issuer.check` on the coordinator, which raises) and read again
  right after, before anyone runs on.

The outcome belongs to the item whose call it is: a value, or an exception
raised by the issue or by the detector's read after it, goes back in the
item's :class:`~._turn.Reply` and is raised there, as the serial loop would
raise it in that item. Only an interrupt of the coordinating thread itself
(``KeyboardInterrupt``, ``SystemExit``) propagates from here: it stops the
whole call.
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING

import torch.autograd.profiler as autograd_profiler
from torch.distributed.distributed_c10d import _collective_hook

from ._bypass import set_collective_hook
from ._coalescing import issue_coalesced
from ._profiling import span
from ._mailbox import Reply


if TYPE_CHECKING:
    from ._bypass import BypassDetector
    from ._calls import Call


__all__: list[str] = []

logger = logging.getLogger(__name__)


def copy_of(error: BaseException) -> BaseException:
    """A copy of ``error`` for another thread to raise (each raise adds to its traceback)."""
    try:
        return copy.copy(error)
    except Exception:  # an exception type that cannot be rebuilt from its args
        return error


def _each_raising(error: BaseException, count: int) -> list[Reply]:
    return [Reply(error=error if n == 0 else copy_of(error)) for n in range(count)]


class Issuer:
    """Issues calls for their items; see the module doc."""

    def __init__(self, detector: BypassDetector | None) -> None:
        self._detector = detector

    def clear_to_issue(self) -> bool:
        """On a worker holding the turn: whether to issue (else the coordinator raises)."""
        if self._detector is None:
            return True
        try:
            return self._detector.clear_to_issue()
        except Exception:  # the coordinator's own check raises it
            return False

    def check(self, call: Call) -> None:
        """On the coordinator: raise if anything bypassed the schedule before ``call``."""
        if self._detector is not None:
            self._detector.before_issue(call)

    def issue(self, call: Call, *, on_worker: bool, own: bool = False) -> Reply:
        """Issue ``call`` on this thread, which holds the turn and has checked the
        window: a worker (``on_worker``), for its ``own`` call or another
        item's, or the coordinating thread."""
        hook = _collective_hook.fn
        if on_worker:
            set_collective_hook(None)  # issue for real, do not hand over again
        try:
            # Its own call, on its own thread, is in its own state already.
            # (The profiler's flag first: a span, even a no-op, costs calls.)
            if not autograd_profiler._is_profiler_enabled:
                reply = Reply(
                    call.plan.issue(call.fn, call.kwargs) if own else call.issue()
                )
            else:
                with span("issue", call):
                    reply = Reply(
                        call.plan.issue(call.fn, call.kwargs) if own else call.issue()
                    )
        except BaseException as error:
            if not (on_worker or isinstance(error, Exception)):
                raise  # the coordinating thread interrupted: the whole call stops
            reply = Reply(error=error)
        finally:
            if on_worker:
                set_collective_hook(hook)
            failed = self._close_window(call)
        return reply if failed is None else Reply(error=failed)

    def issue_coalesced(self, calls: list[Call]) -> list[Reply]:
        """On the coordinator: issue ``calls`` as one collective (see ``_coalescing``)."""
        self.check(calls[0])
        replies: list[Reply] = []
        try:
            with span("issue", f"{len(calls)} all_reduces coalesced"):
                replies = [Reply(part) for part in issue_coalesced(calls)]
        except Exception as error:  # raised in each item, as serial code would
            replies = _each_raising(error, len(calls))
        finally:
            failed = self._close_window(calls[0])
        return replies if failed is None else _each_raising(failed, len(calls))

    def _close_window(self, call: Call) -> Exception | None:
        """Read the counters right after ``call``'s issue; a failure is the call's."""
        if self._detector is None:
            return None
        try:
            self._detector.after_issue(call)
        except Exception as error:
            return error
        return None
