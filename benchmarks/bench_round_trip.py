"""Benchmark: overlapping collective round trips, against the synchronous design.

    python bench_round_trip.py [--calls 100] [--repeat 5] [--round-trips-us 50 200 1000]
                               [--workers 1 2 4 8] [--cpu-us 0] [--plot PATH] [--smoke]

What parallel_map's issue-only design is for: a collective whose round trip is
long against the CPU work around it. W items run at once, each making --calls
synchronous 1-element all_reduces (after --cpu-us of Python work each), on a
group of the ``delayed`` backend (_delayed_backend.py): world size 1, one
process, every collective completing one round trip after its issue without
using a core meanwhile. parallel_map issues and lets each worker wait for its
own collective, so up to W round trips are in flight; the synchronous
round-robin baseline (_round_robin.py) runs each to completion, one at a time.
Where the round trip dominates, parallel_map should reach W times the
baseline's rate; the goal is at least 0.8 W ("ratio / W" >= 0.8). "direct
call" is one all_reduce on the calling thread, outside either: the round trip
as the items see it. One worker is timed, as in bench_throughput.py, as one
active item beside an empty one (max_workers=1 would run inline).
"""

from __future__ import annotations

import argparse
import functools
import threading
import time
from collections.abc import Callable, Sequence

import _delayed_backend
import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from _round_robin import round_robin_map

_Key = tuple[float, int, str]

_DESIGNS = ("parallel_map", "round robin")


def _spin(seconds: float) -> None:
    """Python work on this thread for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _item(group: dist.ProcessGroup, calls: int, cpu_s: float) -> Callable[[int], None]:
    """An item: ``calls`` synchronous 1-element all_reduces on ``group``."""

    def item(_: int) -> None:
        t = torch.zeros(1)
        for _ in range(calls):
            if cpu_s:
                _spin(cpu_s)
            dist.all_reduce(t, group=group)

    return item


def _variant(item: Callable[[int], None], workers: int, design: str) -> Callable[[], object]:
    """One timed run of ``workers`` items under ``design``."""
    from torch.distributed.threading import parallel_map

    def call(fn: Callable[[int], object], items: range, max_workers: int) -> object:
        if design == "round robin":
            return round_robin_map(fn, items, max_workers)
        return parallel_map(fn, items, max_workers=max_workers)

    if workers == 1:  # one active item beside an empty one, not inline
        return lambda: call(lambda i: item(i) if i == 0 else None, range(2), 2)
    return lambda: call(item, range(workers), workers)


def _plot(path: str, round_trips_us: Sequence[float], workers: Sequence[int],
          rates: dict[_Key, float]) -> None:
    """Collectives per second against workers: one line per round trip and design."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n, rt in enumerate(round_trips_us):
        for design, style in zip(_DESIGNS, ("-", "--"), strict=True):
            ax.plot(workers, [rates[rt, w, design] for w in workers], style, marker="o",
                    color=f"C{n}", label=f"{design}, {rt:g} us")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(workers), [str(w) for w in workers])
    ax.set_xlabel("workers (items at once)")
    ax.set_ylabel("all_reduces / s")
    ax.set_title("round trips overlapped: parallel_map vs round robin")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def run(calls: int, repeat: int, round_trips_us: Sequence[float], workers: Sequence[int],
        cpu_us: float, plot: str | None) -> None:
    """Time every (round trip, workers, design) and print the table.

    Args:
        calls: All_reduces per item.
        repeat: Timed runs of each variant; the median counts.
        round_trips_us: Round trips of the delayed groups, in microseconds.
        workers: Items run at once.
        cpu_us: Python work before each all_reduce, in microseconds.
        plot: Where to write the PNG, if anywhere.
    """
    torch.set_num_threads(1)
    dist.init_process_group(backend=_delayed_backend.BACKEND, store=dist.HashStore(),
                            rank=0, world_size=1)
    try:
        variants: dict[_Key, Callable[[], object]] = {}
        for rt in round_trips_us:
            group = dist.new_group([0], backend=_delayed_backend.BACKEND,
                                   pg_options=_delayed_backend.DelayedOptions(rt * 1e-6))
            item = _item(group, calls, cpu_us * 1e-6)
            variants[rt, 1, "direct"] = functools.partial(item, 0)
            for w in workers:
                for design in _DESIGNS:
                    variants[rt, w, design] = _variant(item, w, design)
        medians = interleaved_medians(variants, repeat=repeat)
    finally:
        dist.destroy_process_group()
    left = [t.name for t in threading.enumerate() if t.name == _delayed_backend.TIMER_THREAD_NAME]
    if left:
        raise RuntimeError(f"timer threads left after destroy_process_group: {left}")

    header(f"round-trip overlap: delayed backend (world 1), {calls} all_reduces per item, "
           f"{cpu_us:g} us of Python work before each, median of {repeat}")
    rates = {key: key[1] * calls / seconds for key, seconds in medians.items()}
    rows: list[list[object]] = []
    for rt in round_trips_us:
        direct_us = medians[rt, 1, "direct"] / calls * 1e6
        for w in workers:
            ours, theirs = rates[rt, w, "parallel_map"], rates[rt, w, "round robin"]
            rows.append([rt, w, direct_us, ours, theirs, ours / theirs, ours / theirs / w])
    table(["round trip (us)", "workers", "direct call (us)", "parallel_map all_reduces/s",
           "round-robin all_reduces/s", "ratio", "ratio / W (goal >= 0.8)"], rows)
    if plot:
        _plot(plot, round_trips_us, workers, rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--round-trips-us", type=float, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--cpu-us", type=float, default=0.0,
                        help="Python work before each all_reduce, microseconds")
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.repeat, args.round_trips_us, args.workers = 5, 1, [200.0], [1, 2]
    run(args.calls, args.repeat, args.round_trips_us, args.workers, args.cpu_us, args.plot)


if __name__ == "__main__":
    main()
