"""Demo: a loop with a collective per item, serial and with ``parallel_map``.

    scripts/demo [--workload loss|seed] [--world-size N] [--items N]
                 [--max-workers N] [--seconds S | --repeat N]

``loss`` (default): the item is one decoder layer's loss of a DETR-style
detector (``layer_loss.py``): Hungarian matching of predictions to targets in
Python, label encoding, a few small tensor ops and a ``reduce_mean``-style
``all_reduce`` of the number of positives, which every loss term divides by.
The loop is ``multi_apply``-style, one call per layer over two lists:
``parallel_map(layer_loss, cls_scores, bbox_preds)``.

``seed``: the first demo's item (``workload.py``): 256x256 matmuls, a Python
loop and a scalar ``all_reduce``; the serial loop already uses both cores in
its matmuls, so threads have little to add.

Both loops run on every rank in rounds, back to back, for ``--seconds``
(default 20) or ``--repeat`` rounds; every rank checks that ``parallel_map``'s
results equal its serial loop's in every round. Rank 0 prints each rank's
median times and the median of the rounds' own ratios: on a virtual machine
whose single-thread speed changes within seconds, a ratio taken within one
round is what stays put.

Each round also runs the same items on as many raw threads, unordered, with
no schedule: the reference for what threads give this item on this machine
now, whatever the schedule costs. Free-threaded reference counting of objects
that several threads share, or that another thread made, can make an item's
Python slower on two threads than on one, so the reference is the item
itself, not some other Python. At world size 1 the raw threads run the item
as it is (a collective of one rank gives the same result in any order); with
more ranks, unordered collectives would pair wrongly across ranks, so they
run it without its collectives (a collective hook on those threads skips
them; the column says so).

What rank 0 prints, column by column:

- ``serial``, ``parallel_map``: medians over the rounds. ``serial`` is the
  faster of the loop run with the rank's cores as intra-op threads and with
  the workers' count (cores per rank // max_workers, at least 1), since small
  kernels can be slower split over threads; ``parallel_map`` gives each
  worker that count, and so do the raw threads.
- ``speedup``: the median of each round's serial / parallel_map, and
  ``middle half``: the middle half of those ratios.
- ``raw threads``: the median of each round's serial / raw threads.
- ``of raw``: the median of each round's raw threads / parallel_map time: the
  share of what threads give this item that ``parallel_map`` keeps.
- ``results``: on every rank, ``parallel_map``'s results equal the serial
  loop's, every round.

The demo starts its own ranks on one machine, or, under ``torchrun``, runs as
one rank per process, unchanged; that is also how it scales to many machines::

    E=~/.cache/torch-dist-threading/env-ft/bin
    cd benchmarks && $E/torchrun --nproc-per-node 2 demo.py

Dated runs, with their commands and output: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import parallel_map

from _launch import gil_enabled, interpreter_summary, run_ranks
from layer_loss import DecoderOutputs
from workload import Workload

DESCRIPTIONS = {
    "loss": "item = one decoder layer's loss (DETR-style): Hungarian matching in Python, "
            "label encoding, small tensor ops, all_reduce of the number of positives",
    "seed": "item = 10 x two 256x256 matmuls, a 16,000-step Python loop, a scalar all_reduce",
}
DEFAULT_ITEMS = {"loss": 6, "seed": 8}
_MIN_ROUNDS = 3


def _loop(workload: str, items: int) -> tuple[Callable[..., Any], Sequence[Sequence[Any]]]:
    """The item function and its argument lists, for this rank."""
    if workload == "loss":
        # Data parallel: every rank has its own images, hence its own positives.
        outputs = DecoderOutputs.create(layers=items, seed=dist.get_rank())
        return outputs.loss, (outputs.cls_scores, outputs.bbox_preds)
    work = Workload.create()
    return work, ([work.item_input(i) for i in range(items)],)


def _skip_collective(fn: Callable[..., Any], /, **kwargs: Any) -> None:
    """A collective hook that issues nothing (for the raw threads at world size > 1).

    The demo's items call synchronous collectives only, so no caller waits on
    the ``Work`` that this does not return.
    """
    return None


class _RawThreads:
    """The items on raw threads, unordered: what threads give this item (see the module doc)."""

    def __init__(self, workers: int, intra_op_threads: int, with_collectives: bool) -> None:
        self._intra_op_threads = intra_op_threads
        self._with_collectives = with_collectives
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="demo-raw-thread",
                                        initializer=self._enter)

    def _enter(self) -> None:
        torch.set_num_threads(self._intra_op_threads)  # as parallel_map's workers
        if not self._with_collectives:
            _collective_hook.fn = _skip_collective

    def seconds(self, fn: Callable[..., Any], lists: Sequence[Sequence[Any]]) -> float:
        start = time.perf_counter()
        list(self._pool.map(fn, *lists))
        return time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown()


def _rounds(repeat: int | None, seconds: float) -> Iterator[int]:
    """Round numbers: ``repeat`` of them, or as many as fit in ``seconds``.

    Every rank must run the same rounds (each loop issues collectives), so in
    the timed case rank 0 decides and broadcasts, outside the timed loops.
    """
    if repeat is not None:
        yield from range(repeat)
        return
    start = time.monotonic()
    for n in itertools.count():
        go = torch.tensor([int(n < _MIN_ROUNDS or time.monotonic() - start < seconds)])
        dist.broadcast(go, src=0)
        if not go.item():
            return
        yield n


def _middle_half(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def _rank_body(workload: str, items: int, max_workers: int, repeat: int | None,
               seconds: float, cores_per_rank: int) -> None:
    torch.set_num_threads(cores_per_rank)
    rank = dist.get_rank()
    fn, lists = _loop(workload, items)
    # Reference results, computed with the intra-op thread count each worker
    # uses: a reduction's summation order can depend on it, and with it equal
    # the results must match bit for bit.
    worker_threads = max(1, cores_per_rank // max_workers)
    torch.set_num_threads(worker_threads)
    expected = list(map(fn, *lists))
    torch.set_num_threads(cores_per_rank)
    # The serial loop runs with the rank's cores as intra-op threads, as by
    # default, and with the workers' count: small kernels can be slower split
    # over threads (much slower when other processes hold the cores), so the
    # speedup is taken over the faster of the two.
    thread_counts = sorted({cores_per_rank, worker_threads})
    serial_times: dict[int, list[float]] = {n: [] for n in thread_counts}
    parallel_times: list[float] = []
    raw = _RawThreads(max_workers, worker_threads, with_collectives=dist.get_world_size() == 1)
    raw_times: list[float] = []
    for n in thread_counts:  # warm-up
        torch.set_num_threads(n)
        list(map(fn, *lists))
    torch.set_num_threads(cores_per_rank)
    parallel_map(fn, *lists, max_workers=max_workers)
    raw.seconds(fn, lists)
    # Each round runs every variant back to back, and the speedup is the median
    # over rounds of each round's own ratio: this virtual machine's speed of one
    # busy thread changes by up to 2x within seconds, which a ratio of medians
    # taken over a few seconds turns into a different answer on every run.
    try:
        for _ in _rounds(repeat, seconds):
            # Most threads first: idle OpenMP threads spin for a while after a
            # parallel region, which should not land on a loop that runs threads.
            # A barrier (untimed) before each timed loop: the raw threads at
            # world size > 1 skip their collectives, and a rank running ahead
            # would otherwise have its peer's lag land in its next timed loop.
            for n in reversed(thread_counts):
                torch.set_num_threads(n)
                dist.barrier()
                t0 = time.perf_counter()
                list(map(fn, *lists))
                serial_times[n].append(time.perf_counter() - t0)
            torch.set_num_threads(cores_per_rank)
            dist.barrier()
            t0 = time.perf_counter()
            parallel = parallel_map(fn, *lists, max_workers=max_workers)
            parallel_times.append(time.perf_counter() - t0)
            dist.barrier()
            raw_times.append(raw.seconds(fn, lists))
            if parallel != expected:
                raise SystemExit(f"rank {rank}: parallel_map results {parallel} differ from "
                                 f"the serial loop's {expected}")
    finally:
        raw.close()
    best = min(thread_counts, key=lambda n: statistics.median(serial_times[n]))
    ratios = [s / p for s, p in zip(serial_times[best], parallel_times, strict=True)]
    raw_speedups = [s / r for s, r in zip(serial_times[best], raw_times, strict=True)]
    of_raw = [r / p for r, p in zip(raw_times, parallel_times, strict=True)]
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (gil_enabled(), best, statistics.median(serial_times[best]),
                                      statistics.median(parallel_times), statistics.median(ratios),
                                      _middle_half(ratios), statistics.median(raw_speedups),
                                      statistics.median(of_raw)))
    if rank == 0:
        raw_label = "raw threads" if dist.get_world_size() == 1 else "raw, no collective"
        print(DESCRIPTIONS[workload])
        print(f"{interpreter_summary()}; world size {dist.get_world_size()}, {items} items, "
              f"max_workers={max_workers}, {cores_per_rank} core(s) per rank, "
              f"{len(parallel_times)} rounds")
        print(f"{'rank':>4}  {'GIL':3}  {'serial':>9}  {'parallel_map':>12}  {'speedup':>7}  "
              f"{'middle half':>11}  {raw_label:>18}  {'of raw':>6}")
        for r, (gil, _, serial_s, parallel_s, speedup, (low, high), raw_speedup,
                share) in enumerate(outcomes):
            print(f"{r:>4}  {'on' if gil else 'off':3}  {serial_s * 1e3:6.1f} ms  "
                  f"{parallel_s * 1e3:9.1f} ms  {speedup:6.2f}x  {low:5.2f}-{high:.2f}x  "
                  f"{raw_speedup:17.2f}x  {share:6.2f}")
        used = sorted({n for _, n, *_ in outcomes})
        print("times: medians over rounds; speedup: the median of each round's serial / "
              "parallel_map, and the middle half of those ratios")
        if dist.get_world_size() == 1:
            print(f"raw threads: the same items on {max_workers} raw threads, unordered (safe "
                  "at world size 1 only), the median of each round's serial / raw threads")
        else:
            print(f"raw, no collective: the same items on {max_workers} raw threads without "
                  "their collectives (unordered collectives would pair wrongly across ranks)")
        print("of raw: the median of each round's raw threads / parallel_map time: the share "
              "of what threads give this item that parallel_map keeps")
        print(f"serial: the faster of the loop with {' and '.join(map(str, thread_counts))} "
              f"intra-op thread(s) (here {' / '.join(map(str, used))}); parallel_map and raw "
              f"threads: {worker_threads} per worker")
        print(f"results: on every rank, parallel_map's {items} results equal the serial "
              "loop's, every round")


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(DESCRIPTIONS), default="loss",
                        help="loss: per-decoder-layer loss (default); seed: the first demo's item")
    # Threads only help when a rank has more than one core: on a 2-core machine
    # one rank gets both.
    parser.add_argument("--world-size", type=int, default=1 if cores < 4 else 2)
    parser.add_argument("--items", type=int, default=None,
                        help="decoder layers (loss, default 6) or items (seed, default 8)")
    parser.add_argument("--max-workers", type=int, default=None,
                        help="default: cores per rank")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help=f"how long to run rounds (default 20; at least {_MIN_ROUNDS} rounds)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="a fixed number of rounds instead of --seconds")
    args = parser.parse_args()
    if args.repeat is not None and args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.seconds < 0:
        parser.error(f"--seconds must not be negative, got {args.seconds}")
    world = int(os.environ.get("WORLD_SIZE", args.world_size))
    cores_per_rank = max(1, cores // world)
    max_workers = args.max_workers or cores_per_rank
    items = args.items or DEFAULT_ITEMS[args.workload]
    run_ranks(args.world_size, "gloo", _rank_body, args.workload, items, max_workers,
              args.repeat, args.seconds, cores_per_rank)


if __name__ == "__main__":
    main()
