"""A lease that fails part-way holds nothing: no lock, no ticket in the line, no fd closed twice.

The failures are real: a process out of file descriptors, a full tmpfs, an NVML read error
(through the FAKE NVML, the one thing that cannot run here).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.unit.gpus.nvml_fake import GIB, board, fake_nvml

import simbridge
from simbridge.errors import SimbridgeError
from simbridge.gpus import GpuPool, LockIOError, NvmlSource, NvmlUnavailable

SRC = str(Path(simbridge.__file__).resolve().parents[1])

# For k = 0, 1, 2, ...: leave exactly k file descriptors free, lease 2 of 4 slots (with a dead
# waiter's ticket in the line, so the scan needs an fd too), then check that nothing is held.
OUT_OF_FDS = textwrap.dedent(
    """
    import errno, json, os, resource, sys
    from pathlib import Path
    from simbridge.errors import SimbridgeError
    from simbridge.gpus import GpuPool

    lock_dir = Path(sys.argv[1])
    pool = GpuPool(slots=4, lock_dir=lock_dir)
    checker = GpuPool(slots=4, lock_dir=lock_dir)
    dead_ticket = lock_dir / "queue" / ("1".zfill(16) + "-999999")

    def open_fds():
        return sorted(int(n) for n in os.listdir("/proc/self/fd"))

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 48, hard))
    results = []
    for free in range(12):
        dead_ticket.touch()
        before = open_fds()
        fillers = []
        while True:
            try:
                fillers.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        for _ in range(free):
            os.close(fillers.pop())
        try:
            lease = pool.lease(2, timeout=0)
        except Exception as exc:
            outcome = [type(exc).__name__, isinstance(exc, SimbridgeError),
                       isinstance(exc, OSError) and exc.errno == errno.EMFILE]
            lease = None
        else:
            outcome = ["granted"]
        for fd in fillers:
            os.close(fd)
        if lease is not None:
            lease.release()
        leaked = sorted(set(open_fds()) - set(before))
        try:
            everything = checker.lease(4, timeout=0)
        except Exception as exc:
            all_free = type(exc).__name__
        else:
            everything.release()
            all_free = True
        results.append({"free": free, "outcome": outcome, "leaked_fds": leaked,
                        "all_free": all_free, "waiting": checker.waiting()})
        if outcome == ["granted"]:
            break
    print(json.dumps(results))
    """
)


def test_a_lease_out_of_file_descriptors_holds_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", OUT_OF_FDS, str(tmp_path / "locks")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results[-1]["outcome"] == ["granted"], "the lease never got enough fds to succeed"
    failures = [r for r in results if r["outcome"] != ["granted"]]
    assert len(failures) >= 3  # join, scan and the lock files each failed at some k
    for result in results:
        assert result["all_free"] is True, f"a GPU stayed locked after {result}"
        assert result["waiting"] == 0, f"a ticket stayed in line after {result}"
        assert result["leaked_fds"] == [], f"fds leaked after {result}"
    for result in failures:
        name, typed, emfile = result["outcome"]
        assert typed and emfile, f"{name} is not a SimbridgeError OSError with errno EMFILE"


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    fake = fake_nvml([board("GPU-aaaa"), board("GPU-bbbb")])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def test_an_nvml_read_error_during_a_memory_floor_lease_holds_nothing(
    nvml: types.ModuleType, lock_dir: Path
) -> None:
    pool = GpuPool(source=NvmlSource(), lock_dir=lock_dir)
    nvml.boards[1]["fail_memory"] = True  # type: ignore[attr-defined]
    # GPU 0 is locked and read first; the read of GPU 1 then fails.
    with pytest.raises(NvmlUnavailable, match="could not read GPU 1"):
        pool.lease(2, min_free_memory=GIB, timeout=0)
    nvml.boards[1]["fail_memory"] = False  # type: ignore[attr-defined]
    other = GpuPool(source=NvmlSource(), lock_dir=lock_dir)
    with other.lease(2, timeout=0) as both:
        assert both.indices == (0, 1)
    assert other.waiting() == 0


def test_auto_discovery_skips_a_gpu_unreadable_at_grant(nvml: types.ModuleType, lock_dir: Path) -> None:
    pool = GpuPool(source=NvmlSource(skip_unreadable=True), lock_dir=lock_dir)
    nvml.boards[0]["fail_memory"] = True  # type: ignore[attr-defined]
    with pool.lease(timeout=0) as lease:
        assert [g.uuid for g in lease.gpus] == ["GPU-bbbb"]
    nvml.boards[0]["fail_memory"] = False  # type: ignore[attr-defined]
    with pool.lease(2, timeout=0) as both:  # the skipped GPU was not left locked
        assert both.indices == (0, 1)


@contextlib.contextmanager
def _full_tmpfs(where: Path) -> Iterator[Path]:
    """A real 8 KiB tmpfs (root only) whose free space the test then fills."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(filler: Path) -> None:
    with open(filler, "wb", buffering=0) as out:
        while True:
            try:
                out.write(b"x" * 512)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def test_a_full_disk_while_writing_the_holder_record_holds_nothing(tmp_path: Path) -> None:
    with _full_tmpfs(tmp_path / "mnt") as mnt:
        lock_dir = mnt / "locks"
        pool = GpuPool(slots=1, lock_dir=lock_dir)
        assert pool.waiting() == 0  # the line's counter exists (and has its page) before the fill
        _fill(mnt / "filler")
        with pytest.raises(LockIOError) as caught:
            pool.lease(timeout=0)
        assert caught.value.errno == errno.ENOSPC
        assert isinstance(caught.value, SimbridgeError)
        # The failed lease's fd numbers are free again: one of ours takes the number, and must
        # survive the failed lease being collected (it once closed its fds a second time).
        probe = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            del caught
            gc.collect()
            os.fstat(probe)  # EBADF here if the failed lease closed our fd
        finally:
            os.close(probe)
        (mnt / "filler").unlink()
        with GpuPool(slots=1, lock_dir=lock_dir).lease(timeout=0) as lease:
            assert lease.indices == (0,)
        assert pool.waiting() == 0


# Without root (no tmpfs to fill), a file-size limit makes the holder record's write fail the same
# way (EFBIG): the record is ~80 bytes, the line's 16-byte counter fits under the limit.
RECORD_TOO_BIG = textwrap.dedent(
    """
    import errno, gc, json, os, resource, signal, sys
    from pathlib import Path
    from simbridge.errors import SimbridgeError
    from simbridge.gpus import GpuPool, LockIOError

    lock_dir = Path(sys.argv[1])
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40, hard))
    try:
        pool.lease(timeout=0)
    except LockIOError as exc:
        failed = [exc.errno == errno.EFBIG, isinstance(exc, SimbridgeError)]
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    probe = os.open(lock_dir / "probe", os.O_RDWR | os.O_CREAT, 0o600)
    gc.collect()
    os.fstat(probe)
    with GpuPool(slots=1, lock_dir=lock_dir).lease(timeout=0) as lease:
        granted = list(lease.indices)
    print(json.dumps({"failed": failed, "granted": granted, "waiting": pool.waiting()}))
    """
)


def test_a_holder_record_over_the_file_size_limit_holds_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [sys.executable, "-c", RECORD_TOO_BIG, str(tmp_path / "locks")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "failed": [True, True],
        "granted": [0],
        "waiting": 0,
    }
