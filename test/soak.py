"""Randomized soak of parallel_map across real gloo ranks.

    python test/soak.py --cases 10000 --world-sizes 2 4

Cases come from hypothesis strategies: per-item collective patterns (0 to 5
calls from a mix of ops, matched send/recv pairs, async calls waited later),
random per-item delays that differ between ranks, ``max_workers`` from 1 to
more than the item count, nested ``parallel_map`` in some items, and
all_reduce coalescing on or off. Every
rank runs every case, checks each collective's value (values encode item,
call and rank, so a mismatched pairing shows), and compares the sequence it
issued with the other ranks'. Prints cases, mismatches, hangs, wall time.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import threading
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from hypothesis import given, HealthCheck, Phase, settings, strategies as st

OPS = (
    "all_reduce",
    "all_reduce_async",  # issued with async_op=True, waited at the end of the item
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "barrier",
    "all_gather_object",
    "broadcast_object_list",
    "send_recv",  # each rank exchanges with its partner rank ^ 1
)

_ops = st.lists(st.sampled_from(OPS), max_size=5)
_item = st.fixed_dictionaries(
    {
        "ops": _ops,
        "delay_ms": st.sampled_from([0.0, 0.0, 0.2, 1.0, 3.0]),
        "nested": st.none() | st.lists(st.lists(st.sampled_from(OPS), max_size=3),
                                       min_size=1, max_size=3),
    }
)
CASES = st.fixed_dictionaries(
    {
        "max_workers": st.integers(1, 9),
        "nested_workers": st.integers(1, 3),
        "coalesce": st.booleans(),  # coalesce_all_reduces, outer and nested
        "items": st.lists(_item, max_size=8),
    }
)


def generate_cases(count: int) -> list[dict[str, Any]]:
    """``count`` cases, the same on every call (derandomized)."""
    cases: list[dict[str, Any]] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate],
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(CASES)
    def collect(case: dict[str, Any]) -> None:
        cases.append(case)

    collect()
    return cases[:count]


_P2P = frozenset({"send", "recv", "isend", "irecv"})


class _IssueRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.issued: list[tuple[int, int, str]] = []
        self._thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        # Issues are logged for the coordinating thread, whichever thread issued.
        coordinator = getattr(record, "coordinator", None)
        if coordinator == self._thread and str(record.msg).startswith("issue #"):
            _, item, call, op = record.args  # type: ignore[misc]
            # A send on one rank pairs with a recv on its partner.
            self.issued.append((item, call, "p2p" if op in _P2P else op))


def _run_ops(ops: list[str], key: int, rank: int, world: int) -> list[bool]:
    """Issue ``ops``; returns, per op, whether its result was right."""
    ok: list[bool] = []
    pending: list[tuple[dist.Work, torch.Tensor, float]] = []
    rank_sum = world * (world - 1) // 2
    for k, op in enumerate(ops):
        base = float(key * 100 + k * 10)
        root = (key + k) % world
        if op == "all_reduce":
            t = torch.full((2,), base + rank)
            dist.all_reduce(t)
            ok.append(bool((t == world * base + rank_sum).all()))
        elif op == "all_reduce_async":
            t = torch.full((2,), base + rank)
            pending.append((dist.all_reduce(t, async_op=True), t, world * base + rank_sum))
        elif op == "broadcast":
            t = torch.full((2,), base + rank)
            dist.broadcast(t, src=root)
            ok.append(bool((t == base + root).all()))
        elif op == "all_gather":
            out = [torch.zeros(2) for _ in range(world)]
            dist.all_gather(out, torch.full((2,), base + rank))
            ok.append(all(bool((o == base + q).all()) for q, o in enumerate(out)))
        elif op == "all_gather_into_tensor":
            out = torch.zeros(2 * world)
            dist.all_gather_into_tensor(out, torch.full((2,), base + rank))
            want = torch.cat([torch.full((2,), base + q) for q in range(world)])
            ok.append(bool((out == want).all()))
        elif op == "reduce_scatter_tensor":
            out = torch.zeros(2)
            dist.reduce_scatter_tensor(out, torch.cat([torch.full((2,), base + q) for q in range(world)]))
            ok.append(bool((out == world * (base + rank)).all()))
        elif op == "barrier":
            dist.barrier()
            ok.append(True)
        elif op == "all_gather_object":
            out: list[Any] = [None] * world
            dist.all_gather_object(out, (key, k, rank))
            ok.append(out == [(key, k, q) for q in range(world)])
        elif op == "broadcast_object_list":
            box = [(key, k, rank)]
            dist.broadcast_object_list(box, src=root)
            ok.append(box == [(key, k, root)])
        elif op == "send_recv":
            partner = rank ^ 1
            if partner >= world:
                ok.append(True)
                continue
            got = torch.zeros(2)
            if rank % 2 == 0:
                dist.send(torch.full((2,), base + rank), dst=partner)
                dist.recv(got, src=partner)
            else:
                dist.recv(got, src=partner)
                dist.send(torch.full((2,), base + rank), dst=partner)
            ok.append(bool((got == base + partner).all()))
    for work, t, want in pending:
        work.wait()
        ok.append(bool((t == want).all()))
    return ok


def _run_case(case: dict[str, Any], number: int, rank: int, world: int) -> tuple[int, list[Any]]:
    from torch.distributed.threading import parallel_map

    # Delays differ between ranks, so thread timing does too.
    rng = random.Random(f"{number}/{rank}")
    delays = [item["delay_ms"] * rng.random() / 1000 for item in case["items"]]

    def run_item(i: int) -> list[bool]:
        item = case["items"][i]
        time.sleep(delays[i])
        ok = _run_ops(item["ops"], key=i, rank=rank, world=world)
        if item["nested"] is not None:
            subs = item["nested"]
            results = parallel_map(
                lambda j: _run_ops(subs[j], key=1000 + 10 * i + j, rank=rank, world=world),
                range(len(subs)),
                max_workers=case["nested_workers"],
                coalesce_all_reduces=case["coalesce"],
            )
            ok.extend(flag for sub in results for flag in sub)
        return ok

    logger = logging.getLogger("torch.distributed.threading._turn")
    recorder = _IssueRecorder()
    logger.addHandler(recorder)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # keep the DEBUG records out of torch's console handler
    try:
        results = parallel_map(run_item, range(len(case["items"])),
                               max_workers=case["max_workers"],
                               coalesce_all_reduces=case["coalesce"])
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    wrong_values = sum(not flag for flags in results for flag in flags)
    return wrong_values, recorder.issued


def soak_rank(rank: int, world: int, cases: list[dict[str, Any]]) -> dict[str, Any]:
    warnings.simplefilter("ignore", FutureWarning)  # the deprecated *_tensor aliases
    mismatches = 0
    start = time.monotonic()
    for number, case in enumerate(cases):
        wrong_values, issued = _run_case(case, number, rank, world)
        everyone: list[Any] = [None] * world
        dist.all_gather_object(everyone, issued)
        if wrong_values or any(other != issued for other in everyone):
            mismatches += 1
    return {"cases": len(cases), "mismatches": mismatches, "seconds": time.monotonic() - start}


def soak(world_size: int, cases: list[dict[str, Any]], pg_timeout_s: float = 60.0) -> dict[str, Any]:
    """Run ``cases`` on ``world_size`` ranks; a rank that times out counts as a hang."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from ranks import run_ranks

    start = time.monotonic()
    outcomes = run_ranks(soak_rank, world_size, cases, pg_timeout_s=pg_timeout_s,
                         deadline_s=120 + 0.5 * len(cases))
    wall = time.monotonic() - start
    hangs = sum(o.status != "ok" for o in outcomes)
    mismatches = max((o.value["mismatches"] for o in outcomes if o.status == "ok"), default=0)
    return {"world_size": world_size, "cases": len(cases), "mismatches": mismatches,
            "hangs": hangs, "wall_s": wall,
            "errors": [o.value for o in outcomes if o.status != "ok"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    cases = generate_cases(args.cases)
    print(f"Python {sys.version.split()[0]} GIL "
          f"{'on' if getattr(sys, '_is_gil_enabled', lambda: True)() else 'off'}, "
          f"torch {torch.__version__}")
    failed = False
    for world in args.world_sizes:
        r = soak(world, cases)
        print(f"world size {r['world_size']}: {r['cases']} cases, {r['mismatches']} mismatches, "
              f"{r['hangs']} hangs, wall time {r['wall_s']:.0f} s")
        for error in r["errors"]:
            print(f"  rank error: {error}")
        failed |= bool(r["mismatches"] or r["hangs"])
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
