"""GpuPool and GpuLease in one process: exclusivity, timeouts, bad requests, holders, FIFO order."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from simbridge.config import GpuSettings, Settings
from simbridge.errors import SimbridgeError
from simbridge.gpus import (
    GpuError,
    GpuPool,
    InvalidLeaseRequest,
    LeaseReleased,
    LeaseTimeout,
    LockDirError,
    NoSuchGpu,
)

GIB = 2**30


def test_lease_gives_index_env_and_fds(lock_dir: Path) -> None:
    pool = GpuPool(slots=4, lock_dir=lock_dir)
    with pool.lease() as lease:
        assert lease.indices == (0,)
        assert lease.env == {"CUDA_VISIBLE_DEVICES": "0"}
        assert len(lease.fds) == 1
        assert os.fstat(lease.fds[0]).st_ino == (lock_dir / "gpu-0.lock").stat().st_ino
        assert not lease.released
    assert lease.released


def test_two_leases_never_share_a_gpu_and_multi_gpu_env(lock_dir: Path) -> None:
    pool = GpuPool(slots=4, lock_dir=lock_dir)
    with pool.lease(2) as first, pool.lease(2) as second:
        assert set(first.indices).isdisjoint(second.indices)
        assert sorted(first.indices + second.indices) == [0, 1, 2, 3]
        assert second.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, second.indices))


def test_two_pools_on_one_folder_exclude_each_other(lock_dir: Path) -> None:
    # Same folder = same GPUs, whichever object (or process) asks.
    a = GpuPool(slots=1, lock_dir=lock_dir)
    b = GpuPool(slots=1, lock_dir=lock_dir)
    with a.lease(), pytest.raises(LeaseTimeout):
        b.lease(timeout=0)
    with b.lease(timeout=0) as lease:
        assert lease.indices == (0,)


def test_acquire_without_with_and_release_is_idempotent(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    lease = pool.acquire(timeout=0)
    lease.release()
    lease.release()
    with pool.lease(timeout=0) as again:
        assert again.indices == (0,)


def test_released_lease_refuses_its_fds(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    lease = pool.lease()
    lease.release()
    with pytest.raises(LeaseReleased, match="released"):
        _ = lease.fds
    with pytest.raises(LeaseReleased):
        lease.record_holder(1)


def test_timeout_error_says_what_was_waited_for(lock_dir: Path) -> None:
    pool = GpuPool(slots=2, lock_dir=lock_dir)
    with pool.lease(2):
        started = time.monotonic()
        with pytest.raises(LeaseTimeout) as caught:
            pool.lease(1, timeout=0.3)
        assert time.monotonic() - started >= 0.3
    message = str(caught.value)
    assert "1 GPU(s)" in message
    assert "2 of 2 held" in message
    assert str(os.getpid()) in message
    assert str(lock_dir) in message
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value, GpuError)
    assert isinstance(caught.value, SimbridgeError)


def test_zero_timeout_fails_at_once_when_busy(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir, default_timeout=60)
    with pool.lease(), pytest.raises(LeaseTimeout):
        pool.lease(timeout=0)


def test_default_timeout_comes_from_the_pool(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir, default_timeout=0.1)
    with pool.lease(), pytest.raises(LeaseTimeout, match=r"0\.1 s"):
        pool.lease()


@pytest.mark.parametrize("count", [0, -1, 5, True, 1.5, "1"])
def test_bad_counts_are_value_errors(lock_dir: Path, count: object) -> None:
    pool = GpuPool(slots=4, lock_dir=lock_dir)
    with pytest.raises(InvalidLeaseRequest) as caught:
        pool.lease(count, timeout=0)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    # A refused request must not leave a ticket behind in the line.
    assert pool.waiting() == 0


@pytest.mark.parametrize("timeout", [-1.0, math.nan])
def test_bad_timeouts_are_value_errors(lock_dir: Path, timeout: float) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    with pytest.raises(InvalidLeaseRequest, match="timeout"):
        pool.lease(timeout=timeout)


def test_pool_needs_exactly_one_of_slots_or_source(lock_dir: Path, fake_gpus: Any) -> None:
    with pytest.raises(InvalidLeaseRequest):
        GpuPool(lock_dir=lock_dir)
    with pytest.raises(InvalidLeaseRequest):
        GpuPool(slots=1, source=fake_gpus([GIB]), lock_dir=lock_dir)
    with pytest.raises(NoSuchGpu):
        GpuPool(slots=0, lock_dir=lock_dir)


def test_memory_floor_needs_memory_readings(lock_dir: Path) -> None:
    pool = GpuPool(slots=2, lock_dir=lock_dir)
    with pytest.raises(InvalidLeaseRequest, match="memory readings"):
        pool.lease(min_free_memory=GIB)


def test_memory_floor_picks_gpus_with_enough_free_memory(lock_dir: Path, fake_gpus: Any) -> None:
    fake = fake_gpus([16 * GIB, 16 * GIB, 80 * GIB])
    fake.free = [2 * GIB, 12 * GIB, 70 * GIB]
    pool = GpuPool(source=fake, lock_dir=lock_dir)
    with pool.lease(min_free_memory=10 * GIB) as lease:
        assert lease.indices == (1,)
        assert lease.gpus[0].memory_free == 12 * GIB
        with pool.lease(min_free_memory=10 * GIB) as other:
            assert other.indices == (2,)
            with pytest.raises(LeaseTimeout, match="10,240 MiB free"):
                pool.lease(min_free_memory=10 * GIB, timeout=0.05)


def test_memory_floor_above_every_gpu_is_no_such_gpu(lock_dir: Path, fake_gpus: Any) -> None:
    pool = GpuPool(source=fake_gpus([16 * GIB, 16 * GIB]), lock_dir=lock_dir)
    with pytest.raises(NoSuchGpu, match="fewer than 1"):
        pool.lease(min_free_memory=40 * GIB)
    with pytest.raises(InvalidLeaseRequest):
        pool.lease(min_free_memory=-1)


def test_memory_floor_waits_for_memory_to_come_free(lock_dir: Path, fake_gpus: Any) -> None:
    fake = fake_gpus([16 * GIB])
    fake.free = [1 * GIB]
    pool = GpuPool(source=fake, lock_dir=lock_dir)
    threading.Timer(0.2, lambda: fake.free.__setitem__(0, 15 * GIB)).start()
    with pool.lease(min_free_memory=8 * GIB, timeout=30) as lease:
        assert lease.indices == (0,)


def test_holders_show_pid_since_and_recorded_children(lock_dir: Path) -> None:
    pool = GpuPool(slots=3, lock_dir=lock_dir)
    with pool.lease(2) as lease:
        lease.record_holder(os.getppid())
        holders = {h.index: h for h in pool.holders()}
        for index in lease.indices:
            assert holders[index].held
            assert holders[index].pid == os.getpid()
            assert holders[index].pids == (os.getpid(), os.getppid())
            assert holders[index].since is not None
        (free,) = [h for h in holders.values() if h.index not in lease.indices]
        assert not free.held
        assert free.pid is None
    assert not any(h.held for h in pool.holders())


def test_threads_are_served_in_arrival_order(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir, poll_interval=0.002)
    order: list[int] = []
    blocker = pool.lease()
    threads = []
    for n in range(5):
        thread = threading.Thread(target=_lease_and_note, args=(pool, n, order))
        thread.start()
        threads.append(thread)
        _wait_for(lambda n=n: pool.waiting() == n + 1)
    blocker.release()
    for thread in threads:
        thread.join(timeout=30)
    assert order == [0, 1, 2, 3, 4]


def test_a_timed_out_waiter_leaves_the_line(lock_dir: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    order: list[int] = []
    blocker = pool.lease()
    quitter = threading.Thread(target=_lease_expecting_timeout, args=(pool,))
    quitter.start()
    _wait_for(lambda: pool.waiting() == 1)
    patient = threading.Thread(target=_lease_and_note, args=(pool, 7, order))
    patient.start()
    quitter.join(timeout=30)
    assert pool.waiting() == 1  # only the patient one is left
    blocker.release()
    patient.join(timeout=30)
    assert order == [7]
    assert pool.waiting() == 0


def test_a_big_request_holds_back_those_behind_it(lock_dir: Path) -> None:
    # FIFO: a 2-GPU request first in line is not overtaken by a later 1-GPU request.
    pool = GpuPool(slots=2, lock_dir=lock_dir, poll_interval=0.002)
    order: list[int] = []
    first = pool.lease()
    big = threading.Thread(target=_lease_and_note, args=(pool, 2, order, 2))
    big.start()
    _wait_for(lambda: pool.waiting() == 1)
    small = threading.Thread(target=_lease_and_note, args=(pool, 1, order, 1))
    small.start()
    _wait_for(lambda: pool.waiting() == 2)
    time.sleep(0.1)  # the free GPU stays free: the small one may not jump the line
    assert order == []
    first.release()
    big.join(timeout=30)
    small.join(timeout=30)
    assert order == [2, 1]


def test_from_settings_uses_configured_slots_without_nvml(lock_dir: Path) -> None:
    settings = Settings(gpus=GpuSettings(discovery="slots", slots=3, lock_dir=lock_dir))
    with GpuPool.from_settings(settings) as pool:
        assert [g.index for g in pool.gpus] == [0, 1, 2]
        assert pool.source.kind == "slots"
        assert pool.lock_dir == lock_dir
        with pool.lease(3, timeout=0) as lease:
            assert lease.indices == (0, 1, 2)


def test_lock_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(LockDirError, match="symlink"):
        GpuPool(slots=1, lock_dir=tmp_path / "link")
    with pytest.raises(LockDirError):
        (tmp_path / "file").write_text("x")
        GpuPool(slots=1, lock_dir=tmp_path / "file")


def test_shared_lock_mode_makes_a_shared_folder(tmp_path: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=tmp_path / "shared", lock_mode=0o666)
    old = os.umask(0o022)  # a usual umask would cut the group and other write bits
    try:
        with pool.lease():
            assert (tmp_path / "shared").stat().st_mode & 0o777 == 0o777
            assert (tmp_path / "shared" / "gpu-0.lock").stat().st_mode & 0o777 == 0o666
            assert (tmp_path / "shared" / "queue.lock").stat().st_mode & 0o777 == 0o666
    finally:
        os.umask(old)


def _lease_and_note(pool: GpuPool, tag: int, order: list[int], count: int = 1) -> None:
    with pool.lease(count, timeout=30):
        order.append(tag)
        time.sleep(0.01)


def _lease_expecting_timeout(pool: GpuPool) -> None:
    with pytest.raises(LeaseTimeout, match=r"still ahead|came free"):
        pool.lease(timeout=0.3)


def _wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def test_a_forgotten_lease_is_freed_when_collected(lock_dir: Path) -> None:
    import gc

    pool = GpuPool(slots=1, lock_dir=lock_dir)
    pool.lease()  # dropped at once, never released
    gc.collect()
    with pool.lease(timeout=0) as lease:
        assert lease.indices == (0,)


def test_default_lock_dir_ignores_tmpdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tempfile

    from simbridge.gpus import default_lock_dir

    before = default_lock_dir()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # make tempfile re-read TMPDIR
    assert tempfile.gettempdir() == str(tmp_path)
    assert default_lock_dir() == before
    assert before.name == f"simbridge-gpus-{os.getuid()}"
