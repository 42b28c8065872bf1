"""Run a loop body on threads, with ``torch.distributed`` collectives inside it.

:func:`parallel_map` replaces ``[fn(x) for x in items]`` when ``fn`` calls
collectives: workers run ``fn`` concurrently, and every collective they call
is handed to the calling thread, which issues them in a schedule that is the
same on every rank. See :func:`parallel_map` for the guarantees.
"""

from ._parallel_map import coordinated, parallel_map


__all__ = ["coordinated", "parallel_map"]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
