"""Run a loop body on threads, with ``torch.distributed`` collectives inside it.

:func:`parallel_map` replaces ``[fn(x) for x in items]`` when ``fn`` calls
collectives: workers run ``fn`` concurrently, and every collective they call
goes to a schedule that issues them in an order that is the same on every
rank. See :func:`parallel_map` for the guarantees.
:func:`item_generator` gives each item a random generator of its own, so that
random draws do not depend on thread timing either.
"""

from ._errors import (
    CollectiveBypassError,
    CollectiveCancelledError,
    ScheduleMismatchError,
)
from ._item_rng import item_generator
from ._coordinated import coordinated
from ._parallel_map import parallel_map


__all__ = [
    "CollectiveBypassError",
    "CollectiveCancelledError",
    "ScheduleMismatchError",
    "coordinated",
    "item_generator",
    "parallel_map",
]

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
