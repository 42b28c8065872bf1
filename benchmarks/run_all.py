"""Run every benchmark; ``--smoke`` runs each once, tiny, untimed (CI).

    python run_all.py [--smoke] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    smoke = ["--smoke"] if args.smoke else []
    runs = [
        ["bench_workload.py", "--device", args.device, *smoke],
        ["bench_overhead.py", *smoke],
        ["bench_throughput.py", *smoke],
        ["bench_round_trip.py", *smoke],
        ["bench_scaling.py", *smoke],
        ["bench_compile.py", *smoke],
        ["bench_instructions.py", *smoke],
        ["trace_schedule.py", *smoke],
        ["profile_cpu.py", *smoke],
    ]
    failed = [run[0] for run in runs
              if subprocess.run([sys.executable, *run], cwd=HERE).returncode != 0]
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
