"""Fixtures and hooks shared by every test: a fresh block name whose leftover segments are removed
afterwards; logging put back after each test; the CI rules (a skipped integration test fails under
CI=true, a test that did not run part of itself says so, an assertion in a thread fails its test)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
import structlog


@pytest.fixture
def block_name() -> Iterator[str]:
    """A fresh block name; whatever segment is left under it is removed afterwards."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for leftover in Path("/dev/shm").glob(f"simbridge.{name}*"):
        leftover.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _logging_put_back() -> Iterator[None]:
    # A CLI test run in-process configures logging for the process; the next test gets it back as it was.
    root, ours = logging.getLogger(), logging.getLogger("simbridge")
    handlers, root_level, our_level = list(root.handlers), root.level, ours.level
    saved = structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(root_level)
    ours.setLevel(our_level)
    structlog.configure(**saved)


# ---- the CI rules ----------------------------------------------------------------------------------

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_NOT_RUN = "not run here"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    # CI must run every integration test: under CI=true a skip of one (in a fixture, a skip
    # marker or the test itself) is a failure, whatever helper or convention caused it.
    report: pytest.TestReport = yield
    if (
        IN_CI
        and report.skipped
        and not hasattr(report, "wasxfail")
        and item.get_closest_marker("integration")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: integration test skipped ({reason}); CI must run it, install what it needs"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    # The same rule for a whole integration module skipped at import (pytest.importorskip).
    report: pytest.CollectReport = yield
    if IN_CI and report.skipped and "integration" in Path(str(collector.path)).parts:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: integration module skipped ({reason}); CI must run it"
    return report


@pytest.fixture
def not_run_here(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """Call it with what a test that branches (no GPU here, no VPCLMULQDQ) did not run; the run's
    summary lists each under 'not run here', so a branch never passes as if it had been tested."""

    def record(what: str) -> None:
        request.node.user_properties.append((_NOT_RUN, what))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    seen = [
        (report.nodeid, value)
        for reports in terminalreporter.stats.values()
        for report in reports
        if isinstance(report, pytest.TestReport) and report.when == "call"
        for key, value in report.user_properties
        if key == _NOT_RUN
    ]
    if seen:
        terminalreporter.section(_NOT_RUN)
        for nodeid, what in seen:
            terminalreporter.write_line(f"{_NOT_RUN}: {nodeid}: {what}")
