"""Timing and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from _launch import gil_enabled, interpreter_summary

_Key = TypeVar("_Key", bound=Hashable)

__all__ = ["gil_enabled", "header", "interleaved_medians", "table"]


def header(title: str) -> None:
    print(f"\n## {title}\n{interpreter_summary()}")


def interleaved_medians(
    variants: dict[_Key, Callable[[], object]], repeat: int, warmup: int = 1
) -> dict[_Key, float]:
    """Median seconds of each variant, run round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[_Key, list[float]] = {name: [] for name in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table, so results paste into README as they are."""
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
