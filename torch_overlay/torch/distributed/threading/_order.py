"""The schedule's order: whose event comes next, decided without threads.

``W`` slots; slot ``s`` starts with item ``s``. The schedule visits the
slots that hold an item in a fixed cyclic order and, at each visit, takes
the next event of that slot's item: after a call it moves to the next slot;
after the item's end the slot takes the next item not yet in a slot (none
once an item has failed, or at the end of the items) and the schedule moves
on. This depends only on each item's own sequence of calls and on ``W``, so
every rank issues the same collectives in the same order. :class:`SlotCycle`
is that decision, pure: the turn (``_turn``) calls it, whichever thread holds
the turn.

:func:`route` decides, once per call, which threads may issue it.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar


__all__: list[str] = []

_T = TypeVar("_T")


class Route(enum.Enum):
    """Which thread may issue a call at its turn."""

    # Only the coordinating thread: a call that runs to completion (object
    # collectives, group creation, ``coordinated`` functions), one it holds
    # back to coalesce, and an item's end.
    COORDINATOR = enum.auto()
    # The call's own worker too, holding the turn: a call that only enqueues work.
    OWN_WORKER = enum.auto()
    # Any worker holding the turn: an enqueue-only call whose issue runs
    # only torch's code, so it cannot need something its item holds.
    ANY_HOLDER = enum.auto()


def route(
    *, only_enqueues: bool, coalesced: bool, runs_torch_only: bool = False
) -> Route:
    """A call's route: ``only_enqueues`` (its issue returns once the work is
    queued), ``coalesced`` (the coordinator holds it back), and
    ``runs_torch_only`` (no user code runs on its issue path). A worker
    routes its call first without asking the last (its own worker issues it
    if it takes the turn at once), and again with it if the call must wait."""
    if not only_enqueues or coalesced:
        return Route.COORDINATOR
    return Route.ANY_HOLDER if runs_torch_only else Route.OWN_WORKER


class SlotCycle(Generic[_T]):
    """The slots that hold an item, and the position among them."""

    def __init__(self, first: list[_T]) -> None:
        self._slots = list(first)
        self._position = 0

    def __len__(self) -> int:
        return len(self._slots)

    def current(self) -> _T | None:
        """The item at the position; None when no slot holds one."""
        return self._slots[self._position] if self._slots else None

    def items(self) -> list[_T]:
        return list(self._slots)

    def after_call(self) -> _T:
        """The item at the position made a call: move to the next slot; returns its item."""
        self._position = (self._position + 1) % len(self._slots)
        return self._slots[self._position]

    def after_end(self, following: _T | None) -> None:
        """The item at the position ended: ``following`` takes its slot, or
        (None) the slot closes; then move on."""
        if following is not None:
            self._slots[self._position] = following
            self.after_call()
            return
        del self._slots[self._position]
        if self._slots:
            self._position %= len(self._slots)
