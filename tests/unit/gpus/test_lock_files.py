"""The lock folder and what is in it are not to be trusted: a removed folder, garbage records,
garbage in the line's counter, a huge lock file. Each becomes a typed error or is ignored.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from simbridge.gpus import GpuPool, LeaseTimeout, LockDirError, LockDirRemoved
from simbridge.gpus.cli import app


def test_a_removed_lock_folder_is_noticed_before_a_gpu_is_shared(lock_dir: Path) -> None:
    holder = GpuPool(slots=1, lock_dir=lock_dir)
    other = GpuPool(slots=1, lock_dir=lock_dir)  # a long-lived worker, built before the removal
    with holder.lease(timeout=0):
        shutil.rmtree(lock_dir)
        GpuPool(slots=1, lock_dir=lock_dir)  # a newcomer re-creates the folder, empty
        with pytest.raises(LockDirRemoved, match="removed or replaced") as caught:
            other.lease(timeout=0)
        assert isinstance(caught.value, LockDirError)
        assert isinstance(caught.value, OSError)


def test_a_lock_folder_removed_and_not_recreated_is_a_typed_error(lock_dir: Path) -> None:
    pool = GpuPool(slots=2, lock_dir=lock_dir)
    shutil.rmtree(lock_dir)
    with pytest.raises(LockDirRemoved):
        pool.lease(timeout=0)
    with pytest.raises(LockDirRemoved):
        pool.waiting()


def test_a_replaced_lock_file_is_noticed(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    with pool.lease(timeout=0):
        pass
    # Swap the file for another after the pool has opened it by name: a rename race that
    # the inode check after locking catches (we simulate it by racing in a thread).
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            (lock_dir / "spare").touch()
            os.replace(lock_dir / "spare", lock_dir / "gpu-0.lock")

    swapper = threading.Thread(target=swap)
    swapper.start()
    refused = 0
    try:
        deadline = time.monotonic() + 30
        while refused == 0 and time.monotonic() < deadline:
            try:
                pool.lease(timeout=0).release()
            except LockDirRemoved:
                refused += 1
            except LeaseTimeout:
                pass
    finally:
        stop.set()
        swapper.join(timeout=30)
    assert refused, "a lock file replaced between open and lock was never noticed"


GARBAGE = [
    b'{"pid": 18446744073709551616, "pids": [18446744073709551616]}',
    b'{"pid": -1, "pids": [-1, 0, -4194305]}',
    b'{"pids": ["twelve", null, 1.5, true, {}]}',
    b'{"pids": [NaN, Infinity]}',
    b'{"pids": [1], "since": 1e300, "host": 7}',
    b'{"pids": [1], "since": NaN, "host": "a\\u0000b"}',
    b"[" * 60000,
    b'"just a string"',
    b"\xff\xfe\x00garbage",
    b'{"pids": {"a": 1}}',
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_in_a_held_lock_file_is_shown_as_unknown(
    lock_dir: Path, monkeypatch: pytest.MonkeyPatch, garbage: bytes
) -> None:
    holder = GpuPool(slots=1, lock_dir=lock_dir)
    with holder.lease(timeout=0):
        (lock_dir / "gpu-0.lock").write_bytes(garbage)
        waiter = GpuPool(slots=1, lock_dir=lock_dir)
        (shown,) = waiter.holders()
        assert shown.held
        assert all(1 <= pid <= 4 * 1024 * 1024 for pid in shown.pids)
        assert shown.pid is None or shown.pid in shown.pids
        with pytest.raises(LeaseTimeout, match="timed out"):
            waiter.lease(timeout=0)
        monkeypatch.setenv("SIMBRIDGE_GPUS__DISCOVERY", "slots")
        monkeypatch.setenv("SIMBRIDGE_GPUS__SLOTS", "1")
        monkeypatch.setenv("SIMBRIDGE_GPUS__LOCK_DIR", str(lock_dir))
        monkeypatch.delenv("SIMBRIDGE_CONFIG", raising=False)
        monkeypatch.chdir(lock_dir.parent)
        result = CliRunner().invoke(app, ["--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["gpus"][0]["held"] is True


def test_a_huge_lock_file_is_cut_not_padded_to(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    with pool.lease(timeout=0):
        pass
    os.truncate(lock_dir / "gpu-0.lock", 2**40)  # sparse: a terabyte of nothing
    with pool.lease(timeout=0) as lease:
        assert (lock_dir / "gpu-0.lock").stat().st_size < 4096
        (shown,) = pool.holders()
        assert shown.pids == (os.getpid(),)
        assert lease.indices == (0,)


LINE_GARBAGE = [
    (b"-000000000000005", None),
    (b"9999999999999999", None),
    (b"12\x00\xff", None),
    (b"\xd9\xa3", None),
    (b"", "9" * 40 + "-1"),
    (b"", "\u0663\u0663-1"),
    (b"", "not-a-ticket"),
]


@pytest.mark.parametrize(("counter", "ticket"), LINE_GARBAGE, ids=range(len(LINE_GARBAGE)))
def test_garbage_in_the_line_keeps_the_line_working(
    lock_dir: Path, counter: bytes, ticket: str | None
) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir, poll_interval=0.002)
    (lock_dir / "queue.lock").write_bytes(counter)
    if ticket is not None:
        (lock_dir / "queue" / ticket).touch()
    blocker = pool.lease(timeout=0)
    served: list[int] = []
    waiter = threading.Thread(target=lambda: served.append(len(pool.lease(timeout=30).indices)))
    waiter.start()
    deadline = time.monotonic() + 30
    while pool.waiting() != 1:  # the waiter is seen in line (a garbage ticket would hide it)
        assert time.monotonic() < deadline, "the waiter never showed up in line"
        time.sleep(0.002)
    blocker.release()
    waiter.join(timeout=30)
    assert served == [1]
    assert pool.waiting() == 0


def test_a_relative_lock_folder_stays_put_after_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    pool = GpuPool(slots=1, lock_dir="locks")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pool.lease(timeout=0):
        (shown,) = GpuPool(slots=1, lock_dir=tmp_path / "locks").holders()
        assert shown.held
    assert pool.lock_dir == tmp_path / "locks"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
_RECORDS = (
    st.binary(max_size=300)
    | _JSON.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {
            "pids": st.lists(st.integers() | st.floats() | st.text(max_size=5), max_size=5),
            "since": _JSON,
            "host": _JSON,
        }
    ).map(lambda v: json.dumps(v).encode())
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=_RECORDS)
def test_any_bytes_in_a_held_lock_file_read_as_valid_or_unknown(lock_dir: Path, record: bytes) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    with pool.lease(timeout=0):
        (lock_dir / "gpu-0.lock").write_bytes(record)
        (shown,) = pool.holders()
    assert shown.held
    assert all(isinstance(pid, int) and 1 <= pid <= 4 * 1024 * 1024 for pid in shown.pids)
    assert shown.host is None or (shown.host.isprintable() and len(shown.host) <= 255)
