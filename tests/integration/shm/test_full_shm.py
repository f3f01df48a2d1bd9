"""A full /dev/shm gives a clear NoSpace error at create time, never a SIGBUS at the first write.

The test runs Python in its own mount namespace whose /dev/shm is a 1 MiB tmpfs (needs root and
util-linux `unshare`, both present in CI), so the machine's real /dev/shm is never filled.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from tests.support import require

pytestmark = pytest.mark.integration

SCRIPT = """
import numpy as np
from simbridge.shm import Block, NoSpace
try:
    Block.create("too-big", 1_000_000, np.float32)  # 8 MB with two slots, in a 1 MiB /dev/shm
except NoSpace as exc:
    print("nospace:", exc)
with Block.create("fits", 1000, np.float32) as b:
    b.publish(np.ones(1000, np.float32))
    print("fits ok")
"""


def test_a_block_bigger_than_dev_shm_is_refused_clearly() -> None:
    require(os.geteuid() == 0 and shutil.which("unshare") is not None, "root and unshare (util-linux)")
    shell = f"mount -t tmpfs -o size=1m tmpfs /dev/shm && exec {sys.executable} -c '{SCRIPT}'"
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", shell], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "/dev/shm has no room for block 'too-big'" in result.stdout and "nospace:" in result.stdout
    assert "fits ok" in result.stdout
