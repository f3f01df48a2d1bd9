"""Fixtures shared by every test: a fresh block name whose leftover segments are removed afterwards."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def block_name() -> Iterator[str]:
    """A fresh block name; whatever segment is left under it is removed afterwards."""
    name = f"test-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for leftover in Path("/dev/shm").glob(f"simbridge.{name}*"):
        leftover.unlink(missing_ok=True)
