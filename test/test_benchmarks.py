"""Every benchmark runs (once, tiny, untimed): benchmarks/run_all.py --smoke."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_benchmarks_smoke():
    out = subprocess.run([sys.executable, "run_all.py", "--smoke"], cwd=BENCHMARKS,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for title in ("## workload", "## interception overhead", "## coordinator throughput",
                  "## scaling", "## schedule trace"):
        assert title in out.stdout, title
