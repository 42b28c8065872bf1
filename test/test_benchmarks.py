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
    for title in ("## workload", "## interception overhead", "## the schedule's cost",
                  "the refusal shim:", "the functional ops' hook",
                  "## coordinator throughput", "## round-trip overlap", "## scaling",
                  "## schedule trace"):
        assert title in out.stdout, title


def test_demo_both_workloads_two_ranks():
    # The demo raises SystemExit on any rank whose parallel results differ from
    # its serial loop's; two ranks, so the all_reduce pairs items across ranks.
    # The loss demo runs its timed rounds (rank 0 decides when to stop, so
    # with --seconds 0 both ranks must agree on the minimum of 3 rounds).
    for workload, rounds, stop in (("loss", 3, ["--seconds", "0"]), ("seed", 2, ["--repeat", "2"])):
        out = subprocess.run([sys.executable, "demo.py", "--workload", workload,
                              "--world-size", "2", "--max-workers", "2", "--items", "4", *stop],
                             cwd=BENCHMARKS, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        rows = [line for line in out.stdout.splitlines() if line.lstrip().startswith(("0 ", "1 "))]
        assert len(rows) == 2, out.stdout
        assert f"{rounds} rounds" in out.stdout, out.stdout
        assert "results equal the serial loop's" in out.stdout, out.stdout
        # The reference: the same items on raw threads, at world 2 without their collectives.
        assert "raw, no collective" in out.stdout and "of raw" in out.stdout, out.stdout


def test_demo_refuses_an_empty_measurement():
    for bad, message in ((["--repeat", "0"], "--repeat must be at least 1"),
                         (["--seconds", "-1"], "--seconds must not be negative")):
        out = subprocess.run([sys.executable, "demo.py", *bad], cwd=BENCHMARKS,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stdout + out.stderr
        assert message in out.stderr, out.stderr
