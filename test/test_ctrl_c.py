# Owner(s): ["oncall: distributed"]
"""Ctrl-C at random moments never hangs a call and leaves no busy thread.

``ctrl_c_storm.py`` interrupts many calls of 64 items on 64 workers at
random moments (see there); a hang shows as the subprocess's timeout.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from torch.distributed.distributed_c10d import _collective_hook
from torch.distributed.threading import _feeder, _pool, parallel_map

from fake_collectives import IssueLog
from signals import ctrl_c_raises, interrupting_items


HERE = Path(__file__).resolve().parent
CALLS = int(os.environ.get("PARALLEL_MAP_CTRL_C_CALLS", "40"))


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
@pytest.mark.parametrize("seed", [0, 1])
def test_ctrl_c_at_random_moments(seed: int) -> None:
    try:
        done = subprocess.run(
            [sys.executable, str(HERE / "ctrl_c_storm.py"), str(CALLS), str(seed)],
            cwd=HERE, capture_output=True, text=True, timeout=60 + 3 * CALLS,
        )
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"a call hung after Ctrl-C: {hung.stdout!r} {hung.stderr!r}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "none hung" in done.stdout


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
def test_a_second_ctrl_c_while_stopping_still_releases_every_worker(monkeypatch):
    # A first Ctrl-C while items 1 and 2 wait for their turn; a second one
    # lands while the coordinator cancels them, inside the turn's locked
    # section, and is raised as it ends. Both items must still get CANCEL,
    # and every thread must be joined before KeyboardInterrupt is raised.
    main = threading.main_thread().ident
    assert main is not None
    close = _feeder.Feeder.close

    sent = []

    class SignalOnIteration(list):
        def __iter__(self):
            if not sent:  # once: the stop is rerun after the interrupt
                sent.append(True)
                signal.pthread_kill(main, signal.SIGINT)
                time.sleep(0.05)  # the handler runs inside Turn.stop's section
            return super().__iter__()

    def close_and_interrupt(self):
        return SignalOnIteration(close(self))

    monkeypatch.setattr(_feeder.Feeder, "close", close_and_interrupt)
    log, cancelled = IssueLog(), []
    item = interrupting_items(log, cancelled)

    faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the run loudly
    try:
        with ctrl_c_raises(), pytest.raises(KeyboardInterrupt):
            parallel_map(item, range(3), max_workers=3)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert sent, "the second Ctrl-C was not sent"
    assert sorted(cancelled) == ["CollectiveCancelledError"] * 2
    workers = [t for t in threading.enumerate() if t.name.startswith("parallel_map-worker")]
    assert len(workers) == _pool.pool.idle_count(), "a worker outlived the call"
    assert _collective_hook.fn is None


def test_a_lock_that_cannot_be_taken_leaves_no_section_open():
    # Another signal's handler may raise in acquire(); the section never
    # began, or every later Ctrl-C would be deferred for good.
    from torch.distributed.threading import _interrupts

    class Refusing:
        def acquire(self) -> None:
            raise RuntimeError("a SIGALRM handler raised")

    with pytest.raises(RuntimeError), _interrupts.ShieldedLock(Refusing()):  # type: ignore[arg-type]
        pass
    assert _interrupts._sections.depth == 0
