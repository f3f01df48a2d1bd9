"""Helpers every test package may import: the CI rule for real components, and the repo root."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
