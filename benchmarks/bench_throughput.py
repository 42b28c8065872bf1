"""Benchmark 3: coordinator throughput, collectives per second vs workers.

    python bench_throughput.py [--calls 500] [--repeat 7] [--world-sizes 1 2] [--smoke]

W items run at once, each issuing --calls tiny (1-element) all_reduces
back to back; gloo. The coordinator only issues, so the rate should grow
with W until the coordinating thread itself is the limit. The coalesced
columns use coalesce_all_reduces=True: the calls met in one visit of the
slots share one collective, which pays off where a collective costs more
than the copies around it (a round trip to another rank, not world size 1).
The round-robin columns time the same items under the synchronous
round-robin design (_round_robin.py), the baseline parallel_map replaces.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from _launch import run_ranks
from _round_robin import round_robin_map


def _rank_body(calls: int, repeat: int, workers: list[int]) -> None:
    from torch.distributed.threading import parallel_map

    torch.set_num_threads(1)

    def item(_: int) -> None:
        t = torch.zeros(1)
        for _ in range(calls):
            dist.all_reduce(t)

    def run(w: int, how: str):
        def call(fn, items, max_workers):
            if how == "round robin":
                return round_robin_map(fn, items, max_workers)
            return parallel_map(fn, items, max_workers=max_workers,
                                coalesce_all_reduces=how == "coalesced")

        # max_workers=1 would run inline (not intercepted): time a 1-worker
        # schedule as one item beside an empty one.
        if w == 1:
            return lambda: call(lambda i: item(i) if i == 0 else None, range(2), 2)
        return lambda: call(item, range(w), w)

    hows = ("plain", "coalesced", "round robin")
    variants = {(w, how): run(w, how) for w in workers for how in hows}
    medians = interleaved_medians(variants, repeat=repeat)
    if dist.get_rank() != 0:
        return
    header(f"coordinator throughput: gloo world {dist.get_world_size()}, {calls} tiny "
           f"all_reduces per item, median of {repeat}")
    base = workers[0] * calls / medians[workers[0], "plain"]
    rows = []
    for w in workers:
        rate, coalesced, round_robin = (
            w * calls / medians[w, how] for how in ("plain", "coalesced", "round robin")
        )
        rows.append([w, rate, rate / base, round_robin, rate / round_robin, coalesced,
                     coalesced / rate])
    table(["workers", "all_reduces/s", "vs 1 worker", "round-robin all_reduces/s",
           "vs round robin", "coalesced all_reduces/s", "coalesced vs not"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.repeat, args.workers = 5, 1, [1, 2]
    for world in args.world_sizes:
        run_ranks(world, "gloo", _rank_body, args.calls, args.repeat, args.workers)


if __name__ == "__main__":
    main()
