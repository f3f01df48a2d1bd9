"""A peer that scribbles on a live segment's header never crashes an attached reader or the writer.

Every field is overwritten with garbage through a plain memory map of /dev/shm while a writer and a
reader are attached. Fields of the write-once identity must turn every later call into Corrupted;
fields the protocol keeps changing may give any typed error or still work. Each case runs in a
child interpreter, so a SIGFPE, SIGSEGV, SIGBUS or an endless loop is a failed test, not a lost run.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

SCRIPT = r"""
import sys
import numpy as np
from simbridge.errors import SimbridgeError
from simbridge.shm import Block, _core

name, field, width, value = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
offset = _core.FIELD_OFFSETS[field]
writer = Block.create(name, (64, 64), np.float32)
reader = Block.open(name, timeout=5)
writer.publish(np.ones((64, 64), np.float32))
raw = np.memmap(f"/dev/shm/simbridge.{name}", dtype=np.uint8, mode="r+")
raw[offset : offset + width] = np.frombuffer(value.to_bytes(width, "little"), np.uint8)
raw.flush()

def loan():
    with writer.loan() as view:
        view[:] = 3

calls = {
    "read": lambda: reader.read(timeout=0.05),
    "read_after": lambda: reader.read(after=1, timeout=0.05),
    "view": lambda: reader.read(copy=False, timeout=0.05),
    "header": reader.header,
    "latest": lambda: reader.latest_iteration,
    "alive": reader.writer_alive,
    "publish": lambda: writer.publish(np.ones((64, 64), np.float32)),
    "loan": loan,
    "writer_header": writer.header,
}
outcomes = []
for what, call in calls.items():
    try:
        call()
        outcomes.append(f"{what}=ok")
    except SimbridgeError as exc:
        outcomes.append(f"{what}={type(exc).__name__}")
print(" ".join(outcomes), flush=True)
"""

U32, U64 = 4, 8
# The write-once identity: any change means the segment is no longer what was validated at open.
IDENTITY = [
    ("magic", U64, 0),
    ("abi_version", U32, 99),
    ("dtype", U32, 200),
    ("itemsize", U32, 0),
    ("ndim", U32, 2**31),
    ("slot_count", U32, 0),
    ("slot_count", U32, 4096),
    ("shape", U64, 2**60),
    ("payload_bytes", U64, 2**40),
    ("slot_stride", U64, 0),
    ("payload_offset", U64, 2**40),
    ("total_bytes", U64, 2**62),
    ("flags", U32, 0),
    ("owner_pid", U32, 2**31 - 1),
]
# Fields the protocol changes all the time: garbage there may not crash or hang anything either.
LIVE = [
    ("commit", U64, 2**63 + 1),
    ("state", U32, 7),
    ("futex", U32, 2**32 - 1),
    ("waiters", U32, 2**32 - 1),
    ("last_iteration", U64, 2**64 - 1),
    ("slot.seq", U64, 2**63 + 1),
    ("slot.iteration", U64, 2**64 - 1),
    ("slot.progress", U64, 2**63),
]


def run_case(block_name: str, field: str, width: int, value: int) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, block_name, field, str(width), str(value)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode < 0:
        raise AssertionError(
            f"{field} = {value}: the process died of {signal.Signals(-proc.returncode).name}; "
            f"{proc.stderr[-1500:]}"
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(item.split("=") for item in proc.stdout.splitlines()[-1].split())


@pytest.mark.parametrize(("field", "width", "value"), IDENTITY, ids=[f"{f}={v}" for f, _, v in IDENTITY])
def test_overwritten_identity_fields_give_corrupted_never_a_signal(
    block_name: str, field: str, width: int, value: int
) -> None:
    outcomes = run_case(block_name, field, width, value)
    for call in ("read", "read_after", "view", "header", "latest", "publish", "loan", "writer_header"):
        assert outcomes[call] == "Corrupted", outcomes
    assert outcomes["alive"] == "ok", outcomes  # judged from the identity validated at open


@pytest.mark.parametrize(("field", "width", "value"), LIVE, ids=[f"{f}={v}" for f, _, v in LIVE])
def test_garbage_in_protocol_fields_gives_typed_errors_or_works(
    block_name: str, field: str, width: int, value: int
) -> None:
    outcomes = run_case(block_name, field, width, value)
    assert set(outcomes) >= {"read", "publish", "header"}, outcomes
    typed = {"ok", "Timeout", "WriterClosed", "PeerGone", "Corrupted"}
    assert all(outcome in typed for outcome in outcomes.values()), outcomes
