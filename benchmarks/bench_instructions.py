"""Benchmark: what a call costs, counted in instructions.

    python bench_instructions.py [--what all_reduce op eager inductor own served]
                                 [--calls 2000] [--backend gloo|fake] [--smoke]

Wall times of a call that takes tens of microseconds cannot show a cost of a
few tenths of a microsecond on a shared 2-core machine, so this counts
instructions with callgrind (valgrind), which does not depend on what else
runs. Each case runs in a fresh process under callgrind with instrumentation
switched on (``callgrind_control -i on``) only around ``--calls`` calls, after
50 warm-up calls, with garbage collection off in between, once with zero
calls and once with ``--calls``: the difference divided by ``--calls`` is the
cost of one call, in every thread. The two processes also differ by up to a
few million instructions that are not the calls' (where callgrind switches
threads), hence the default of 2,000 calls. World size 1, gloo, or with
``--backend fake`` torch's fake backend, whose collectives complete at
issue: no gloo thread runs, so what is counted is the calls' own path.

Outside parallel_map (the cost of the change to code that does not use it):
both sides import the same modules (``torch._dynamo``, which
``torch.distributed.threading`` imports); the overlay is uninstalled for
"pristine" and installed, with ``torch.distributed.threading`` imported, for
"overlay". Cases: ``all_reduce``: ``dist.all_reduce`` (the hook line of the
entry points); ``after_map``: the same once a ``parallel_map`` has run and
its pooled threads have exited (the overlay's shim of the C++ refusal must
have put torch's methods back);
``op``: a functional all_reduce op and its ``wait_tensor``, what compiled
graphs call; ``eager`` / ``inductor``: a function compiled
with that backend, with ``dist.all_reduce`` inside.

Inside parallel_map (the schedule's cost per call), against the same
``dist.all_reduce`` on the calling thread with the overlay installed: ``own``:
one item of two makes the calls (its worker issues them itself); ``served``:
two items make them, so the holder of the turn issues many of the other
item's. One ``parallel_map`` call either way, so its own cost cancels out.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import header, table

REPO = Path(__file__).resolve().parent.parent
_RUN = """
import gc, os, subprocess, sys, time, torch, torch.distributed as dist
what, calls = sys.argv[1], int(sys.argv[2])
hooked, counting, backend = sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5]
import torch._dynamo  # noqa: F401  (imported on both sides)
if hooked:
    import torch.distributed.threading  # noqa: F401
torch.set_num_threads(1)
if backend == "fake":
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
else:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
x = torch.ones(4)
if what in ("all_reduce", "after_map"):
    fn = lambda: dist.all_reduce(x)
    if what == "after_map" and hooked:
        import threading
        from torch.distributed.threading import parallel_map
        parallel_map(lambda i: dist.all_reduce(x), range(2), max_workers=2)
        # Its pooled threads exit once idle (_pool.IDLE_TIMEOUT_S): not while counting.
        deadline = time.monotonic() + 60
        while any(t.name.startswith("parallel_map") for t in threading.enumerate()):
            assert time.monotonic() < deadline, "pooled threads still alive"
            time.sleep(0.1)
elif what == "op":
    all_reduce = torch.ops._c10d_functional.all_reduce.default
    wait = torch.ops._c10d_functional.wait_tensor.default
    group = dist.group.WORLD.group_name
    fn = lambda: wait(all_reduce(x, "sum", group))
elif what in ("own", "served"):
    from torch.distributed.threading import parallel_map
    active = 1 if what == "own" else 2
    def run(n):
        def item(i):
            if i < active:
                for _ in range(n // active):
                    dist.all_reduce(x)
        parallel_map(item, range(2), max_workers=2)
else:
    def step(x):
        y = x * 2
        dist.all_reduce(y)
        return y + 1
    compiled = torch.compile(step, backend=what, fullgraph=True)
    fn = lambda: compiled(x)
if what not in ("own", "served"):
    def run(n):
        for _ in range(n):
            fn()
run(50)
def instrument(state):
    if counting:
        subprocess.run(["callgrind_control", "-i", state, str(os.getpid())],
                       check=True, capture_output=True)
        time.sleep(0.5)  # callgrind polls for the command
gc.collect()
gc.disable()
instrument("on")
run(calls)
instrument("off")
gc.enable()
dist.destroy_process_group()
print("ok")
"""


_INSIDE = {"own": "own (its worker issues it)", "served": "served (two items calling)"}


def _overlay(command: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts/overlay"), command,
                    "--python", sys.executable], check=True, capture_output=True)


def _collected(what: str, calls: int, hooked: bool, backend: str, scratch: Path) -> int:
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no",
         f"--callgrind-out-file={scratch / 'callgrind.out'}",
         sys.executable, "-c", _RUN, what, str(calls), "1" if hooked else "0", "1", backend],
        check=True, capture_output=True, text=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    match = re.search(r"Collected : (\d+)", out.stderr)
    if match is None:
        raise RuntimeError(f"callgrind printed no count:\n{out.stderr[-2000:]}")
    return int(match.group(1))


def per_call(what: str, calls: int, hooked: bool, backend: str = "gloo") -> float:
    with tempfile.TemporaryDirectory() as scratch:
        base = _collected(what, 0, hooked, backend, Path(scratch))
        total = _collected(what, calls, hooked, backend, Path(scratch))
    return (total - base) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", nargs="+",
                        default=["all_reduce", "after_map", "op", "eager", "inductor", "own",
                                 "served"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", choices=["gloo", "fake"], default="gloo",
                        help="fake: collectives complete at issue (no gloo threads)")
    parser.add_argument("--smoke", action="store_true", help="tiny, uncounted: for CI")
    args = parser.parse_args()
    if args.smoke:  # the measured script once, natively, with the overlay as installed
        for what in ("all_reduce", "op", "served"):
            subprocess.run([sys.executable, "-c", _RUN, what, "2", "1", "0", "gloo"],
                           check=True)
        subprocess.run([sys.executable, "-c", _RUN, "own", "2", "1", "0", "fake"], check=True)
        print("smoke: ok")
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (Debian's package valgrind)")
    outside = [what for what in args.what if what not in _INSIDE]
    inside = [what for what in args.what if what in _INSIDE]
    try:
        if outside:
            header(f"instructions per call outside parallel_map (callgrind, {args.backend} "
                   f"world 1, {args.calls} calls)")
            rows = []
            for what in outside:
                _overlay("uninstall")
                pristine = per_call(what, args.calls, hooked=False, backend=args.backend)
                _overlay("install")
                overlay = per_call(what, args.calls, hooked=True, backend=args.backend)
                rows.append([what, round(pristine), round(overlay), round(overlay - pristine),
                             f"{100 * (overlay / pristine - 1):+.1f}%"])
            table(["call", "pristine", "overlay", "difference", "relative"], rows)
        if inside:
            _overlay("install")
            header(f"instructions per all_reduce inside parallel_map (callgrind, "
                   f"{args.backend} world 1, {args.calls} calls)")
            direct = per_call("all_reduce", args.calls, hooked=True, backend=args.backend)
            rows = [["direct (calling thread)", round(direct), 0, "+0.0%"]]
            for what in inside:
                count = per_call(what, args.calls, hooked=True, backend=args.backend)
                rows.append([_INSIDE[what], round(count), round(count - direct),
                             f"{100 * (count / direct - 1):+.1f}%"])
            table(["call", "instructions", "added", "relative"], rows)
    finally:
        _overlay("install")


if __name__ == "__main__":
    main()
