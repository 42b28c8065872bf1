"""Benchmark 3: coordinator throughput, collectives per second vs workers.

    python bench_throughput.py [--calls 500] [--repeat 7] [--smoke]

W items run at once, each issuing --calls tiny (1-element) all_reduces
back to back; gloo, world size 1. The coordinator only issues, so the rate
should grow with W until the coordinating thread itself is the limit.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from torch.distributed.threading import parallel_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.repeat, args.workers = 5, 1, [1, 2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def item(_: int) -> None:
        t = torch.zeros(1)
        for _ in range(args.calls):
            dist.all_reduce(t)

    def run(workers: int):
        # max_workers=1 would run inline (not intercepted): time a 1-worker
        # schedule as one item beside an empty one.
        if workers == 1:
            return lambda: parallel_map(lambda i: item(i) if i == 0 else None, range(2),
                                        max_workers=2)
        return lambda: parallel_map(item, range(workers), max_workers=workers)

    medians = interleaved_medians({w: run(w) for w in args.workers}, repeat=args.repeat)
    header(f"coordinator throughput: gloo world 1, {args.calls} tiny all_reduces per item, "
           f"median of {args.repeat}")
    base = None
    rows = []
    for w in args.workers:
        rate = w * args.calls / medians[w]
        base = base or rate
        rows.append([w, rate, rate / base])
    table(["workers", "collectives/s", "vs 1 worker"], rows)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
