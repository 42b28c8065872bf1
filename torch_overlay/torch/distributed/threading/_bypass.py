"""Detect, or refuse, collectives that reach a process group outside the schedule.

A collective issued outside the schedule goes out in a timing-dependent
order: on another rank it pairs with a different collective, and the job
computes wrong numbers or hangs, without an error. The schedule sees every
Python entry point and functional collective op, and DDP's C++ collectives
called from Python (through the hooked functions of
``torch.distributed.utils``); not a direct ``ProcessGroup`` method call, a
C++ caller (DDP's reducer, autograd's device threads running a
communicating backward), nor a thread that ``fn`` starts.

*Refused* before anything is issued: a thread that has the collective hook
(a worker) refuses the collective methods of ``ProcessGroup`` and
``Backend`` called directly (:func:`set_collective_hook` sets both; the
check is in c10d's bindings of those methods, and other threads pass it).

*Detected* after the fact, by counters: process groups count the
collectives issued on them (``_get_sequence_number_for_group``). The
:class:`BypassDetector` snapshots them when the schedule starts; whoever
issues at the turn checks right before issuing that nothing moved since
the last issue ended, and reads them again right after (``_issue``); the
coordinating thread advancing the iterable does the same (``_feeder``). At
the end every group is checked once more, groups created meanwhile
included. A change outside these windows raises
:class:`CollectiveBypassError`. A collective another thread issues *inside*
a window counts as the schedule's; code that bypasses once usually does so
again outside one. ``dist._coalescing_manager`` keeps collectives in
process-wide state: workers may not enter it, and the schedule does not
issue while it is active. Backends without counters, groups built
outside the registry (``c10d._world.pg_map``) and the schedule check's own
groups (``exclude``: their collectives are the check's) are not counted;
``TORCH_DISTRIBUTED_THREADING_DETECT_BYPASS=0`` turns detection off. The
detector is used only by the thread that holds the turn: the turn is its lock.
"""

from __future__ import annotations

import logging
import os
from typing import Any, TYPE_CHECKING

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch._C._distributed_c10d import _set_refuse_direct_collectives
from torch._ops import _collective_op_hook
from torch.distributed.distributed_c10d import _collective_hook

from ._calls import call_coordinated
from ._errors import CollectiveBypassError
from ._op_hook import functional_op_hook


if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._calls import Call


__all__: list[str] = []

logger = logging.getLogger(__name__)

ENV_VAR = "TORCH_DISTRIBUTED_THREADING_DETECT_BYPASS"

# Calls that may create process groups, whose counters are then read too.
_MAY_CREATE_GROUPS = frozenset(
    {"new_group", "new_subgroups", "split_group", call_coordinated.__name__}
)

_CAUSES = (
    "Ranks match collectives by order, so results may be wrong or the job may hang. "
    "Likely causes: a direct ProcessGroup method call in fn (use the torch.distributed "
    "function instead); a C++ caller such as DistributedDataParallel's reducer (run "
    "DDP's backward outside parallel_map); a thread that fn starts and that issues "
    "collectives (issue them from fn itself); a collective in a backward pass run by "
    f"autograd's device threads (run backward outside parallel_map). Set {ENV_VAR}=0 "
    "to turn this check off."
)


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") not in ("0", "false", "False", "no", "off")


def _group_name(group: dist.ProcessGroup) -> str:
    try:
        name: str = group.group_name
    except Exception:
        name = "?"
    if group is c10d.GroupMember.WORLD:
        return f"the default group ({name!r})"
    return f"group {name!r} (ranks {dist.get_process_group_ranks(group)})"


def _counters(group: dist.ProcessGroup) -> list[Callable[[], int]]:
    """The counters of ``group``'s backends; empty when they have none."""
    found: list[Callable[[], int]] = []
    seen: set[int] = set()
    for device in group._device_types:
        backend = group._get_backend(device)
        if id(backend) in seen:
            continue
        seen.add(id(backend))
        read: Callable[[], int] | None = getattr(
            backend, "_get_sequence_number_for_group", None
        )
        if read is None:
            continue
        try:
            read()
        except Exception:  # no counter: a fake or custom backend
            continue
        found.append(read)
    return found


def coalescing_manager_error(what: str) -> CollectiveBypassError:
    return CollectiveBypassError(
        f"parallel_map: dist._coalescing_manager {what}: it holds the collectives of "
        "every thread back in process-wide state and issues them from the thread that "
        "leaves it, outside the schedule. Inside parallel_map use all_reduce_coalesced, "
        "or coalesce_all_reduces=True."
    )


def _group_ids() -> set[int]:
    return (
        {id(group) for group in c10d._world.pg_map} if dist.is_initialized() else set()
    )


class BypassDetector:
    """Checks that the process groups count nothing between the schedule's issues."""

    def __init__(self, exclude: Iterable[dist.ProcessGroup] = ()) -> None:
        self._exclude = {id(group) for group in exclude}
        # Where dist._coalescing_manager keeps its state (one dict, process-wide).
        self._coalescing: dict[Any, Any] = c10d._world.pg_coalesce_state
        # One counter per backend; a group with several backends has several.
        self._readers: list[Callable[[], int]] = []
        self._groups: list[dist.ProcessGroup] = []  # the group of each counter
        self._counts: list[int] = []  # after the last issue
        self._seen: list[int] = []  # at the last check
        self._before_iterable: list[int] = []
        self._groups_before_iterable: set[int] = set()
        self._snapshot()

    def _snapshot(self) -> None:
        """Find the groups and read their counters."""
        self._readers, self._groups = [], []
        if dist.is_initialized():
            for group in list(c10d._world.pg_map):
                if id(group) not in self._exclude:
                    for read in _counters(group):
                        self._readers.append(read)
                        self._groups.append(group)
        self._counts = [read() for read in self._readers]

    def unchanged(self) -> bool:
        """Whether no group counted a collective since the last issue ended."""
        self._seen = [read() for read in self._readers]
        return self._seen == self._counts

    def clear_to_issue(self) -> bool:
        """Whether :meth:`before_issue` would not raise."""
        return (
            not self._coalescing and [read() for read in self._readers] == self._counts
        )

    def before_issue(self, call: Call) -> None:
        """Raise if anything reached a group since the last issue; call right before issuing."""
        if self._coalescing:
            raise coalescing_manager_error(
                f"cannot issue {call.name} while it is active"
            )
        if not self.unchanged():
            self._raise(f"before {call.name}", [])

    def after_issue(self, call: Call) -> None:
        """Right after ``call`` was issued (or failed to), by the same thread."""
        if call.fn.__name__ in _MAY_CREATE_GROUPS:
            self._snapshot()
        else:
            self._counts = [read() for read in self._readers]

    def before_iterable(self) -> None:
        """Right before the coordinator advances the iterable.

        The iterable runs on the coordinating thread at fixed points of the
        schedule, so what it issues itself is the schedule's. Nothing is
        raised here: a change seen now is still seen at the next issue.
        """
        self._before_iterable = [read() for read in self._readers]
        self._groups_before_iterable = _group_ids()

    def after_iterable(self) -> None:
        """Right after the iterable yielded, ended or raised, by the same thread.

        Counts what it issued as the schedule's, and learns the groups it
        created; what moved before it, and groups created before it, stay
        changes.
        """
        now = [read() for read in self._readers]
        self._counts = [
            count + after - before
            for count, before, after in zip(
                self._counts, self._before_iterable, now, strict=True
            )
        ]
        if dist.is_initialized():
            known = self._groups_before_iterable | self._exclude
            for group in list(c10d._world.pg_map):
                if id(group) not in known:
                    for read in _counters(group):
                        self._readers.append(read)
                        self._groups.append(group)
                        self._counts.append(read())

    def at_end(self) -> None:
        created = self._created_groups()
        if not self.unchanged() or created:
            self._raise("at the end of parallel_map", created)

    def _raise(self, where: str, created: list[tuple[dist.ProcessGroup, int]]) -> None:
        moved: dict[int, tuple[dist.ProcessGroup, int]] = {}
        for group, before, now in zip(
            self._groups, self._counts, self._seen, strict=True
        ):
            if now != before:
                moved[id(group)] = (
                    group,
                    moved.get(id(group), (group, 0))[1] + now - before,
                )
        described = [f"{_group_name(group)} +{n}" for group, n in moved.values()] + [
            f"{_group_name(group)}, created outside the schedule, +{n}"
            for group, n in created
        ]
        raise CollectiveBypassError(
            "parallel_map: a collective reached a process group outside the schedule "
            f"(detected {where}): {', '.join(described)} collective(s) that the schedule "
            f"did not issue. {_CAUSES}"
        )

    def _created_groups(self) -> list[tuple[dist.ProcessGroup, int]]:
        """Groups the detector does not know, that counted collectives."""
        if not dist.is_initialized():
            return []
        known = {id(group) for group in self._groups} | self._exclude
        created = []
        for group in list(c10d._world.pg_map):
            readers = [] if id(group) in known else _counters(group)
            if count := sum(read() for read in readers):
                created.append((group, count))
        return created


def make_detector(exclude: Iterable[dist.ProcessGroup]) -> BypassDetector | None:
    """A detector for a top-level schedule, or None when detection is off."""
    if not enabled():
        return None
    return BypassDetector(exclude)


def set_collective_hook(hook: Callable[..., Any] | None) -> None:
    """Set this thread's collective hook, its op hook, and whether it refuses direct calls.

    A thread with a hook hands its collectives to the schedule, the functional
    collective ops included (``torch._ops``' op hook, see ``_op_hook``), so it
    must not reach a process group by calling a ``ProcessGroup`` or
    ``Backend`` method directly: c10d's bindings of those methods raise on it.
    Whoever issues at the turn clears the hooks, and with them the refusal,
    for the issue.
    """
    _set_refuse_direct_collectives(hook is not None)
    _collective_op_hook.fn = None if hook is None else functional_op_hook
    _collective_hook.fn = hook
