"""Benchmark: what the change costs compiled code outside parallel_map.

    python bench_compile.py [--backends eager inductor] [--repeat 3] [--calls 2000] [--smoke]

A compiled function with a collective (``dist.all_reduce``, which Dynamo
turns into a functional collective, then a small op) is compiled and run on
the calling thread, with no parallel_map anywhere, in a fresh process per
run: with this repository's overlay uninstalled (pristine torch), and
installed with ``torch.distributed.threading`` imported (the functional
collective ops then check the collective hook). Runs alternate between the
two. Reported per backend: the first call (compilation included) and the
steady-state time per call, medians. gloo, world size 1.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

from _bench import header, table

REPO = Path(__file__).resolve().parent.parent
_RUN = """
import sys, time, torch, torch.distributed as dist
backend, calls, hooked = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
if hooked:
    import torch.distributed.threading  # noqa: F401  (hooks the functional ops)
torch.set_num_threads(1)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

def step(x):
    y = x * 2
    dist.all_reduce(y)
    return y + 1

compiled = torch.compile(step, backend=backend, fullgraph=True)
x = torch.ones(4)
start = time.perf_counter()
compiled(x)
first = time.perf_counter() - start
for _ in range(100):
    compiled(x)
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    for _ in range(calls):
        compiled(x)
    best = min(best, (time.perf_counter() - start) / calls)
print(first, best)
dist.destroy_process_group()
"""


def _overlay(command: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts/overlay"), command,
                    "--python", sys.executable], check=True, capture_output=True)


def measure(backend: str, calls: int, repeat: int) -> dict[str, tuple[float, float]]:
    samples: dict[str, list[tuple[float, float]]] = {"pristine": [], "overlay": []}
    try:
        for rep in range(repeat):
            for state in ("pristine", "overlay")[:: 1 if rep % 2 else -1]:
                _overlay("uninstall" if state == "pristine" else "install")
                out = subprocess.run(
                    [sys.executable, "-c", _RUN, backend, str(calls),
                     "1" if state == "overlay" else "0"],
                    check=True, capture_output=True, text=True,
                )
                first, steady = (float(v) for v in out.stdout.split()[-2:])
                samples[state].append((first, steady))
    finally:
        _overlay("install")
    return {
        state: (statistics.median(f for f, _ in runs), statistics.median(s for _, s in runs))
        for state, runs in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["eager", "aot_eager", "inductor"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:  # no re-installs: one run of the installed state
        out = subprocess.run([sys.executable, "-c", _RUN, "eager", "10", "1"],
                             check=True, capture_output=True, text=True)
        print("smoke:", out.stdout.strip())
        return
    header(f"compiled all_reduce outside parallel_map: gloo world 1, fresh process per run, "
           f"median of {args.repeat}")
    rows = []
    for backend in args.backends:
        result = measure(backend, args.calls, args.repeat)
        (c0, s0), (c1, s1) = result["pristine"], result["overlay"]
        rows.append([backend, c0, c1, s0 * 1e6, s1 * 1e6, s1 / s0])
    table(["backend", "first call s, pristine", "first call s, overlay",
           "us/call, pristine", "us/call, overlay", "steady ratio"], rows)


if __name__ == "__main__":
    main()
