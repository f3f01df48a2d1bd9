"""A writer SIGKILLed at random points of publish never makes a reader accept torn data.

Each trial starts a writer that publishes 1.38 MB arrays filled with their iteration id as fast as it
can, reads alongside it, kills it at a random moment, then checks that the last commit is intact and
that waiting for more ends in PeerGone. A slot whose sequence number is left odd proves the kill
landed inside a publish; the test requires that many trials did.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simbridge.shm import Block, PeerGone

pytestmark = pytest.mark.integration

ELEMS = 1_382_400 // 4  # the EKI observation array's size, as uint32


def check_uniform(snap_array: np.ndarray, iteration: int) -> None:
    first = int(snap_array[0])
    assert first == iteration, f"array says iteration {first}, header says {iteration}"
    assert (snap_array == first).all(), "torn array: mixed iterations"


def test_500_random_sigkills_of_a_c_writer(
    c_peer: Path, block_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIMBRIDGE_SHM__PEER_CHECK_MS", "20")
    rng = random.Random(20261122)
    out = np.empty(ELEMS, np.uint32)
    mid_publish = 0
    trials = 500
    for trial in range(trials):
        name = f"{block_name}-{trial}"
        writer = subprocess.Popen(
            [str(c_peer), "writer", name, str(ELEMS)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        with Block.open(name, timeout=10, shape=ELEMS, dtype=np.uint32) as reader:
            deadline = time.monotonic() + rng.uniform(0, 0.01)
            last = 0
            while time.monotonic() < deadline:  # read alongside the writer
                snap = reader.read(after=last, timeout=10, out=out)
                check_uniform(out, snap.iteration)
                last = snap.iteration
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
            if any(slot["seq"] % 2 for slot in reader.header()["slots"]):
                mid_publish += 1
            snap = reader.read(timeout=10, out=out)  # the last complete publish survives the crash
            check_uniform(out, snap.iteration)
            with pytest.raises(PeerGone):
                reader.read(after=snap.iteration, timeout=30)
        Path(f"/dev/shm/simbridge.{name}").unlink(missing_ok=True)
    print(f"{mid_publish} of {trials} kills landed mid-publish")
    # The kills must really have hit publishes in flight, or this test proves nothing.
    assert mid_publish >= trials // 10, f"only {mid_publish} of {trials} kills landed mid-publish"


PY_WRITER = """
import sys, numpy as np
from simbridge.shm import Block
b = Block.create(sys.argv[1], {elems}, np.uint32)
print("ready", flush=True)
it = 0
while True:
    it += 1
    if it % 2:
        b.publish(np.full({elems}, it, np.uint32), iteration=it)
    else:
        with b.loan(iteration=it) as view:
            view[: {elems} // 2] = it
            view[{elems} // 2 :] = it
"""


def test_random_sigkills_of_a_python_writer(block_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIMBRIDGE_SHM__PEER_CHECK_MS", "20")
    rng = random.Random(7)
    out = np.empty(ELEMS, np.uint32)
    code = PY_WRITER.format(elems=ELEMS)
    for trial in range(25):
        name = f"{block_name}-py{trial}"
        writer = subprocess.Popen([sys.executable, "-c", code, name], stdout=subprocess.PIPE, text=True)
        assert writer.stdout is not None
        for line in writer.stdout:
            if line.strip() == "ready":
                break
        with Block.open(name, timeout=10) as reader:
            reader.read(timeout=30, out=out)
            time.sleep(rng.uniform(0, 0.02))
            os.kill(writer.pid, signal.SIGKILL)
            writer.wait(timeout=10)
            snap = reader.read(timeout=10, out=out)
            check_uniform(out, snap.iteration)
            with pytest.raises(PeerGone):
                reader.read(after=snap.iteration, timeout=30)
        Path(f"/dev/shm/simbridge.{name}").unlink(missing_ok=True)
