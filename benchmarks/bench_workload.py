"""Benchmark 1: the workload, serial vs raw threads vs parallel_map.

    python bench_workload.py [--device cpu|cuda] [--world-sizes 1 2] [--items 6]
                             [--workers 6] [--repeat 15] [--smoke]

Columns: the serial loop (with the collective); raw threads from a persistent
ThreadPoolExecutor *without* the collective (what threads could give if
collectives were free: the upper bound); parallel_map with the collective.
CPU runs use gloo; CUDA runs use NCCL at world size 1 and gloo with CUDA
tensors above (one GPU).
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from _launch import gil_enabled, run_ranks
from torch.distributed.threading import parallel_map
from workload import Workload


def _rank_body(device: str, items: int, workers: int, repeat: int, cores: int) -> None:
    torch.set_num_threads(cores)
    if device == "cuda":
        torch.cuda.set_device(0)
    work = Workload.create(device=device)
    bare = Workload.create(device=device, collective=False)
    inputs = [work.item_input(i) for i in range(items)]
    per_worker = max(1, cores // workers)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    with ThreadPoolExecutor(workers, initializer=torch.set_num_threads,
                            initargs=(per_worker,)) as pool:
        variants = {
            "serial": lambda: ([work(x) for x in inputs], sync()),
            "raw threads, no collective": lambda: (list(pool.map(bare, inputs)), sync()),
            "parallel_map": lambda: (parallel_map(work, inputs, max_workers=workers), sync()),
        }
        if device == "cuda":
            streams = [torch.cuda.Stream() for _ in inputs]

            def on_own_stream(i: int) -> object:
                with torch.cuda.stream(streams[i]):
                    return bare(inputs[i])

            variants["raw threads, stream per item"] = lambda: (
                list(pool.map(on_own_stream, range(len(inputs)))), sync())
            variants["stream per worker"] = lambda: (
                parallel_map(work, inputs, max_workers=workers, stream_per_worker=True), sync())
        medians = interleaved_medians(variants, repeat=repeat, warmup=2)
    # A tensor gather, not all_gather_object: that one needs numpy, which a
    # free-threaded GPU environment may lack.
    names = list(medians)
    mine = torch.tensor([*(medians[n] for n in names), float(gil_enabled())],
                        dtype=torch.float64, device=device)
    gathered_t = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_t, mine)
    gathered = [(dict(zip(names, t.tolist()[:-1], strict=True)), bool(t.tolist()[-1]))
                for t in gathered_t]
    if dist.get_rank() == 0:
        header(f"workload: {device}, world size {dist.get_world_size()} "
               f"({dist.get_backend()}), {items} items, {workers} workers, "
               f"median of {repeat} interleaved runs")
        rows = []
        for rank, (m, gil) in enumerate(gathered):
            serial = m["serial"]
            rows.append([rank, "on" if gil else "off", serial * 1e3,
                         *(serial / m[name] for name in list(m)[1:])])
        columns = ["raw threads, no collective x", "parallel_map x"]
        if device == "cuda":
            columns += ["raw threads, own streams x", "parallel_map, stream per worker x"]
        table(["rank", "GIL", "serial ms", *columns], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--items", type=int, default=6)
    parser.add_argument("--workers", type=int, default=None, help="default: cores per rank")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.repeat = 2, 1
    for world in args.world_sizes:
        cores = max(1, (os.cpu_count() or 1) // world)
        workers = args.workers or max(2, cores)
        backend = "nccl" if args.device == "cuda" and world == 1 else "gloo"
        run_ranks(world, backend, _rank_body, args.device, args.items, workers,
                  args.repeat, cores)


if __name__ == "__main__":
    main()
