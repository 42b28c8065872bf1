# Owner(s): ["oncall: distributed"]
"""conftest.py runs a test again only when one of its ranks died of a fatal signal."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

_TOY = """
import atexit
import os
import time
import torch
import torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcessTestCase

DONE = {done!r}


class Toy(MultiProcessTestCase):
    @property
    def world_size(self):
        return 2

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _init(self):
        dist.init_process_group(
            "gloo", rank=self.rank, world_size=2, init_method=f"file://{{self.file_name}}"
        )

    def _all_reduce(self):
        self._init()
        dist.all_reduce(torch.ones(1))

    def _rank0_first_time(self, name):
        path = os.path.join(DONE, name)
        if self.rank != 0 or os.path.exists(path):
            return False
        open(path, "w").close()
        return True

    def test_abort_at_exit_once(self):
        self._all_reduce()
        dist.barrier()
        if self._rank0_first_time("exit"):
            atexit.register(os.abort)  # after the test passed on every rank

    def test_abort_mid_test_once(self):
        self._init()
        if self._rank0_first_time("mid"):
            os.abort()  # rank 1 loses its peer in the all_reduce
        dist.all_reduce(torch.ones(1))

    def test_abort_every_time(self):
        self._all_reduce()
        if self.rank == 0:
            os.abort()

    def test_abort_while_the_other_rank_fails(self):
        self._init()
        if self.rank == 0:
            os.abort()
        time.sleep(2)  # rank 0's report comes first
        self.fail("a real failure")

    def test_fail_once_without_a_signal(self):
        self._all_reduce()
        self.assertFalse(self._rank0_first_time("plain"), "a plain failure")
"""


def test_only_a_death_by_signal_runs_a_test_again(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (tmp_path / "test_toy.py").write_text(_TOY.format(done=str(done)))
    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "--junitxml=junit.xml", "test_toy.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    runs: dict[str, list[str]] = {}
    for case in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if tags else "passed"
        runs.setdefault(case.get("name", ""), []).append(outcome)
    assert runs == {
        # The first run's record is the rerun's (pytest-rerunfailures leaves it empty).
        "test_abort_at_exit_once": ["passed", "passed"],
        "test_abort_mid_test_once": ["passed", "passed"],
        "test_abort_every_time": ["passed", "failed"],
        # Not a fluke: the other rank failed of something else than its lost peer.
        "test_abort_while_the_other_rank_fails": ["failed"],
        "test_fail_once_without_a_signal": ["failed"],
    }, f"{runs}\n{proc.stdout[-3000:]}"
    assert "run again: a rank died of a fatal signal" in proc.stdout
    assert "RERUN test_toy.py::Toy::test_abort_every_time (SIGABRT(6), PID: " in proc.stdout
    assert "the first run's stderr there:" in proc.stdout
