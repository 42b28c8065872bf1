"""One more run for a test whose rank process was killed by a fatal signal.

A rank of a multi-process test sometimes dies of SIGABRT or SIGSEGV inside
gloo (a heap corruption that reproduces without ``parallel_map``, and aborts
at process exit; benchmarks/RESULTS.md, 2026-12-07). Such a test runs once
more, through pytest-rerunfailures. What counts as that death: c10's
fatal-signal report on the captured stderr (so pytest must capture file
descriptors, its default), no uncaught C++ exception or NCCL watchdog abort
(how a mismatched collective can end), and no rank failing of anything but
losing its peer. Any other failure, and a second death, fail as they are.
Every rerun is listed at the end of the session with the first run's stderr
around the death.

Without pytest-rerunfailures nothing is run again (a warning says so);
``test/test_rerun_on_signal.py`` fails then. ``scripts/series test`` copies
this file next to each prefix's tests.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Generator

import pytest

# c10::FatalSignalHandler's report, e.g. "SIGABRT(6), PID: 1234, Thread 1234:".
_FATAL_SIGNAL = re.compile(r"\bSIG(?:ABRT|SEGV|BUS|ILL|FPE)\(\d+\), PID: \d+")
# Deaths that a desync can cause: not run again.
_NOT_A_FLUKE = re.compile(r"terminate called after throwing|Watchdog caught")
# MultiProcessTestCase's report of each rank that raised, and how a rank that
# lost its peer fails.
_RANK_RAISED = re.compile(r"Process \d+ exited with error code \d+ and exception:\n")
_LOST_PEER = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")
_DIED = pytest.StashKey[str]()
_RERUNS: list[tuple[str, str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.pluginmanager.has_plugin("rerunfailures"):
        warnings.warn(
            "pytest-rerunfailures is not installed: a test whose rank dies of a fatal "
            "signal is not run again (pip install -r scripts/requirements-test.txt)",
            pytest.PytestWarning,
            stacklevel=1,
        )
        return
    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=1, condition=_died_in(item)))


def _died_in(item: pytest.Item) -> Callable[[BaseException | None], bool]:
    def died(error: BaseException | None) -> bool:  # evaluated after each failed run
        if not item.stash.get(_DIED, ""):
            return False
        chunks = _RANK_RAISED.split(str(error))[1:]
        return all(_LOST_PEER.search(chunk) for chunk in chunks)

    return died


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "setup":
        item.stash[_DIED] = ""
    if report.failed:
        match = _FATAL_SIGNAL.search(report.capstderr)
        if match and not _NOT_A_FLUKE.search(report.capstderr):
            item.stash[_DIED] = match.group(0)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        stderr = report.capstderr
        match = _FATAL_SIGNAL.search(stderr)
        lines = stderr.splitlines()
        first = stderr[: match.start()].count("\n") if match else 0
        excerpt = "\n".join(lines[max(0, first - 3) : first + 40])
        _RERUNS.append((report.nodeid, match.group(0) if match else "?", excerpt))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _RERUNS:
        terminalreporter.section("run again: a rank died of a fatal signal")
        for nodeid, line, excerpt in _RERUNS:
            terminalreporter.line(f"RERUN {nodeid} ({line}); the first run's stderr there:")
            terminalreporter.line(excerpt)
