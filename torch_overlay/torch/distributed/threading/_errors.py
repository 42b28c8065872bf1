"""The exceptions that ``parallel_map`` raises of its own, exported for users to catch."""

from __future__ import annotations


__all__ = ["CollectiveBypassError", "CollectiveCancelledError", "ScheduleMismatchError"]


class CollectiveBypassError(RuntimeError):
    """A collective reached a process group without going through the schedule.

    Ranks match collectives by the order they are issued in, so results may
    be wrong or the job may hang; the message names the groups whose
    counters moved and the likely causes.
    """


class ScheduleMismatchError(RuntimeError):
    """Ranks are about to issue different collectives, or use different ``max_workers``.

    Raised only with ``check_schedule`` on.
    """


class CollectiveCancelledError(RuntimeError):
    """Raised at a collective of an item that ``parallel_map`` stopped: it was not issued.

    Once an item has failed (or the caller was interrupted), items that ran
    ahead of the schedule get this at their next collective, so that every
    rank issues the same collectives. ``parallel_map`` itself raises the
    first item's failure, not this.
    """
