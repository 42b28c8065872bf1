"""An item's mailbox: what is in flight between its worker and the turn.

A worker posts its item's next event (a :class:`~._calls.Call` or
:class:`ItemEnded`) to the turn (``_turn``) and, unless it issues the call
itself, waits on its mailbox for one :data:`Message`: a :class:`Reply`, or a
:class:`Signal`. The turn owns the mailbox's state, under its lock.
"""

from __future__ import annotations

import enum
import queue
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING, TypeAlias

from ._order import Route


if TYPE_CHECKING:
    from ._calls import Call
    from ._thread_state import ItemNumbers


__all__: list[str] = []


@dataclass(slots=True)
class Reply:
    """To a worker: the outcome of issuing its call."""

    value: Any = None
    error: BaseException | None = None


@dataclass(slots=True)
class ItemEnded:
    """From a worker: its item returned or raised."""

    result: Any = None
    error: BaseException | None = None


class Signal(enum.Enum):
    """To a worker, instead of a reply."""

    CANCEL = enum.auto()  # the call is stopping: do not issue
    YOUR_TURN = enum.auto()  # you hold the turn: issue your call yourself


Message: TypeAlias = "Reply | Signal"
Event: TypeAlias = "Call | ItemEnded"


class BoxState(enum.Enum):
    RUNNING = enum.auto()  # nothing posted that the schedule has not taken
    PENDING = enum.auto()  # an event waits for the holder
    OWED = enum.auto()  # the holder took its call and owes it YOUR_TURN or its Reply
    ENDED = enum.auto()  # the coordinator took its end
    CANCELLED = enum.auto()  # CANCEL sent


class Mailbox:
    """One item, and what is in flight between its worker and the schedule.

    At most one message is in flight each way, so ``CANCEL`` never overtakes
    a reply its worker waits for.
    """

    def __init__(self, index: int, item: Any, numbers: ItemNumbers) -> None:
        self.index = index
        self.item = item
        self.numbers = numbers  # its autograd sequence numbers
        self.replies: queue.SimpleQueue[Message] = queue.SimpleQueue()
        # Owned by the Turn, under its lock:
        self.state = BoxState.RUNNING
        self.pending: Event | None = None
        self.pending_route = Route.COORDINATOR
        # Owned by the item's worker:
        self.calls = 0  # calls posted so far
        self.cancelled = False  # got CANCEL, or posted after the stop

    def __repr__(self) -> str:
        return f"<item {self.index} {self.state.name}>"
