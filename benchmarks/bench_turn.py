"""The turn patch, before and after: what workers issuing their own calls saves.

    python bench_turn.py [--calls 2000] [--repeat 5] [--rounds 3]

Installs the series' prefix without the turn patch, then the prefix with it
(``scripts/overlay install --prefix N``), alternately in fresh processes,
and in each times per call (wall and CPU, medians of ``--repeat``):

* direct: the calling thread makes N scalar ``all_reduce`` calls;
* one worker: one item makes the N calls (another item has none), so every
  call waits for its issue;
* four workers: four items make N/4 calls each.

gloo, world size 1, the running interpreter's torch (2.13). Reinstalls the
whole overlay at the end. Not part of ``run_all.py``: it reinstalls torch's
files while it runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TURN = "[c10d] parallel_map: workers issue their own calls (the turn as a role)"


def child(calls: int, repeat: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.threading import parallel_map

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t = torch.zeros(1)

    def direct() -> None:
        for _ in range(calls):
            dist.all_reduce(t)

    def one(i: int) -> None:
        if i == 0:
            x = torch.zeros(1)
            for _ in range(calls):
                dist.all_reduce(x)

    def four(i: int) -> None:
        x = torch.zeros(1)
        for _ in range(calls // 4):
            dist.all_reduce(x)

    cases = {
        "direct": direct,
        "one worker": lambda: parallel_map(one, range(2), max_workers=2),
        "four workers": lambda: parallel_map(four, range(4), max_workers=4),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeat):
        for name, case in cases.items():
            wall, cpu = time.perf_counter(), time.process_time()
            case()
            runs[name].append(
                (
                    (time.perf_counter() - wall) / calls * 1e6,
                    (time.process_time() - cpu) / calls * 1e6,
                )
            )
    for name, values in runs.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        print(f"{name}\t{wall:.1f}\t{cpu:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.calls, args.repeat)
        return
    sys.path.insert(0, str(REPO / "scripts"))
    import _stack

    after = next(p.number for p in _stack.load().patches if p.subject == TURN)
    overlay = [sys.executable, str(REPO / "scripts" / "overlay"), "install"]
    rows = []
    try:
        for round_ in range(args.rounds):
            for prefix in (after - 1, after):
                subprocess.run(
                    [*overlay, "--python", sys.executable, "--prefix", str(prefix)],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                out = subprocess.run(
                    [sys.executable, __file__, "--child", "--calls", str(args.calls),
                     "--repeat", str(args.repeat)],
                    check=True, capture_output=True, text=True,
                ).stdout
                for line in out.splitlines():
                    name, wall, cpu = line.split("\t")
                    rows.append((round_, "after" if prefix == after else "before", name,
                                 float(wall), float(cpu)))
    finally:
        subprocess.run([*overlay, "--python", sys.executable], check=True,
                       stdout=subprocess.DEVNULL)
    print(f"per call, us (wall / CPU); each row one process, medians of {args.repeat}")
    print("round  turn    direct         one worker     four workers   one/direct  four/direct")
    for round_ in range(args.rounds):
        for side in ("before", "after"):
            got = {r[2]: r[3:] for r in rows if r[0] == round_ and r[1] == side}
            d, o, f = got["direct"], got["one worker"], got["four workers"]
            print(f"{round_ + 1:5d}  {side:6s} {d[0]:6.1f}/{d[1]:6.1f}  {o[0]:6.1f}/{o[1]:6.1f}"
                  f"  {f[0]:6.1f}/{f[1]:6.1f}  {o[0] / d[0]:10.2f}  {f[0] / d[0]:11.2f}")


if __name__ == "__main__":
    main()
