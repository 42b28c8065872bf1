"""Reproduce the rare gloo heap corruption outside the test harness.

``ParallelMapTest.test_functional_collectives_and_dtensor`` (functional
collectives and DTensor in items, gloo, two ranks) aborted a rank in a CI run
of 2026-12-07: glibc's "malloc(): unaligned tcache chunk detected", in a
gloo worker thread allocating for an all_reduce. This script runs that
test's item on two fresh ranks, RUNS times, and counts the runs in which a
rank died of a signal::

    python test/repro_gloo_heap.py --mode pm --runs 100
    python test/repro_gloo_heap.py --mode xwait --runs 100 --iters 10

Modes: ``pm`` runs five items with ``parallel_map(max_workers=3)``;
``serial`` runs the loop; ``pmcheck`` is ``pm`` with every issue counted,
aborting if the schedule ever issues two calls at once. ``xwait`` and
``samewait`` make no ``parallel_map`` call: one thread issues four of the
item's functional collectives for each of five items, then three other
threads (``xwait``) or the issuing thread (``samewait``) wait on them. Only
the ``pm`` modes import ``torch.distributed.threading``; a torch with this
repository's overlay installed still reads the (unset) collective hook in
every entry point.

With ``--cores DIR`` a crashed rank leaves a core file in a directory
DIR/run-N-* (where ``/proc/sys/kernel/core_pattern`` is a plain file name);
read it with ``gdb -batch -ex "thread apply all bt" PYTHON core``.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import threading
from typing import Any
from concurrent.futures import ThreadPoolExecutor


def _rank_main(mode: str, iters: int, rank: int, store_path: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Replicate, Shard

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
        # Issuer.issue and issue_coalesced are the one path of every issue,
        # whoever holds the turn (the coordinating thread, a worker issuing
        # its own call, a worker serving another's).
        from torch.distributed.threading import _issue

        inside, lock = [0], threading.Lock()

        def counted(plain: Any) -> Any:
            def issue(issuer: Any, *args: Any, **kwargs: Any) -> Any:
                with lock:
                    inside[0] += 1
                    if inside[0] > 1:
                        print(f"two issues at once: {args[0]}", flush=True)
                        os.abort()
                try:
                    return plain(issuer, *args, **kwargs)
                finally:
                    with lock:
                        inside[0] -= 1

            return issue

        for name in ("issue", "issue_coalesced"):
            setattr(_issue.Issuer, name, counted(getattr(_issue.Issuer, name)))

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
            from torch.distributed.threading import parallel_map

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

    env = {**os.environ, "LIBC_FATAL_STDERR_": "1"}  # glibc's abort message on stderr
    if args.cores:
        os.makedirs(args.cores, exist_ok=True)
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
        resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    aborted = failed = 0
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            # core files go to the rank's working directory where
            # /proc/sys/kernel/core_pattern is a plain file name
            cwd = tempfile.mkdtemp(prefix=f"run-{run}-", dir=args.cores) if args.cores else tmp
            cmd = [sys.executable, __file__, "--mode", args.mode, "--iters", str(args.iters)]
            store = ["--store", os.path.join(tmp, "store")]
            ranks = [
                subprocess.Popen(
                    [*cmd, "--rank", str(r), *store],
                    cwd=cwd,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for r in range(2)
            ]
            try:
                outputs = [p.communicate(timeout=600)[0] for p in ranks]
            finally:
                for p in ranks:
                    p.kill()
                    p.wait()
            codes = [p.returncode for p in ranks]
        if any(codes):
            # a signal (SIGABRT, SIGSEGV) is the corruption; another failure
            # is usually the peer's "connection reset" after that rank died
            if any(code < 0 for code in codes):
                aborted += 1
            else:
                failed += 1
            print(f"run {run}: exit codes {codes}")
            for r, out in enumerate(outputs):
                tail = [line for line in out.splitlines() if "alloc" in line or "issues" in line]
                print(f"  rank {r}: {tail[-3:]}")
    print(
        f"{args.mode}: {aborted} of {args.runs} runs aborted by a signal, "
        f"{failed} more failed otherwise"
    )


if __name__ == "__main__":
    main()
