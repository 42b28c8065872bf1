"""Opt-in check that every rank issues the same schedule.

Before each collective the coordinating thread exchanges a fingerprint of it,
(item, call number, op, input shapes), with every other rank over a private
gloo group, and raises :class:`ScheduleMismatchError` naming the first
difference, instead of letting mismatched collectives hang or pair up wrongly.
It costs a round trip per collective: a debugging aid, on when
``TORCH_DISTRIBUTED_DEBUG=DETAIL`` or ``parallel_map(check_schedule=True)``.

It assumes what SPMD code does: every rank issues the same calls for the same
item. Point-to-point calls are compared by kind only (a send pairs a recv).
"""

from __future__ import annotations

import weakref
from typing import Any, TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ._errors import ScheduleMismatchError


if TYPE_CHECKING:
    from ._calls import Call


__all__: list[str] = []

_POINT_TO_POINT = frozenset(
    {
        "send",
        "recv",
        "isend",
        "irecv",
        "batch_isend_irecv",
        "send_object_list",
        "recv_object_list",
    }
)
# Ops whose tensors may legitimately differ in shape between ranks.
_SHAPELESS = _POINT_TO_POINT | {"all_to_all", "all_to_all_single"}

# One gloo group per default process group, created by the first checked call
# (which every rank makes, in the same order, like any collective). Held
# weakly: c10d's registry owns it, so destroy_process_group() ends it and its
# threads like any other group, and the next world gets a group of its own.
_check_groups: weakref.WeakValueDictionary[int, dist.ProcessGroup] = (
    weakref.WeakValueDictionary()
)


def _fingerprint(call: Call) -> tuple[Any, ...]:
    name = call.name
    if name in _POINT_TO_POINT:
        return (call.item, call.seq, "point-to-point")
    shapes: tuple[Any, ...] = ()
    if name not in _SHAPELESS:
        shapes = tuple(
            (key, tuple(value.shape), str(value.dtype))
            for key, value in _tensor_arguments(call.kwargs)
        )
    return (call.item, call.seq, name, shapes)


def _tensor_arguments(kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """Tensor arguments by name; a functional op's positional ones as ``args[i]``."""
    found = [
        (key, value) for key, value in kwargs.items() if isinstance(value, torch.Tensor)
    ]
    for i, value in enumerate(kwargs.get("args", ())):
        if isinstance(value, torch.Tensor):
            found.append((f"args[{i}]", value))
    return found


def _describe(fingerprint: tuple[Any, ...]) -> str:
    if fingerprint[0] == "start":
        return f"max_workers={fingerprint[1]}"
    if fingerprint[0] == "end":
        return f"no further collective (it issued {fingerprint[1]})"
    item, seq, name, *rest = fingerprint
    shapes = ", ".join(
        f"{key} {list(shape)} {dtype}"
        for key, shape, dtype in (rest[0] if rest else ())
    )
    return f"item {item} call {seq}: {name}" + (f" ({shapes})" if shapes else "")


class ScheduleCheck:
    """Compares the coordinating threads' schedules across all ranks."""

    def __init__(self, max_workers: int) -> None:
        if not dist.is_initialized():
            raise ValueError(
                "check_schedule=True needs an initialized default process group; "
                "call torch.distributed.init_process_group first"
            )
        default_group = c10d._get_default_group()
        key = id(default_group)
        group = _check_groups.get(key)
        # (A group of a destroyed world whose default group's id was reused.)
        if group is None or group not in c10d._world.pg_map:
            group = dist.new_group(backend="gloo")
            _check_groups[key] = group
        self._group = group
        self._exchange("start of parallel_map", ("start", max_workers))

    def before_issue(self, number: int, call: Call) -> None:
        self._exchange(f"collective #{number}", _fingerprint(call))

    def at_end(self, issued: int) -> None:
        self._exchange("end of parallel_map", ("end", issued))

    def _exchange(self, where: str, mine: tuple[Any, ...]) -> None:
        gathered: list[Any] = [None] * dist.get_world_size(self._group)
        dist.all_gather_object(gathered, mine, group=self._group)
        if all(other == mine for other in gathered):
            return
        ranks = "; ".join(f"rank {r}: {_describe(fp)}" for r, fp in enumerate(gathered))
        raise ScheduleMismatchError(
            f"parallel_map schedules differ between ranks at the {where}: {ranks}. Every "
            "rank must call parallel_map with the same items and max_workers, and each "
            "item must issue the same collectives in the same order on every rank."
        )
