"""The edits of torch's ``.pyi`` stubs, generated: stubs of the C++ patches' bindings.

Each C++ patch of the series binds a few private functions (see
``patches/by-hand/``); their type stubs go next to a neighbour's in the stub
file. Stub files ship in the wheel, so the overlay applies these edits too
(mypy checks the package against them), while the bindings themselves come
from the overlay's shims (``shims/``).
"""

from __future__ import annotations

# Stub file -> (the line the stubs follow, the stubs).
_STUBS = {
    "torch/_C/_autograd.pyi": (
        "def _get_sequence_nr() -> int: ...\n",
        "def _set_sequence_nr(value: int) -> None: ...\n"
        "\n"
        "class _ThreadLocalState:\n"
        "    def __init__(self) -> None: ...\n"
        "\n"
        "def _set_thread_local_state(state: _ThreadLocalState) -> None: ...\n",
    ),
    "torch/_C/_distributed_c10d.pyi": (
        "def _set_global_rank(rank: int) -> None: ...\n",
        "def _set_refuse_direct_collectives(refuse: bool) -> None: ...\n"
        "def _refuses_direct_collectives() -> bool: ...\n",
    ),
}
PYIS = tuple(_STUBS)


def edit(path: str, source: str) -> str:
    """``source`` (a release's stub file ``path``) with the stubs added."""
    anchor, stubs = _STUBS[path]
    if source.count(anchor) != 1:
        raise ValueError(f"{path}: expected exactly one line {anchor.strip()!r}")
    return source.replace(anchor, anchor + stubs, 1)
