"""The warning logged when the coordinating thread has waited long for a slot's event."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import TYPE_CHECKING


if TYPE_CHECKING:
    from ._mailbox import Mailbox
    from ._worker import Worker


__all__: list[str] = []

logger = logging.getLogger(__name__)


def report_hang(
    workers: list[Worker], awaited: Mailbox, waited: float, issued: int
) -> None:
    """Log what each worker does, with its stack, and whether items may wait on each other."""
    frames = sys._current_frames()
    lines = [
        f"parallel_map has waited {waited:.0f} s for the next event of item {awaited.index} "
        f"({issued} collectives issued so far). Workers:"
    ]
    for worker in workers:
        state = worker.describe()
        thread = worker.thread
        lines.append(f"  {thread.name if thread else 'worker'}: {state}")
        frame = frames.get(thread.ident or -1) if thread else None
        if frame is not None and state != "idle":
            lines.extend(
                "    " + line.rstrip() for line in traceback.format_stack(frame)
            )
    lines.extend(_explain_wait(workers, awaited))
    logger.warning("\n".join(lines))


def _item_index(worker: Worker) -> int | None:
    box = worker.box
    return None if box is None else box.index


def _explain_wait(workers: list[Worker], awaited: Mailbox) -> list[str]:
    """What a hang report says about items that may wait for each other."""
    running = [w for w in workers if _item_index(w) == awaited.index]
    if not running or running[0].waiting_on is not None:
        return []  # the awaited item is itself in a collective
    queued = sorted(
        index
        for w in workers
        if w.waiting_for_issue and (index := _item_index(w)) is not None
    )
    if not queued:
        return []
    others = ", ".join(map(str, queued))
    return [
        f"Item {awaited.index} is running fn; the schedule issues the waiting calls of "
        f"items {others} only after item {awaited.index}'s next collective or its end. "
        f"If item {awaited.index} waits for something that one of those items does after "
        "its call (an event, a queue, a lock), this is a deadlock: items must not "
        "wait for each other (see the limits of parallel_map)."
    ]
