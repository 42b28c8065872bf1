"""The edit of ``torch/_C/_autograd.pyi``, generated: stubs of the C++ patch's bindings.

The series' C++ patch binds three functions in ``torch._C._autograd`` (see
``patches/by-hand/``); their type stubs go next to ``_get_sequence_nr``'s. The
stub file ships in the wheel, so the overlay applies this edit too (mypy
checks the package against it), while the bindings themselves come from the
overlay's shim (``shims/``).
"""

from __future__ import annotations

PYI = "torch/_C/_autograd.pyi"

_ANCHOR = "def _get_sequence_nr() -> int: ...\n"
_STUBS = (
    "def _set_sequence_nr(value: int) -> None: ...\n"
    "\n"
    "class _ThreadLocalState:\n"
    "    def __init__(self) -> None: ...\n"
    "\n"
    "def _set_thread_local_state(state: _ThreadLocalState) -> None: ...\n"
)


def edit(source: str) -> str:
    """``source`` (a release's ``_autograd.pyi``) with the stubs added."""
    if source.count(_ANCHOR) != 1:
        raise ValueError(f"{PYI}: expected exactly one line {_ANCHOR.strip()!r}")
    return source.replace(_ANCHOR, _ANCHOR + _STUBS, 1)
