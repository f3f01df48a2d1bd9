"""A C peer compiled from shm.h exchanges arrays with Python both ways, woken through the futex.

Every test runs with the peer built as C11 and as C++17 (a CUDA model's host code is C++).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from simbridge.shm import Block, ChecksumRequired, LayoutMismatch, PeerGone

pytestmark = pytest.mark.integration


@pytest.fixture(params=["c11", "c++17"])
def peer_binary(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue("c_peer" if request.param == "c11" else "cpp_peer")
    return path


def read_line(proc: subprocess.Popen[str], expected: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if expected in line:
            return line
    raise AssertionError(f"peer never printed {expected!r} (exit {proc.poll()})")


@pytest.mark.parametrize("spin_us", [0, 50], ids=["futex-only", "spin-then-futex"])
def test_python_and_c_ping_pong_both_directions(
    peer_binary: Path, block_name: str, spin_us: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIMBRIDGE_SHM__SPIN_US", str(spin_us))
    rounds = 200
    with Block.create(f"{block_name}.py2c", 1000, np.float64) as to_c:
        peer = subprocess.Popen(
            [
                str(peer_binary),
                "echo",
                f"{block_name}.py2c",
                f"{block_name}.c2py",
                str(rounds),
                str(spin_us * 1000),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with Block.open(f"{block_name}.c2py", timeout=20, shape=1000, dtype=np.float64) as from_c:
                assert from_c.writer_pid == peer.pid  # the C side owns what it writes
                rng = np.random.default_rng(0)
                out = np.empty(1000)
                for it in range(1, rounds + 1):
                    x = rng.standard_normal(1000)
                    to_c.publish(x, iteration=it)
                    snap = from_c.read(after=it - 1, timeout=20, out=out)
                    assert snap.iteration == it
                    np.testing.assert_array_equal(out, 2 * x + 1)
                header = from_c.header()
                assert header["commit"] == rounds and header["checksum"]
        finally:
            to_c.close()  # lets the peer's final read end with "closed"
            assert peer.wait(timeout=30) == 0, peer.stderr.read() if peer.stderr else ""


def test_c_reader_sees_a_killed_python_writer_quickly(peer_binary: Path, block_name: str) -> None:
    code = (
        "import sys, numpy as np\n"
        "from simbridge.shm import Block\n"
        f"b = Block.create({block_name!r}, 4, np.float32)\n"
        "b.publish(np.ones(4, np.float32))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    read_line(owner, "ready")
    peer = subprocess.Popen(
        [str(peer_binary), "wait", block_name, "30000"], stdout=subprocess.PIPE, text=True
    )
    read_line(peer, "waiting")
    killed_at = time.monotonic()
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    line = read_line(peer, "after")
    elapsed = time.monotonic() - killed_at
    assert "the writer process is gone" in line, line
    assert peer.wait(timeout=10) == 13  # 10 - SB_EPEERGONE
    assert elapsed < 5, f"the C peer took {elapsed:.1f} s to notice (it checks every 0.2 s)"
    Path(f"/dev/shm/simbridge.{block_name}").unlink(missing_ok=True)


def test_python_reader_sees_a_killed_c_writer_quickly(peer_binary: Path, block_name: str) -> None:
    peer = subprocess.Popen(
        [str(peer_binary), "hold", block_name, "16", "216"], stdout=subprocess.PIPE, text=True
    )
    read_line(peer, "ready")
    with Block.open(block_name, timeout=10, shape=(16, 216), dtype=np.float32) as reader:
        assert reader.read(timeout=5).iteration == 1
        os.kill(peer.pid, signal.SIGKILL)
        peer.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(PeerGone, match=f"writer pid {peer.pid} is gone"):
            reader.read(after=1, timeout=60)
        assert time.monotonic() - start < 5


def test_a_c_model_built_with_other_sizes_is_refused(peer_binary: Path, block_name: str) -> None:
    peer = subprocess.Popen(
        [str(peer_binary), "hold", block_name, "16", "100"], stdout=subprocess.PIPE, text=True
    )
    try:
        read_line(peer, "ready")
        with pytest.raises(LayoutMismatch, match=r"holds \(16, 100\) float32, expected \(16, 216\)"):
            Block.open(block_name, timeout=10, shape=(16, 216), dtype=np.float32)
    finally:
        peer.kill()
        peer.wait(timeout=10)
        Path(f"/dev/shm/simbridge.{block_name}").unlink(missing_ok=True)


API_CHECKS = [
    "open-timeout",  # sb_block_open returns SB_ETIMEDOUT when its timeout elapses
    "open-once",  # timeout 0 tries once and says what it found (SB_ENOENT)
    "huge-zero-shape",  # (0, 2**63) is refused: no array library can hold it
    "bad-mode",  # mode bits beyond 0777 are refused
    "create",
    "mode-zero-is-0600",  # mode 0 means the documented 0600
    "accessors",  # dtype, ndim, shape, itemsize, payload bytes, slots, checksum, owner pid
    "next-iteration-first",  # SB_NEXT_ITERATION starts at 1...
    "explicit-iteration",
    "next-iteration",  # ...and continues from the caller's own last id
    "order",
    "begin-write",  # the in-place write path
    "commit-write",
    "abort-write",
    "open",
    "reader-accessors",
    "reader-may-not-publish",
    "read-latest",  # sb_block_read returns the latest commit, not the first >= min_iteration
    "read-timeout",
    "fork-close",  # a forked child's close leaves the parent's block open and named
    "scribbled-read",  # slot_count = 0 under an attached reader: SB_EHEADER, not SIGFPE
    "scribbled-publish",
    "repaired",
]


def test_the_c_api_does_what_shm_h_documents(peer_binary: Path, block_name: str) -> None:
    proc = subprocess.run(
        [str(peer_binary), "api", block_name],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == [word for check in API_CHECKS for word in (check, "ok")]
    assert not Path(f"/dev/shm/simbridge.{block_name}").exists()


def test_a_python_reader_can_require_checksums_from_a_c_writer(peer_binary: Path, block_name: str) -> None:
    peer = subprocess.Popen(
        [str(peer_binary), "hold", block_name, "2", "3", "plain"], stdout=subprocess.PIPE, text=True
    )
    try:
        read_line(peer, "ready")
        with pytest.raises(ChecksumRequired, match="publishes without CRC32C"):
            Block.open(block_name, timeout=10, require_checksum=True)
        with Block.open(block_name, timeout=10) as reader:  # still readable by whoever accepts that
            assert not reader.checksum and reader.read(timeout=5).iteration == 1
    finally:
        peer.kill()
        peer.wait(timeout=10)
        Path(f"/dev/shm/simbridge.{block_name}").unlink(missing_ok=True)
