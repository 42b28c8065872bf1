"""One more run for a test whose rank process was killed by a fatal signal.

A rank of a multi-process test sometimes dies of SIGABRT or SIGSEGV inside
gloo (a heap corruption that reproduces without ``parallel_map``, and aborts
at process exit; benchmarks/RESULTS.md, 2026-12-07). Such a test runs once
more, through pytest-rerunfailures; any other failure, and a second death,
fail as they are. Which deaths count: those c10's fatal-signal handler
reports on stderr, which the test's captured output holds. Every rerun is
listed at the end of the session, with the line that caused it.

``scripts/series test`` copies this file next to each prefix's tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator

import pytest

# c10::FatalSignalHandler's report, e.g. "SIGABRT(6), PID: 1234, Thread 1234:".
_FATAL_SIGNAL = re.compile(r"\bSIG(?:ABRT|SEGV|BUS|ILL|FPE)\(\d+\), PID: \d+")
_DIED = pytest.StashKey[str]()
_RERUNS: list[tuple[str, str]] = []


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("rerunfailures"):
        raise pytest.UsageError(
            "pytest-rerunfailures is not installed: pip install -r scripts/requirements-test.txt"
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.flaky(reruns=1, condition=_died_in(item)))


def _died_in(item: pytest.Item) -> Callable[[], bool]:
    def died() -> bool:  # takes no argument: evaluated after each attempt
        return bool(item.stash.get(_DIED, ""))

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
        if match:
            item.stash[_DIED] = match.group(0)
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.outcome == "rerun":
        match = _FATAL_SIGNAL.search(report.capstderr)
        _RERUNS.append((report.nodeid, match.group(0) if match else "?"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _RERUNS:
        terminalreporter.section("run again: a rank died of a fatal signal")
        for nodeid, line in _RERUNS:
            terminalreporter.line(f"RERUN {nodeid} ({line})")
