"""Attributes replaced only while a top-level ``parallel_map`` runs.

The hook of the functional collective ops, which compiled code calls
directly (see ``_op_hook``), replaces an attribute of torch's op objects, and
only for as long as a top-level ``parallel_map`` runs, so that code outside
it runs exactly what it ran before and pays nothing.
:class:`SwappedWhileEntered` is that one rule: the first entry replaces every
attribute, the last exit puts the originals back. One coordinating thread
enters at a time (``parallel_map`` admits one top-level call), and it may
enter again: a ``coordinated`` function on that thread may start another
call. A thread that reads an attribute meanwhile gets either callable, so
the hook must be right with both.
"""

from __future__ import annotations

import threading
from typing import Any

from ._interrupts import shielded


__all__: list[str] = []

# (object, attribute name, original, replacement)
Swap = tuple[Any, str, Any, Any]

_build_lock = threading.Lock()


class SwappedWhileEntered:
    """A context manager that swaps the attributes ``build_swaps`` lists; see the module doc."""

    _depth = 0
    _swaps: list[Swap] | None = None  # set on each subclass by ``swaps``

    @classmethod
    def build_swaps(cls) -> list[Swap]:
        """The swaps, computed once per subclass, on first entry."""
        raise NotImplementedError

    @classmethod
    def swaps(cls) -> list[Swap]:
        with shielded, _build_lock:
            built: list[Swap] | None = cls.__dict__.get("_swaps")
            if built is None:
                built = cls.build_swaps()
                cls._swaps = built
            return built

    def __enter__(self) -> None:
        cls = type(self)
        entered = False
        try:
            with shielded:  # all swaps or none, whenever a Ctrl-C comes
                if cls._depth == 0:
                    for owner, name, _, replacement in cls.swaps():
                        setattr(owner, name, replacement)
                cls._depth += 1
                entered = True
        # a Ctrl-C raised as the section ended: no __exit__ follows
        except BaseException:
            if entered:
                self.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        with shielded:
            cls._depth -= 1
            if cls._depth == 0:
                for owner, name, original, _ in cls.swaps():
                    setattr(owner, name, original)
