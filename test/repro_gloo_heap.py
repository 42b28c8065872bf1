"""Reproduce the rare gloo heap corruption outside the test harness.

``ParallelMapTest.test_functional_collectives_and_dtensor`` (functional
collectives and DTensor in items, gloo, two ranks) has aborted a rank a few
times in CI: glibc's "malloc(): unaligned tcache chunk detected", in a gloo
worker thread allocating for an all_reduce. This script runs the same item
on two fresh ranks, RUNS times, and counts the runs that died::

    python test/repro_gloo_heap.py --mode pm --runs 100
    python test/repro_gloo_heap.py --mode serial --runs 100

Modes: ``pm`` runs the items with ``parallel_map(max_workers=3)``;
``serial`` runs the loop; ``pmcheck`` is ``pm`` with every issue counted,
aborting if the schedule ever issues two calls at once; ``xwait`` uses no
``parallel_map``: one thread issues every item's functional collectives and
three other threads wait on them (``samewait``: the issuing thread waits). With ``--cores DIR``
a crashed rank leaves a core file in DIR/run-N (``gdb -batch -ex "thread
apply all bt" PYTHON core``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor


def _rank_main(mode: str, iters: int, rank: int, store_path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Replicate, Shard
    from torch.distributed.threading import parallel_map

    ws = 2
    dist.init_process_group("gloo", store=dist.FileStore(store_path, ws), rank=rank, world_size=ws)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (ws,))
    world = dist.group.WORLD

    def full(value: float) -> torch.Tensor:
        return torch.full((2,), float(value))

    def item(i: int) -> dict[str, torch.Tensor]:
        v = i * 100 + rank
        out = {
            "all_reduce": funcol.all_reduce(full(v), "sum", world),
            "broadcast": funcol.broadcast(full(v), i % ws, world),
            "all_gather": funcol.all_gather_tensor(full(v), 0, world),
            "reduce_scatter": funcol.reduce_scatter_tensor(
                torch.cat([full(v + q) for q in range(ws)]), "sum", 0, world
            ),
            "all_to_all": funcol.all_to_all_single(
                torch.cat([full(1000 * i + 10 * rank + q) for q in range(ws)]),
                None,
                None,
                world,
            ),
            "coalesced": torch.cat(funcol.all_reduce_coalesced([full(v), full(v)], "sum", world)),
        }
        x = torch.arange(4 * ws, dtype=torch.float32) + i
        d = distribute_tensor(x, mesh, [Shard(0)])
        out["replicate"] = (d * 2).redistribute(mesh, [Replicate()]).to_local()
        out["sum"] = d.sum().full_tensor()
        return {k: torch.as_tensor(t).clone() for k, t in out.items()}

    if mode == "pmcheck":
        from torch.distributed.threading import _calls

        inside, lock = [0], threading.Lock()
        plain = _calls.Call._issue_on_stream

        def counted(call: _calls.Call) -> object:
            with lock:
                inside[0] += 1
                if inside[0] > 1:
                    print(f"two issues at once: {call}", flush=True)
                    os.abort()
            try:
                return plain(call)
            finally:
                with lock:
                    inside[0] -= 1

        _calls.Call._issue_on_stream = counted  # type: ignore[method-assign]

    def issue(i: int) -> list[torch.Tensor]:
        v = i * 100 + rank
        return [
            funcol.all_reduce(full(v), "sum", world),
            funcol.all_gather_tensor(full(v), 0, world),
            funcol.all_to_all_single(torch.cat([full(v), full(v)]), None, None, world),
            *funcol.all_reduce_coalesced([full(v), full(v)], "sum", world),
        ]

    pool = ThreadPoolExecutor(3)
    for _ in range(iters):
        if mode in ("xwait", "samewait"):
            # torch only: this thread issues every item's functional
            # collectives; three other threads (or this one) wait on them
            issued = [issue(i) for i in range(5)]
            if mode == "xwait":
                list(pool.map(lambda ts: [t.clone() for t in ts], issued))
            else:
                [[t.clone() for t in ts] for ts in issued]
            continue
        if mode == "serial":
            results = [item(i) for i in range(5)]
        else:
            results = parallel_map(item, range(5), max_workers=3)
        for i, out in enumerate(results):
            expected = (torch.arange(4 * ws, dtype=torch.float32) + i).sum()
            assert torch.equal(out["sum"], expected), (i, out["sum"])
    pool.shutdown()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=["pm", "serial", "pmcheck", "xwait", "samewait"], default="pm"
    )
    parser.add_argument("--runs", type=int, default=20, help="fresh pairs of ranks")
    parser.add_argument("--iters", type=int, default=3, help="calls per run")
    parser.add_argument("--cores", help="keep core files of crashed ranks here")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        _rank_main(args.mode, args.iters, args.rank, args.store)
        return

    died = 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            cwd = tmp
            if args.cores:
                cwd = os.path.join(args.cores, f"run-{run}")
                os.makedirs(cwd, exist_ok=True)
                resource.setrlimit(resource.RLIMIT_CORE, (-1, -1))
            cmd = [sys.executable, __file__, "--mode", args.mode, "--iters", str(args.iters)]
            store = ["--store", os.path.join(tmp, "store")]
            ranks = [
                subprocess.Popen(
                    [*cmd, "--rank", str(r), *store],
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for r in range(2)
            ]
            outputs = [p.communicate(timeout=600)[0] for p in ranks]
            codes = [p.returncode for p in ranks]
        if any(codes):
            died += 1
            print(f"run {run}: exit codes {codes}")
            for r, out in enumerate(outputs):
                tail = [line for line in out.splitlines() if "alloc" in line or "issues" in line]
                print(f"  rank {r}: {tail[-3:]}")
    print(f"{args.mode}: {died} of {args.runs} runs died")


if __name__ == "__main__":
    main()
