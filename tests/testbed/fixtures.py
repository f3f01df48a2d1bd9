"""pytest fixtures of the loopback testbed: `testbed` (one per pytest run, started on first use and
stopped at the end), `tmp_remote_root` (a fresh remote folder per test) and `tmpfs_remote_root`
(a 2 MB tmpfs per test, for disk-full cases). Loaded by tests/integration/conftest.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import IN_CI
from tests.testbed import sweep
from tests.testbed.core import Testbed, missing_requirements


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """The session's testbed (Slurm + sshd on loopback). Skips (fails under CI=true) when this host
    cannot run it: not root, or the Debian packages are missing. SIMBRIDGE_TESTBED_KEEP=1 keeps its
    folder (logs, remote files) after the run."""
    why = missing_requirements()
    if why is not None:
        if IN_CI:
            pytest.fail(f"CI=true but {why}")
        pytest.skip(why)
    # Short and under /tmp: slurmd's unix sockets live below it (108 bytes at most).
    sweep.stop_stale()  # testbeds of pytest runs killed before their teardown
    root = Path(tempfile.mkdtemp(prefix=sweep.STALE_PREFIX))
    sweep.mark_owner(root)
    started = Testbed.up(root)
    try:
        yield started
    finally:
        started.down()
        if os.environ.get("SIMBRIDGE_TESTBED_KEEP", "") not in ("1", "true", "yes"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tmp_remote_root(testbed: Testbed) -> Path:
    """A fresh, empty folder below the testbed's remote_root, for one test."""
    return testbed.new_remote_root()


@pytest.fixture
def tmpfs_remote_root(testbed: Testbed) -> Iterator[Path]:
    """A fresh folder on a 2 MB tmpfs of its own (a remote disk that fills up), unmounted afterwards."""
    folder = testbed.mount_tmpfs(size="2m")
    try:
        yield folder
    finally:
        testbed.unmount(folder)
