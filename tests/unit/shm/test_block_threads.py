"""close() from one thread while others are inside read, publish, loan or a wait on the same Block.

Each scenario runs in a child interpreter, so a SIGSEGV (the mapping unmapped under a call that had
released the GIL) shows up as a failed test instead of killing the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

SCRIPT = r"""
import sys, threading, time
import numpy as np
from simbridge.shm import Block, BlockClosed, PeerGone, Timeout

name, trials = sys.argv[1], int(sys.argv[2])
ELEMS = 300_000  # 1.2 MB: copies run with the GIL released, readers follow publishes cut-through
data = np.ones(ELEMS, np.float32)
ENDINGS = (BlockClosed, PeerGone)  # WriterClosed is a PeerGone: the writer's close ended a wait
for trial in range(trials):
    writer = Block.create(f"{name}-{trial}", ELEMS, np.float32)
    reader = Block.open(f"{name}-{trial}", timeout=5)
    waiter = Block.open(f"{name}-{trial}", timeout=5)
    writer.publish(data)
    done = {"read": 0, "publish": 0, "view": 0}
    unexpected = []

    def loop(what, call):
        try:
            while True:
                call()
                done[what] += 1
        except ENDINGS:
            return
        except BaseException as exc:  # anything else is a defect
            unexpected.append(f"{what}: {type(exc).__name__}: {exc}")

    def publish():
        writer.publish(data)
        with writer.loan() as view:
            view[:] = 2

    def wait():
        try:
            waiter.read(after=10**9, timeout=30)  # parked until a close ends it
        except ENDINGS:
            return
        except BaseException as exc:
            unexpected.append(f"wait: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=loop, args=("read", lambda: reader.read(timeout=5))),
        threading.Thread(target=loop, args=("view", lambda: reader.read(timeout=5, copy=False))),
        threading.Thread(target=loop, args=("publish", publish)),
        threading.Thread(target=wait),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while min(done.values()) < 1 + trial % 3 and time.monotonic() < deadline and not unexpected:
        time.sleep(0.0005)
    # Close in a different order each trial: reader first, writer first, the waiter's handle first.
    handles = [reader, writer, waiter]
    for k in range(trial % 3):
        handles.append(handles.pop(0))
    for handle in handles:
        handle.close()
    for t in threads:
        t.join(timeout=30)
    if any(t.is_alive() for t in threads):
        print(f"trial {trial}: a thread never came back after close", flush=True)
        sys.exit(3)
    if unexpected:
        print(f"trial {trial}: {unexpected}", flush=True)
        sys.exit(4)
print("ok", flush=True)
"""


def test_close_while_other_threads_read_publish_loan_and_wait_never_crashes(block_name: str) -> None:
    env = {**os.environ, "SIMBRIDGE_SHM__PEER_CHECK_MS": "20", "SIMBRIDGE_SHM__SPIN_US": "20"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, block_name, "24"],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    if proc.returncode < 0:
        died = signal.Signals(-proc.returncode).name
        raise AssertionError(f"the process died of {died}: {proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[-1] == "ok"  # (the library's log lines may come before it)
