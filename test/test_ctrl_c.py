# Owner(s): ["oncall: distributed"]
"""Ctrl-C at random moments never hangs a call and leaves no busy thread.

``ctrl_c_storm.py`` interrupts many calls of 64 items on 64 workers at
random moments (see there); a hang shows as the subprocess's timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


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
