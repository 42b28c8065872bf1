"""Run a function on N gloo ranks in fresh processes and collect what each saw.

Unlike MultiProcessTestCase, a rank may crash, be killed or hang: the parent
records that as the rank's outcome instead of failing, which is what fault
injection and the soak need. Each rank reports ``(status, value, seconds)``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class Outcome:
    status: str  # "ok", "error", "killed" (no report, exited), "hung" (killed by us)
    value: Any = None  # the return value, or the error as "Type: message"
    seconds: float = 0.0  # inside the rank, from the start of fn to its end
    threads_after: int = 0  # threads alive in the rank after fn, the main one included


def _rank_main(fn, rank, world_size, store_path, pg_timeout_s, results, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=pg_timeout_s))
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    start = time.monotonic()
    try:
        value = fn(rank, world_size, *args)
        status = "ok"
        if free_threaded and sys._is_gil_enabled():
            value, status = "the GIL was enabled on a free-threaded build", "error"
    except BaseException as e:  # reported to the parent
        value = f"{type(e).__name__}: {e}"
        if os.environ.get("RANKS_TRACEBACK"):
            traceback.print_exc()
        status = "error"
    elapsed = time.monotonic() - start
    results.put((rank, status, value, elapsed, threading.active_count()))
    results.close()
    results.join_thread()  # the report is sent by a feeder thread: let it finish
    # Tearing down a process group whose peers died or timed out can block; the
    # outcome is already reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    pg_timeout_s: float = 60.0,
    deadline_s: float = 120.0,
) -> list[Outcome]:
    """Run ``fn(rank, world_size, *args)`` on each rank; ``fn`` must be importable."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main,
                        args=(fn, rank, world_size, store_path, pg_timeout_s, results, args))
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        outcomes: dict[int, Outcome] = {}
        end = time.monotonic() + deadline_s
        while len(outcomes) < world_size and time.monotonic() < end:
            try:
                rank, status, value, seconds, threads = results.get(timeout=0.2)
                outcomes[rank] = Outcome(status, value, seconds, threads)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
        for rank, p in enumerate(procs):
            p.join(timeout=max(0.0, end - time.monotonic()) if rank not in outcomes else 10)
            if p.is_alive():
                p.kill()
                p.join()
                outcomes.setdefault(rank, Outcome("hung"))
            else:
                outcomes.setdefault(rank, Outcome("killed", p.exitcode))
    return [outcomes[r] for r in range(world_size)]
