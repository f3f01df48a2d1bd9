"""Reader processes the writer does not control: one SIGKILLed while parked, one of another user.

A parked reader raises the header's waiters flag; the writer clears it when it wakes readers, so a
reader killed while parked costs one needless FUTEX_WAKE, not one on every later publish. A block
created with mode 0o644 can be read by another user, who attaches read-only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simbridge.errors import SimbridgeError
from simbridge.shm import AccessDenied, Block

pytestmark = pytest.mark.integration

PARKED_READER = r"""
import sys
from simbridge.shm import Block
reader = Block.open(sys.argv[1], timeout=10)
print("parking", flush=True)
reader.read(after=10**6, timeout=120)
"""


def test_a_reader_killed_while_parked_leaves_no_waiter_behind(block_name: str) -> None:
    env = {**os.environ, "SIMBRIDGE_SHM__SPIN_US": "0", "SIMBRIDGE_SHM__PEER_CHECK_MS": "10000"}
    with Block.create(block_name, 8, np.float64) as writer:
        writer.publish(np.zeros(8))
        reader = subprocess.Popen(
            [sys.executable, "-c", PARKED_READER, block_name], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert reader.stdout is not None
            while "parking" not in reader.stdout.readline():
                assert reader.poll() is None, "the reader died before parking"
            deadline = time.monotonic() + 20
            while writer.header()["waiters"] == 0:
                assert time.monotonic() < deadline, "the reader never parked on the futex"
                time.sleep(0.001)
        finally:
            reader.send_signal(signal.SIGKILL)
            reader.wait(timeout=10)
        assert writer.header()["waiters"] != 0  # the dead reader's flag is still up...
        writer.publish(np.ones(8))
        assert writer.header()["waiters"] == 0  # ...and the next publish took it down for good
        for _ in range(3):
            writer.publish(np.ones(8))
            assert writer.header()["waiters"] == 0


OTHER_USER_READER = r"""
import os, sys
import numpy as np
from simbridge.errors import SimbridgeError
from simbridge.shm import AccessDenied, Block

name, private, ready_fd, go_fd = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.setgroups([])
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
try:
    Block.open(private, timeout=0)
    sys.exit("a 0600 block of another user was opened")
except AccessDenied as exc:
    assert isinstance(exc, SimbridgeError) and isinstance(exc, PermissionError)
reader = Block.open(name, timeout=5, shape=16, dtype=np.float32)
assert not reader._seg.writable, "expected a read-only attach"
snap = reader.read(timeout=5)
assert snap.iteration == 1 and (snap.array == 1).all()
view = reader.read(copy=False, timeout=5)
assert not view.array.flags.writeable
os.write(ready_fd, b"r")
os.read(go_fd, 1)
snap = reader.read(after=1, timeout=20)  # not woken by the futex: it polls
assert snap.iteration == 2 and (snap.array == 2).all(), snap
reader.close()
print("ok", flush=True)
"""


def test_another_user_reads_a_0644_block_read_only(block_name: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a reader as another user (nobody, 65534)")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    with (
        Block.create(block_name, 16, np.float32, mode=0o644) as writer,
        Block.create(f"{block_name}.private", 1, np.float32, mode=0o600),
    ):
        assert os.stat(f"/dev/shm/simbridge.{block_name}").st_mode & 0o777 == 0o644
        writer.publish(np.ones(16, np.float32))
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                OTHER_USER_READER,
                block_name,
                f"{block_name}.private",
                str(ready_w),
                str(go_r),
            ],
            pass_fds=(ready_w, go_r),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        os.close(ready_w)
        os.close(go_r)
        try:
            assert os.read(ready_r, 1) == b"r", proc.communicate(timeout=30)
            writer.publish(np.full(16, 2, np.float32))
            os.write(go_w, b"g")
            out, err = proc.communicate(timeout=60)
        finally:
            os.close(ready_r)
            os.close(go_w)
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, out + err[-2000:]
        assert out.splitlines()[-1] == "ok"
        assert writer.header()["readers"] == 0  # a read-only reader writes nothing into the block


def test_simbridge_error_is_the_root_for_access_denied() -> None:
    assert issubclass(AccessDenied, SimbridgeError) and issubclass(AccessDenied, PermissionError)
