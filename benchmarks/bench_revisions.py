"""A/B of two revisions of the overlay on one interpreter: what a change costs.

    python bench_revisions.py --old REV [--new REV] [--python PY] [--repeat 8]

Installs the overlay of each revision (a git worktree of REV; ``--new``
defaults to this working tree) into PY's torch in turn, alternating which
goes first, and runs one measuring process per install (gloo, world size 1,
medians of 7 interleaved runs inside it):

* ``one_active_per_call_us``: one item making 2,000 ``all_reduce`` calls
  under parallel_map (its worker issues them itself), and ``direct_us``, the
  same loop on the calling thread (their difference swings with the speed
  of one thread on a noisy machine: compare revisions, not the two);
* ``two_active_per_call_us``: two items making 2,000 calls each, so the
  holder of the turn issues the other item's calls for it;
* ``tiny_item_us``: 200 items that do nothing;
* ``grad_item_us``: 200 items with a little autograd work and one
  all_reduce each, then a backward over all of them.

Prints each run, then medians and ranges per revision. Leaves this working
tree's overlay installed. Not part of ``run_all.py``: it re-installs the
overlay. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure() -> None:
    import time

    import torch
    import torch.distributed as dist
    from torch.distributed.threading import parallel_map

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t = torch.zeros(1)
    calls, items = 2000, 200
    x = torch.ones(8, requires_grad=True)

    def loop(_: object = None) -> None:
        for _ in range(calls):
            dist.all_reduce(t)

    def grad_item(i: int) -> torch.Tensor:
        dist.all_reduce(t)
        return (x * i).sin().sum()

    def grad_items() -> None:
        sum(parallel_map(grad_item, range(items), max_workers=2)).backward()

    runs = {
        "direct": loop,
        "one_active": lambda: parallel_map(lambda i: loop() if i == 0 else None, range(2),
                                           max_workers=2),
        "two_active": lambda: parallel_map(loop, range(2), max_workers=2),
        "tiny": lambda: parallel_map(lambda i: None, range(items), max_workers=2),
        "grad_items": grad_items,
    }
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(7):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    m = {name: statistics.median(values) for name, values in samples.items()}
    print(json.dumps({
        "direct_us": m["direct"] / calls * 1e6,
        "one_active_per_call_us": m["one_active"] / calls * 1e6,
        "two_active_per_call_us": m["two_active"] / (2 * calls) * 1e6,
        "tiny_item_us": m["tiny"] / items * 1e6,
        "grad_item_us": m["grad_items"] / items * 1e6,
    }))
    dist.destroy_process_group()


def _install(tree: Path, python: str) -> None:
    subprocess.run([sys.executable, str(tree / "scripts/overlay"), "install", "--python", python],
                   check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", help="git revision to compare against")
    parser.add_argument("--new", help="git revision (default: this working tree)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeat", type=int, default=8)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure()
        return
    if args.old is None:
        parser.error("--old is required")
    results: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        trees = {}
        for label, rev in (("old", args.old), ("new", args.new)):
            if rev is None:
                trees[label] = REPO
                continue
            trees[label] = Path(tmp) / label
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(trees[label]), rev], check=True)
        try:
            for rep in range(args.repeat):
                for label in ("old", "new")[:: 1 if rep % 2 == 0 else -1]:
                    _install(trees[label], args.python)
                    out = subprocess.run([args.python, __file__, "--measure"], check=True,
                                         capture_output=True, text=True)
                    results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    print(label, results[label][-1], flush=True)
        finally:
            _install(REPO, args.python)
            for tree in trees.values():
                if tree != REPO:
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                    str(tree)], check=False)
    for key in results["old"][0]:
        cells = []
        for label in ("old", "new"):
            values = [run[key] for run in results[label]]
            cells.append(f"{label} {statistics.median(values):.1f} "
                         f"({min(values):.1f}-{max(values):.1f})")
        print(f"{key}: " + ", ".join(cells) + " us")


if __name__ == "__main__":
    main()
