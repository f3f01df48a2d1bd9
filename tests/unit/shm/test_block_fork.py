"""A forked child's handles are its parent's: the child's exit, close or garbage collection leaves the
block open for the parent's readers, and the child may never publish into the parent's block."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = r"""
import gc, os, sys
import numpy as np
from simbridge.shm import Block, NotWriter, Timeout, _core

name, how = sys.argv[1], sys.argv[2]
writer = Block.create(name, 4, np.float64)
writer.publish(np.zeros(4))
reader = Block.open(name, timeout=5)
pid = os.fork()
if pid == 0:
    if how == "exit":  # normal interpreter exit: atexit, weakref finalizers, module teardown
        sys.exit(0)
    if how == "close":
        writer.close()
        reader.close()
        os._exit(0)
    if how == "gc":
        del writer, reader
        gc.collect()
        os._exit(0)
    if how == "publish":
        for attempt in (lambda: writer.publish(np.ones(4)), lambda: writer.loan().__enter__()):
            try:
                attempt()
                os._exit(5)
            except NotWriter as exc:
                assert "forked child" in str(exc), exc
        os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
header = reader.header()
assert header["state"] == _core.STATE_OPEN, "the child's exit closed the parent's block"
assert header["readers"] == 1, f"the child took the parent's reader off the count: {header['readers']}"
assert os.path.exists(f"/dev/shm/simbridge.{name}"), "the child unlinked the parent's block"
try:
    reader.read(after=1, timeout=0.05)
    raise AssertionError("nothing was published")
except Timeout:
    pass  # WriterClosed here is the defect: readers told the writer closed while it lives
writer.publish(np.full(4, 2.0))
assert reader.read(after=1, timeout=5).iteration == 2
writer.close()
print("ok", flush=True)
"""


@pytest.mark.parametrize("how", ["exit", "close", "gc", "publish"])
def test_a_forked_childs_end_leaves_the_parents_block_open(block_name: str, how: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, block_name, how],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "ok"
