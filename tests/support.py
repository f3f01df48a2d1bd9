"""Helpers every test package may import: the CI rule for real components, the repo root, named waits."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, what: str) -> None:
    """Skip when a real component is missing here, but fail under CI=true: CI must run everything."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {what} is missing; `make test` installs it as root")
    pytest.skip(f"{what} is missing")


def require_cc() -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    require(cc is not None, "a C compiler (cc)")
    assert cc is not None
    return cc


REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds (a named wait,
    never a bare sleep standing in for an event)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far: how a test sees a peer computing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def capture_events(name: str = "simbridge") -> Iterator[list[dict[str, Any]]]:
    """The key=value events simbridge's loggers emit under ``name``, as dicts (each with "event").

    Library loggers go through `logging` (simbridge.logs), so structlog's capture_logs cannot see
    them; this attaches a handler for the duration and restores the logger's level after.
    """
    events: list[dict[str, Any]] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            event = getattr(record, "simbridge_event", None)
            events.append(dict(event) if isinstance(event, dict) else {"event": record.getMessage()})
            events[-1].setdefault("log_level", record.levelname.lower())

    logger = logging.getLogger(name)
    handler, level = _Collect(level=logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
