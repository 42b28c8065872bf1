"""Demo: a serial loop with a collective per item, then the same on threads.

    scripts/demo [--world-size N] [--items N] [--max-workers N] [--repeat N]

Runs the workload of ``workload.py`` (tensor ops, a Python loop and a scalar
``all_reduce`` per item) as ``[work(x) for x in items]`` and as
``parallel_map(work, items)`` on every rank, checks that every rank's
parallel results equal its serial ones, and prints both times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.threading import parallel_map

from _launch import gil_enabled, interpreter_summary, run_ranks
from workload import Workload


def _rank_body(items: int, max_workers: int, repeat: int, cores_per_rank: int) -> None:
    torch.set_num_threads(cores_per_rank)
    rank = dist.get_rank()
    work = Workload.create()
    inputs = [work.item_input(i) for i in range(items)]
    serial_times, parallel_times = [], []
    # Reference results, computed with the intra-op thread count each worker
    # uses: matmul's summation order depends on it, and with it equal the
    # results must match bit for bit.
    worker_threads = max(1, cores_per_rank // max_workers)
    torch.set_num_threads(worker_threads)
    expected = [work(x) for x in inputs]
    torch.set_num_threads(cores_per_rank)
    [work(x) for x in inputs]  # warm-up
    for _ in range(repeat):  # interleaved, so drift in the machine hits both
        t0 = time.perf_counter()
        [work(x) for x in inputs]
        t1 = time.perf_counter()
        parallel = parallel_map(work, inputs, max_workers=max_workers)
        t2 = time.perf_counter()
        serial_times.append(t1 - t0)
        parallel_times.append(t2 - t1)
        if parallel != expected:
            raise SystemExit(f"rank {rank}: parallel_map results {parallel} differ from "
                             f"the serial loop's {expected}")
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (gil_enabled(), statistics.median(serial_times),
                                      statistics.median(parallel_times)))
    if rank == 0:
        print(interpreter_summary())
        print(f"world size {dist.get_world_size()}, {items} items, max_workers={max_workers}, "
              f"{cores_per_rank} core(s) per rank, median of {repeat} interleaved runs")
        for r, (gil, serial_s, parallel_s) in enumerate(outcomes):
            print(f"rank {r}: GIL {'on ' if gil else 'off'}  serial {serial_s * 1e3:8.1f} ms  "
                  f"parallel_map {parallel_s * 1e3:8.1f} ms  speedup {serial_s / parallel_s:4.2f}x")
        print("results: on every rank, parallel_map's results equal the serial loop's bit for "
              "bit (serial run with the workers' intra-op thread count)")


def main() -> None:
    cores = os.cpu_count() or 1
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Threads only help when a rank has more than one core: on a 2-core machine
    # one rank gets both.
    parser.add_argument("--world-size", type=int, default=1 if cores < 4 else 2)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--max-workers", type=int, default=None,
                        help="default: cores per rank")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", args.world_size))
    cores_per_rank = max(1, cores // world)
    max_workers = args.max_workers or cores_per_rank
    run_ranks(args.world_size, "gloo", _rank_body, args.items, max_workers, args.repeat,
              cores_per_rank)


if __name__ == "__main__":
    main()
