"""Record parallel_map's schedule with torch.profiler and draw it per thread.

    python trace_schedule.py [--trace schedule-trace.json] [--plot schedule-trace.png] [--smoke]

Items of a loss-computation-like loop (a Python loop, a few small tensor ops
and a scalar all_reduce) run under parallel_map(max_workers=2), gloo world 1,
while torch.profiler records every thread. The Chrome/Perfetto trace is
written to --trace: open it in https://ui.perfetto.dev or chrome://tracing.
With --plot (needs matplotlib) the schedule's spans are drawn per thread:
items, waits for a turn, issues.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def record(trace: Path, items: int, loop: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.threading import parallel_map

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.set_num_threads(1)

    def item(i: int) -> float:
        x = torch.randn(64, 64)
        acc = 0
        for k in range(loop):  # per-item Python work
            acc += (k * i) % 7
        loss = (x @ x).sum() + acc
        dist.all_reduce(loss)
        return loss.item()

    parallel_map(item, range(items), max_workers=2)  # warm the worker threads
    config = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                experimental_config=config) as prof:
        parallel_map(item, range(items), max_workers=2)
    prof.export_chrome_trace(str(trace))
    dist.destroy_process_group()


def spans(trace: Path) -> dict[int, list[tuple[str, float, float]]]:
    """The schedule's spans per thread id: (name, start us, duration us)."""
    events = json.loads(trace.read_text())["traceEvents"]
    by_thread: dict[int, list[tuple[str, float, float]]] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("ph") == "X" and name.startswith("parallel_map "):
            by_thread.setdefault(event["tid"], []).append(
                (name, float(event["ts"]), float(event["dur"])))
    return by_thread


def plot(by_thread: dict[int, list[tuple[str, float, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"item": "tab:blue", "wait": "tab:orange", "issue": "tab:red"}
    start = min(s for spans_ in by_thread.values() for _, s, _ in spans_)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.8 * len(by_thread)))
    labels = []
    for row, (_, spans_) in enumerate(sorted(by_thread.items())):
        for name, s, d in spans_:
            kind = name.split()[1]
            low, height = (row - 0.4, 0.8) if kind == "item" else (row - 0.25, 0.5)
            ax.broken_barh([((s - start) / 1e3, d / 1e3)], (low, height), color=colors[kind],
                           edgecolor="white", linewidth=0.5)
            if kind == "item":
                ax.text((s - start) / 1e3 + 0.1, row + 0.3, f"item {name.split()[-1]}",
                        va="center", color="white", fontsize=7)
        has_items = any(name.split()[1] == "item" for name, _, _ in spans_)
        labels.append("worker" if has_items else "caller (coordinator)")
    ax.set_yticks(range(len(by_thread)), labels)
    ax.set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, [f"parallel_map {k}" for k in colors], loc="upper right", fontsize=8)
    ax.set_title("parallel_map schedule in a torch.profiler trace (2 workers, gloo world 1)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, default=Path("schedule-trace.json"))
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--loop", type=int, default=20000)
    parser.add_argument("--plot-only", action="store_true",
                        help="draw --trace as it is (only matplotlib needed, no torch)")
    parser.add_argument("--smoke", action="store_true", help="tiny, to a temporary file: for CI")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.loop = 4, 10
        args.trace = Path(tempfile.mkdtemp()) / "schedule-trace.json"
    if not args.plot_only:
        from _bench import header

        record(args.trace, args.items, args.loop)
        header("schedule trace")
    by_thread = spans(args.trace)
    for tid, spans_ in sorted(by_thread.items()):
        kinds = [name.split()[1] for name, _, _ in spans_]
        print(f"thread {tid}: {kinds.count('item')} items, {kinds.count('wait')} waits, "
              f"{kinds.count('issue')} issues")
    if args.plot is not None:
        plot(by_thread, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
