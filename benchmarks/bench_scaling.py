"""Benchmark 4: speedup vs workers for a CPU-heavy item.

    python bench_scaling.py [--items 16] [--repeat 5] [--plot scaling.png] [--smoke]

Each item: a pure-Python loop and small matmuls (one intra-op thread), then
a scalar all_reduce; gloo, world size 1. Speedup is over the serial loop.
On a GIL build the Python part cannot overlap; on 3.14t it can, up to the
number of cores.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from torch.distributed.threading import parallel_map
from workload import Workload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 6, 8, 16])
    parser.add_argument("--plot", default=None, help="write a PNG here (needs matplotlib)")
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.repeat, args.workers = 2, 1, [1, 2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    work = Workload.create(size=64, python_iters=40_000, layers=4)
    inputs = [work.item_input(i) for i in range(args.items)]
    variants = {"serial": lambda: [work(x) for x in inputs]}
    for w in args.workers:
        variants[w] = lambda w=w: parallel_map(work, inputs, max_workers=w, intra_op_threads=1)
    medians = interleaved_medians(variants, repeat=args.repeat)
    header(f"scaling: CPU-heavy items (Python loop + 64x64 matmuls + all_reduce), "
           f"{args.items} items, {os.cpu_count()} cores, median of {args.repeat}")
    serial = medians["serial"]
    rows = [[w, medians[w] * 1e3, serial / medians[w]] for w in args.workers]
    table(["workers", "ms", "speedup"], [["serial", serial * 1e3, 1.0], *rows])
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(args.workers, [r[2] for r in rows], marker="o", label="parallel_map")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="serial")
        ax.set_xlabel("max_workers")
        ax.set_ylabel("speedup over serial loop")
        ax.set_title(f"CPU-heavy items, {os.cpu_count()} cores")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
