"""Ctrl-C at random moments of parallel_map calls; run as a script by test_ctrl_c.py.

    python ctrl_c_storm.py CALLS SEED

Each call runs 64 items on 64 workers, each item a few collectives (fakes,
some issued by a worker holding the turn), and a timer sends SIGINT to the
main thread at a random moment: while threads start, while items run, while
the call shuts down, or after it returned. After each call no worker may be
busy and no hook may be left. Prints how many calls were interrupted; a
hang is caught by the caller's timeout.
"""

from __future__ import annotations

import faulthandler
import random
import signal
import sys
import threading
import time
import traceback

from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import _pool, parallel_map

from fake_collectives import fake_collective, fake_torch_only_collective, IssueLog


def one_call(rng: random.Random, main: int) -> bool:
    log = IssueLog()
    delays = [rng.choice([0.0, 0.0005, 0.002]) for _ in range(64)]

    def item(i: int) -> int:
        for k in range(3):
            time.sleep(delays[i])
            if (i + k) % 2:
                fake_torch_only_collective(log, (i, k), async_op=True).wait()
            else:
                fake_collective(log, (i, k))
        return i

    # A call takes tens of milliseconds here; some interrupts land after it.
    timer = threading.Timer(rng.uniform(0.0, 0.06), signal.pthread_kill, (main, signal.SIGINT))
    interrupted = returned = False
    try:
        try:
            timer.start()
            parallel_map(item, range(64), max_workers=64)
            returned = True
        finally:
            timer.join()
            time.sleep(0.01)  # the handler runs at the main thread's next check
    except KeyboardInterrupt:
        interrupted = not returned
    workers = [t for t in threading.enumerate() if t.name.startswith("parallel_map-worker")]
    if len(workers) != _pool.pool.idle_count():
        frames = sys._current_frames()
        stacks = "".join(
            f"{t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
            for t in workers if t.ident in frames
        )
        raise AssertionError(
            f"a busy worker outlived the call (interrupted {interrupted}, returned {returned}, "
            f"{len(workers)} workers, {_pool.pool.idle_count()} idle):\n{stacks}"
        )
    assert _collective_hook.fn is None
    return interrupted


def main() -> None:
    calls, seed = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job ignores it
    rng = random.Random(seed)
    main_thread = threading.main_thread().ident
    assert main_thread is not None
    interrupted = 0
    for _ in range(calls):
        # A call that hangs: print every thread's stack and exit.
        faulthandler.dump_traceback_later(20, exit=True)
        interrupted += one_call(rng, main_thread)
        faulthandler.cancel_dump_traceback_later()
    print(f"{interrupted} of {calls} calls interrupted inside parallel_map, none hung")


if __name__ == "__main__":
    main()
