"""Benchmark 2: what interception costs.

    python bench_overhead.py [--calls 2000] [--repeat 15] [--smoke]

* Added latency per intercepted collective: one item issues N scalar
  all_reduces under parallel_map (the other slot's item has none), against
  the same N calls made directly by the calling thread, with the bypass
  detector on (the default) and off, and under the synchronous round-robin
  baseline (_round_robin.py), and directly on a fresh thread. gloo, world
  size 1. gloo's ``wait`` sleeps until its thread completes the work, and
  how late this machine wakes a thread moves these numbers by more than the
  schedule costs (benchmarks/RESULTS.md).
* The schedule's own cost per call, without gloo's thread wake-ups: the
  same N calls on torch's ``fake`` backend, whose collectives complete at
  issue, so wall time is CPU time. The same calls made directly on a fresh
  thread are the reference too: a worker is such a thread. The fake
  backend counts no collectives, so the bypass detector reads nothing there;
  what it reads on gloo is the next line's cost.
* The bypass detector's own cost per issue: its check before and its read
  after an issue, timed directly on the default group.
* The overlay's shim of the C++ refusal (shims/direct_collective_refusal.py):
  a worker sets and clears its thread's flag around each call it issues
  (what one pair costs), and while the shim's guards are in place (inside
  parallel_map), each direct method call passes one: a plain all_reduce loop
  with torch's methods and with the guarded ones, in one process,
  interleaved.
* The functional ops' hook (torch/_ops.py): the ``all_reduce`` op as the
  edit creates it (whose ``__call__`` checks the thread's op hook) and as a
  plain ``OpOverload`` of the same op, on a thread without a hook, in one
  process, interleaved; each call is the op and its ``wait_tensor``.
* Inactive hook: a plain all_reduce loop with the overlay installed and
  uninstalled, in fresh processes, interleaved. This re-installs the overlay
  into the running interpreter's torch around each run (scripts/overlay).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from _bench import header, interleaved_medians, table
from _round_robin import round_robin_map

REPO = Path(__file__).resolve().parent.parent
_LOOP = """
import sys, time, torch, torch.distributed as dist
torch.set_num_threads(1)
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
t = torch.zeros(1)
n = int(sys.argv[1])
for _ in range(200):
    dist.all_reduce(t)
best = float("inf")
for _ in range(5):
    start = time.perf_counter()
    for _ in range(n):
        dist.all_reduce(t)
    best = min(best, (time.perf_counter() - start) / n)
print(best)
# Left to interpreter exit, gloo's threads sometimes abort the process.
dist.destroy_process_group()
"""


def added_latency(calls: int, repeat: int) -> dict[str, float]:
    from torch.distributed.threading import _bypass, parallel_map

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t = torch.zeros(1)

    def loop(_: object = None) -> None:
        for _ in range(calls):
            dist.all_reduce(t)

    def intercepted() -> None:
        parallel_map(lambda i: loop() if i == 0 else None, range(2), max_workers=2)

    def intercepted_detector_off() -> None:
        os.environ[_bypass.ENV_VAR] = "0"
        try:
            intercepted()
        finally:
            del os.environ[_bypass.ENV_VAR]

    def round_robin() -> None:
        round_robin_map(lambda i: loop() if i == 0 else None, range(2), max_workers=2)

    medians = interleaved_medians(
        {"direct": loop, "intercepted": intercepted, "detector off": intercepted_detector_off,
         "round robin": round_robin, "thread": lambda: _on_a_thread(loop)},
        repeat=repeat,
    )
    per_call = {name: value / calls for name, value in medians.items()}
    per_call["detector per issue"] = detector_cost(calls * 10)
    dist.destroy_process_group()
    return per_call


def _on_a_thread(fn: Callable[[], None]) -> None:
    thread = threading.Thread(target=fn)
    thread.start()
    thread.join()


def schedule_cost(calls: int, repeat: int) -> dict[str, float]:
    """Seconds per all_reduce on the ``fake`` backend: directly on the calling
    thread, directly on a fresh thread, and inside ``parallel_map``."""
    from torch.distributed.threading import parallel_map
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    t = torch.zeros(1)

    def loop(_: object = None) -> None:
        for _ in range(calls):
            dist.all_reduce(t)

    try:
        medians = interleaved_medians(
            {"direct": loop, "thread": lambda: _on_a_thread(loop),
             "intercepted": lambda: parallel_map(lambda i: loop() if i == 0 else None,
                                                 range(2), max_workers=2)},
            repeat=repeat,
        )
    finally:
        dist.destroy_process_group()
    return {name: value / calls for name, value in medians.items()}


def detector_cost(n: int) -> float:
    """Seconds per issue of the detector's check and read, on one group."""
    from torch.distributed.threading._bypass import BypassDetector
    from torch.distributed.threading._calls import Call, plan_for

    call = Call(dist.all_reduce, {}, plan_for(dist.all_reduce, {}), 0, 0, None)
    detector = BypassDetector()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            detector.before_issue(call)
            detector.after_issue(call)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def refusal_shim(calls: int, repeat: int) -> tuple[float, float, float] | None:
    """Seconds per flag set-and-clear pair, and per all_reduce with torch's
    methods and with the shim's guarded ones; None without the shim."""
    try:
        from torch import _direct_collective_refusal_shim as shim
    except ImportError:  # not the overlay, or a torch with the C++ patch
        return None
    own = torch._C._distributed_c10d
    start = time.perf_counter()
    for _ in range(calls):
        own._set_refuse_direct_collectives(True)
        own._set_refuse_direct_collectives(False)
    pair = (time.perf_counter() - start) / calls

    def put(guarded: bool) -> None:
        for cls, name, original, guard in shim._guards:
            setattr(cls, name, guard if guarded else original)

    t = torch.zeros(1)

    def loop(guarded: bool) -> None:
        put(guarded)
        for _ in range(calls):
            dist.all_reduce(t)

    # The pairs above made this thread one that refused, so the guarded
    # methods do not put torch's back when it calls them (see the shim).
    installed = shim._installed
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        medians = interleaved_medians({False: lambda: loop(False), True: lambda: loop(True)},
                                      repeat)
    finally:
        put(installed)
        dist.destroy_process_group()
    return pair, medians[False] / calls, medians[True] / calls


def functional_op_hook(calls: int, repeat: int) -> tuple[float, float] | None:
    """Seconds per all_reduce op (and its wait) through the collective op's
    own ``__call__`` and through ``OpOverload``'s; None without the hook."""
    op = torch.ops._c10d_functional.all_reduce.default
    if type(op) is torch._ops.OpOverload:  # a torch without the edit
        return None
    wait = torch.ops._c10d_functional.wait_tensor.default
    # The same op as upstream torch creates it: a plain OpOverload.
    base = torch._ops.OpOverload(op._overloadpacket, op._op, op._op_dk, op._schema, op._tags)
    t = torch.ones(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    name = dist.group.WORLD.group_name

    def hooked() -> None:
        for _ in range(calls):
            wait(op(t, "sum", name))

    def plain() -> None:
        for _ in range(calls):
            wait(base(t, "sum", name))

    try:
        medians = interleaved_medians({"plain": plain, "hooked": hooked}, repeat)
    finally:
        dist.destroy_process_group()
    return medians["plain"] / calls, medians["hooked"] / calls


def _overlay(command: str) -> None:
    subprocess.run([sys.executable, str(REPO / "scripts/overlay"), command,
                    "--python", sys.executable], check=True, capture_output=True)


def inactive_hook(calls: int, repeat: int) -> tuple[float, float]:
    def run() -> float:
        out = subprocess.run([sys.executable, "-c", _LOOP, str(calls)], check=True,
                             capture_output=True, text=True)
        return float(out.stdout.split()[-1])

    samples: dict[str, list[float]] = {"installed": [], "uninstalled": []}
    try:
        for rep in range(repeat):
            # Alternate which state goes first: the run after a re-install
            # must not always be the same one.
            for state in ("uninstalled", "installed")[:: 1 if rep % 2 else -1]:
                _overlay("uninstall" if state == "uninstalled" else "install")
                samples[state].append(run())
    finally:
        _overlay("install")
    return statistics.median(samples["uninstalled"]), statistics.median(samples["installed"])


def _per_call_table(cost: dict[str, float], rows: tuple[tuple[str, str], ...]) -> None:
    table(["case", "us/call", "added to direct", "added to a fresh thread"],
          [[name, cost[key] * 1e6, (cost[key] - cost["direct"]) * 1e6,
            (cost[key] - cost["thread"]) * 1e6] for name, key in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--smoke", action="store_true", help="tiny, untimed: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.repeat = 20, 1
    torch.set_num_threads(1)
    cost = added_latency(args.calls, args.repeat)
    header(f"interception overhead: gloo world 1, scalar all_reduce, {args.calls} calls, "
           f"median of {args.repeat}")
    _per_call_table(cost, (("direct, calling thread", "direct"),
                           ("direct, a fresh thread", "thread"),
                           ("parallel_map worker, detector on", "intercepted"),
                           ("parallel_map worker, detector off", "detector off"),
                           ("synchronous round-robin baseline", "round robin")))
    fake = schedule_cost(args.calls, args.repeat)
    header(f"the schedule's cost: fake backend (completes at issue), world 1, scalar "
           f"all_reduce, {args.calls} calls, median of {args.repeat}")
    _per_call_table(fake, (("direct, calling thread", "direct"),
                           ("direct, a fresh thread", "thread"),
                           ("parallel_map worker", "intercepted")))
    print(f"\nbypass detector per issue (check + read, one group): "
          f"{cost['detector per issue'] * 1e9:.0f} ns")
    if (shim := refusal_shim(args.calls, args.repeat)) is not None:
        pair, plain, guarded = shim
        print(f"\nthe refusal shim: a flag set and clear, {pair * 1e6:.2f} us; "
              f"all_reduce, interleaved, median of {args.repeat}:")
        table(["methods", "us per all_reduce", "ratio"],
              [["torch's", plain * 1e6, 1.0], ["guarded", guarded * 1e6, guarded / plain]])
    if (ops := functional_op_hook(args.calls, args.repeat)) is not None:
        plain, hooked = ops
        print(f"\nthe functional ops' hook, no hook set: all_reduce op + wait_tensor, "
              f"interleaved, median of {args.repeat}:")
        table(["op object", "us per op", "ratio"],
              [["plain OpOverload", plain * 1e6, 1.0],
               ["_CollectiveOpOverload", hooked * 1e6, hooked / plain]])
    if args.smoke:
        return  # the inactive-hook run re-installs the overlay: not in CI
    start = time.perf_counter()
    without, with_hook = inactive_hook(args.calls, max(5, args.repeat // 2))
    print(f"\ninactive hook ({time.perf_counter() - start:.0f} s, fresh process per run):")
    table(["overlay", "us per all_reduce", "ratio"],
          [["uninstalled", without * 1e6, 1.0],
           ["installed", with_hook * 1e6, with_hook / without]])


if __name__ == "__main__":
    main()
