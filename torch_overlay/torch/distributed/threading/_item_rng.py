"""``item_generator``: a random generator of the calling item's own.

The items of ``parallel_map`` run concurrently and share torch's default
generators, so which item draws which numbers depends on thread timing; when
the draws decide an item's collectives, ranks diverge. ``item_generator``
gives each item its own generator instead, seeded from the caller's
:func:`torch.initial_seed` and the item's place, which is the same on every
rank and in every run: the number of the top-level ``parallel_map`` call in
this process, the item's index and, for a nested call, the number of that
call within the outer item and the inner item's index. The generators are
created lazily, one per device, and live as long as the item.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
from dataclasses import dataclass, field

import torch


__all__ = ["item_generator"]

# Top-level calls made in this process so far. Every rank makes the same
# parallel_map calls, so the count agrees across ranks.
_top_level_calls = itertools.count()


@dataclass
class ItemPlace:
    """Where an item is: what its generators are seeded from."""

    seed: int
    path: tuple[int, ...]
    nested_calls: int = 0
    generators: dict[torch.device, torch.Generator] = field(default_factory=dict)


_current_item: contextvars.ContextVar[ItemPlace | None] = contextvars.ContextVar(
    "torch.distributed.threading.item", default=None
)


def call_place() -> tuple[int, tuple[int, ...]]:
    """For a ``parallel_map`` call about to start: its items' seed and path prefix."""
    outer = _current_item.get()
    if outer is None:
        return torch.initial_seed(), (next(_top_level_calls),)
    outer.nested_calls += 1  # only the outer item's own thread runs this
    return outer.seed, (*outer.path, outer.nested_calls - 1)


def enter_item(seed: int, path: tuple[int, ...], index: int) -> None:
    """Mark the current context (the item's own copy) as item ``index``'s."""
    _current_item.set(ItemPlace(seed, (*path, index)))


def _seed_of(place: ItemPlace, device: torch.device) -> int:
    text = repr((place.seed, place.path, device.type)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def item_generator(device: torch.device | str | int | None = None) -> torch.Generator:
    """The calling item's own random generator on ``device``.

    Inside ``fn`` of :func:`parallel_map`, returns a :class:`torch.Generator`
    that belongs to the calling item: the same object each time the item asks
    for the same device, seeded from :func:`torch.initial_seed` (as the
    caller had it) and the item's place (the number of the top-level
    ``parallel_map`` call in this process, the item's index, and the place of
    enclosing items for a nested call). Pass it as ``generator=`` to random
    ops: what an item draws then depends neither on thread timing nor on
    ``max_workers``, and is the same on every rank and in every run whose
    ranks were seeded alike and made the same ``parallel_map`` calls.

    Outside ``parallel_map`` it returns the default generator of ``device``,
    which is what random ops use without ``generator=``.

    Args:
        device: The generator's device; CPU when ``None``. An int or a CUDA
            device without index means that CUDA device, or the current one.

    Returns:
        A generator on ``device``.

    Example::

        >>> # xdoctest: +SKIP("needs an initialized process group")
        >>> def layer_drop_step(x):
        ...     g = item_generator()
        ...     for layer in layers:
        ...         if torch.rand((), generator=g) > 0.1:  # same choice on every rank
        ...             x = layer(x)  # may call collectives
        ...     return x
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    place = _current_item.get()
    if place is None:
        if device.type == "cpu":
            return torch.default_generator
        if device.type == "cuda":
            default: torch.Generator = torch.cuda.default_generators[device.index or 0]
            return default
        raise ValueError(
            f"item_generator() outside parallel_map supports cpu and cuda, "
            f"not {device.type}"
        )
    generator: torch.Generator | None = place.generators.get(device)
    if generator is None:
        generator = torch.Generator(device)
        generator.manual_seed(_seed_of(place, device))
        place.generators[device] = generator
    return generator
