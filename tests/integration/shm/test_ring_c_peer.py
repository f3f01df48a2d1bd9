"""Rings between Python and a C peer compiled from shm.h (as C11 and as C++17), and killed peers.

The kill trials run inside one C harness process (tests/c/ring_peer.c) that forks a peer per trial and
SIGKILLs it at a random point of its stream: hundreds of trials cost about a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tests.support import REPO, require, require_cc

from simbridge.shm import PeerGone, Ring, WriterClosed

pytestmark = pytest.mark.integration

FIXED = np.dtype([("i", "<i8"), ("triple", "<i8")])  # ring_peer.c's fixed record
TRIALS = 300


def _build(compiler: str, language: list[str], out: Path) -> Path:
    source = REPO / "tests" / "c" / "ring_peer.c"
    flags = ["-O2", "-Wall", "-Wextra", "-Werror", "-I", str(REPO / "include")]
    subprocess.run(
        [compiler, *language, *flags, str(source), "-o", str(out), "-pthread"], check=True, timeout=120
    )
    return out


@pytest.fixture(scope="session")
def ring_peer_c(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(require_cc(), ["-std=c11"], tmp_path_factory.mktemp("ringpeer") / "ring_peer")


@pytest.fixture(scope="session")
def ring_peer_cpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    require(cxx is not None, "a C++ compiler (c++)")
    assert cxx is not None
    return _build(cxx, ["-x", "c++", "-std=c++17"], tmp_path_factory.mktemp("ringpeerpp") / "ring_peer_cpp")


@pytest.fixture(params=["c11", "c++17"])
def ring_peer(request: pytest.FixtureRequest) -> Path:
    path: Path = request.getfixturevalue("ring_peer_c" if request.param == "c11" else "ring_peer_cpp")
    return path


def var_record(i: int) -> tuple[int, bytes]:
    """ring_peer.c's variable record i: (type, payload)."""
    n = i % 251 + 8
    head = (i & 0xFFFFFFFF).to_bytes(4, "little") + (~i & 0xFFFFFFFF).to_bytes(4, "little")
    body = bytes((i * 7 + j) & 0xFF for j in range(8, n))
    return i % 1000, head + body


def _finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def test_c_producer_to_python_consumer_variable_records_through_many_wraps(
    ring_peer: Path, block_name: str
) -> None:
    count = 20_000  # about 3 MB through a 4 KiB ring: hundreds of wraps, padding records included
    proc = subprocess.Popen(
        [str(ring_peer), "produce", block_name, "var", str(count), "4096"], stdout=subprocess.PIPE, text=True
    )
    try:
        with Ring.open(block_name, timeout=20) as ring:
            assert ring.producer_pid == proc.pid and not ring.fixed
            got: list[tuple[int, bytes]] = []
            while len(got) < count:
                got.extend(ring.pop_many(512, timeout=20, typed=True))
            assert got == [var_record(i) for i in range(count)]
            with pytest.raises(WriterClosed):
                ring.pop(timeout=20)
    finally:
        _finish(proc)


def test_c_producer_to_python_consumer_fixed_records(ring_peer: Path, block_name: str) -> None:
    count = 50_000
    proc = subprocess.Popen(
        [str(ring_peer), "produce", block_name, "fixed", str(count), "256"], stdout=subprocess.PIPE, text=True
    )
    try:
        # A C producer writes no dtype description: the consumer states it (and the size is checked).
        with Ring.open(block_name, timeout=20, record_dtype=FIXED) as ring:
            out = np.empty(1000, FIXED)
            parts = []
            while sum(len(p) for p in parts) < count:
                n = ring.pop_many(out, timeout=20)
                parts.append(out[:n].copy())
            records = np.concatenate(parts)
            np.testing.assert_array_equal(records["i"], np.arange(count))
            np.testing.assert_array_equal(records["triple"], 3 * np.arange(count))
    finally:
        _finish(proc)


@pytest.mark.parametrize("fixed", [False, True], ids=["variable", "fixed"])
def test_python_producer_to_c_consumer(ring_peer: Path, block_name: str, fixed: bool) -> None:
    count = 20_000
    with Ring.create(
        block_name, capacity=4096 if not fixed else 128, record_dtype=FIXED if fixed else None
    ) as ring:
        proc = subprocess.Popen(
            [str(ring_peer), "consume", block_name, "fixed" if fixed else "var", str(count)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            if fixed:
                records = np.zeros(count, FIXED)
                records["i"] = np.arange(count)
                records["triple"] = 3 * np.arange(count)
                for start in range(0, count, 700):  # batches larger than the ring: pushed as room frees
                    ring.push_many(records[start : start + 700], timeout=20)
            else:
                for i in range(count):
                    t, payload = var_record(i)
                    ring.push(payload, type=t, timeout=20)
            assert ring.counters()["pushed"] == count
        finally:
            if not fixed:
                ring.close()  # the C consumer expects the end of the stream after its count
            out = _finish(proc)
    assert f"ok consumed {count}" in out


def test_hundreds_of_killed_producers_never_show_a_torn_record(ring_peer_c: Path, block_name: str) -> None:
    out = subprocess.run(
        [str(ring_peer_c), "kill-producer", block_name, str(TRIALS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok {TRIALS} trials" in out.stdout


def test_hundreds_of_killed_consumers_give_the_producer_peer_gone(ring_peer_c: Path, block_name: str) -> None:
    out = subprocess.run(
        [str(ring_peer_c), "kill-consumer", block_name, str(TRIALS)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok {TRIALS} trials" in out.stdout


def test_python_consumer_of_a_killed_c_producer_gets_every_whole_record_then_peer_gone(
    ring_peer_c: Path, block_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIMBRIDGE_SHM__PEER_CHECK_MS", "5")
    for trial in range(5):
        name = f"{block_name}.{trial}"
        proc = subprocess.Popen(
            [str(ring_peer_c), "produce", name, "var", str(10**9), "4096"], stdout=subprocess.PIPE, text=True
        )
        try:
            with Ring.open(name, timeout=20) as ring:
                stop_at = 500 + 977 * trial
                i = 0
                with pytest.raises(PeerGone) as gone:
                    while True:
                        if i == stop_at:
                            os.kill(proc.pid, signal.SIGKILL)
                        assert ring.pop_typed(timeout=20) == var_record(i)
                        i += 1
                assert i >= stop_at and gone.value.pid == proc.pid
                assert not isinstance(gone.value, WriterClosed)
        finally:
            proc.kill()
            proc.wait(timeout=10)
            Path(f"/dev/shm/simbridge.{name}").unlink(missing_ok=True)


def test_python_producer_gets_peer_gone_when_a_python_consumer_is_killed(block_name: str) -> None:
    code = (
        "import sys, os, signal\n"
        "from simbridge.shm import Ring\n"
        f"r = Ring.open({block_name!r}, timeout=20)\n"
        "print(r.pop(timeout=20).decode(), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "SIMBRIDGE_SHM__PEER_CHECK_MS": "5"}
    with Ring.create(block_name, capacity=1024) as ring:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        ring.push(b"first")
        assert proc.stdout is not None and proc.stdout.readline().strip() == "first"
        proc.wait(timeout=20)
        with pytest.raises(PeerGone) as gone:
            for _ in range(1000):  # fills the ring, then waits for room that never comes
                ring.push(b"x" * 100, timeout=20)
        assert gone.value.pid == proc.pid
