"""Cross-process GPU leases: one flock'ed lock file per GPU, taken in arrival order.

The kernel drops an flock when the last process holding its file dies, so a killed holder (or a
killed orchestrator whose child inherited the lease's fds) frees its GPU without any cleanup step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from simbridge.config import Settings, load_settings
from simbridge.gpus._queue import QueueTimeout, TicketQueue, ensure_dir, open_lock_file, try_lock
from simbridge.gpus.discovery import (
    GpuInfo,
    GpuSource,
    SlotSource,
    open_source,
    read_all,
    visible_indices,
)
from simbridge.gpus.errors import (
    InvalidLeaseRequest,
    LeaseReleased,
    LeaseTimeout,
    LockDirError,
    NoSuchGpu,
)
from simbridge.logs import get_logger

log = get_logger(__name__)

_FIRST_PAUSE_S = 0.0002


def default_lock_dir() -> Path:
    """``/dev/shm/simbridge-gpus-<uid>`` (``/tmp/...`` without /dev/shm): one per user.

    Fixed on purpose, never ``$TMPDIR``: a process with another TMPDIR (a Slurm job, a test
    harness) would otherwise lock a different folder and share GPUs without knowing it.
    """
    root = Path("/dev/shm")
    if not root.is_dir():
        root = Path("/tmp")
    return root / f"simbridge-gpus-{os.getuid()}"


@dataclass(frozen=True, slots=True)
class GpuHolder:
    """Who holds one GPU now: ``pid`` to show (a live one if any), ``pids`` all recorded holders."""

    index: int
    held: bool
    pid: int | None = None
    pids: tuple[int, ...] = ()
    since: datetime | None = None
    host: str | None = None


class GpuLease:
    """GPUs held exclusively until :meth:`release` (or the end of a ``with`` block).

    Pass :attr:`fds` to ``subprocess.Popen(pass_fds=lease.fds)`` and merge :attr:`env` into the
    child's environment: the child then shares the locks, and the GPUs stay held until the last of
    parent and child lets go or dies. Call :meth:`record_holder` with the child's pid so that
    ``simbridge gpus`` shows it.
    """

    def __init__(self, *, gpus: Sequence[GpuInfo], fds: Sequence[int], source_kind: str) -> None:
        self._gpus = tuple(gpus)
        self._fds = tuple(fds)
        self._pids = [os.getpid()]
        self._since = time.time()
        self._granted_ns = time.monotonic_ns()
        self._released = False
        # A lease dropped without release() still frees its GPUs (like a file object), loudly.
        self._finalizer = weakref.finalize(self, _release_forgotten, self._fds, self.indices_of(gpus))
        self._lock = threading.Lock()
        self._env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in self._gpus)}
        if source_kind == "nvml":
            # NVML numbers GPUs in PCI bus order; CUDA's default order is "fastest first", so
            # without this a child could open a different GPU than the one leased.
            self._env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        self._write_holders()

    @property
    def indices(self) -> tuple[int, ...]:
        """The leased GPU indices, ascending."""
        return self.indices_of(self._gpus)

    @staticmethod
    def indices_of(gpus: Sequence[GpuInfo]) -> tuple[int, ...]:
        """The indices of ``gpus``, in order."""
        return tuple(g.index for g in gpus)

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """Facts of the leased GPUs as read when the lease was granted."""
        return self._gpus

    @property
    def fds(self) -> tuple[int, ...]:
        """The lock file descriptors, for ``Popen(pass_fds=...)``."""
        self._check_live()
        return self._fds

    @property
    def env(self) -> dict[str, str]:
        """Variables to merge into a child's environment (``CUDA_VISIBLE_DEVICES``, ...)."""
        return dict(self._env)

    @property
    def since(self) -> datetime:
        """When the lease was granted (wall clock, as ``simbridge gpus`` shows it)."""
        return datetime.fromtimestamp(self._since, tz=UTC)

    @property
    def granted_ns(self) -> int:
        """``time.monotonic_ns()`` when the lease was granted; orders leases across processes."""
        return self._granted_ns

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._released

    def record_holder(self, pid: int) -> None:
        """Note that process ``pid`` (a child given :attr:`fds`) shares this lease, for display."""
        with self._lock:
            self._check_live()
            if pid not in self._pids:
                self._pids.append(pid)
            self._write_holders()

    def release(self) -> None:
        """Let go of the GPUs (idempotent). Children that inherited :attr:`fds` keep them held."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._finalizer.detach()
            # Close, never LOCK_UN: an unlock would also drop the lock of a child sharing the fd.
            for fd in self._fds:
                os.close(fd)

    def _check_live(self) -> None:
        if self._released:
            raise LeaseReleased(f"the lease of GPU(s) {self.indices} was released; lease again to use them")

    def _write_holders(self) -> None:
        record = {
            "pid": self._pids[0],
            "pids": self._pids,
            "since": self._since,
            "host": socket.gethostname(),
        }
        data = json.dumps(record).encode()
        for fd in self._fds:
            # Padded with spaces (which JSON ignores) over whatever was there before: a pwrite
            # in place, much cheaper than truncating the file on every lease.
            size = max(len(data), os.fstat(fd).st_size)
            os.pwrite(fd, data.ljust(size), 0)

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"GpuLease(indices={self.indices}, {state})"


class GpuPool:
    """The GPUs of this machine (or configured slots), leased exclusively across processes.

    Every process that shares the GPUs must use the same ``lock_dir``. Waiters are served in
    arrival order, across processes; a request for several GPUs holds back those behind it
    until it is served, so large requests are never starved.
    """

    def __init__(
        self,
        *,
        slots: int | None = None,
        source: GpuSource | None = None,
        lock_dir: Path | str | None = None,
        lock_mode: int = 0o600,
        default_timeout: float = 30.0,
        poll_interval: float = 0.005,
    ) -> None:
        if (slots is None) == (source is None):
            raise InvalidLeaseRequest("give GpuPool exactly one of slots=N or source=...")
        if default_timeout < 0 or poll_interval <= 0:
            raise InvalidLeaseRequest(
                f"default_timeout must be >= 0 and poll_interval > 0 (got {default_timeout}, {poll_interval})"
            )
        self._source: GpuSource = source if source is not None else SlotSource(slots=slots or 0)
        self._gpus = tuple(read_all(self._source, visible_indices(self._source)))
        self._lock_dir = Path(lock_dir) if lock_dir is not None else default_lock_dir()
        self._mode = lock_mode
        self._default_timeout = default_timeout
        self._poll = poll_interval
        ensure_dir(self._lock_dir, lock_mode)
        if lock_dir is None and self._lock_dir.stat().st_uid != os.getuid():
            raise LockDirError(f"{self._lock_dir} belongs to another user; remove it or set gpus.lock_dir")
        self._queue = TicketQueue(root=self._lock_dir, mode=lock_mode)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> GpuPool:
        """A pool as configured in ``settings.gpus`` (NVML when present, else configured slots)."""
        gpus = (settings if settings is not None else load_settings()).gpus
        return cls(
            source=open_source(gpus),
            lock_dir=gpus.lock_dir,
            lock_mode=gpus.lock_mode,
            default_timeout=gpus.lease_timeout_s,
            poll_interval=gpus.poll_ms / 1000,
        )

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """The pool's GPUs as read when it was built."""
        return self._gpus

    @property
    def lock_dir(self) -> Path:
        """The folder of the lock files; processes naming the same folder share the GPUs."""
        return self._lock_dir

    @property
    def source(self) -> GpuSource:
        """Where GPU facts come from (``source.kind`` is 'nvml', 'slots' or 'fake')."""
        return self._source

    def lease(
        self,
        count: int = 1,
        *,
        min_free_memory: int | None = None,
        timeout: float | None = None,
    ) -> GpuLease:
        """Wait in line for ``count`` GPUs, each with at least ``min_free_memory`` bytes free.

        ``timeout`` is in seconds (None: the pool's default, 0: do not wait, ``math.inf``: no
        limit). The result is a :class:`GpuLease`; use it in a ``with`` block or release it.
        """
        self._check_request(count, min_free_memory)
        wait = self._default_timeout if timeout is None else timeout
        if math.isnan(wait) or wait < 0:
            raise InvalidLeaseRequest(f"timeout must be >= 0 seconds, got {timeout}")
        deadline = time.monotonic() + min(wait, 1e9)
        place, watched, ahead = self._queue.join()
        try:
            try:
                self._queue.wait_turn(place, watched, ahead, deadline=deadline, poll=self._poll)
            except QueueTimeout as exc:
                raise self._timeout(count, min_free_memory, wait, exc.ahead) from None
            pause = _FIRST_PAUSE_S
            while True:
                taken = self._try_take(count, min_free_memory)
                if taken is not None:
                    try:
                        return GpuLease(
                            gpus=[gpu for gpu, _ in taken],
                            fds=[fd for _, fd in taken],
                            source_kind=self._source.kind,
                        )
                    except BaseException:
                        for _, fd in taken:
                            os.close(fd)
                        raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timeout(count, min_free_memory, wait, 0)
                time.sleep(min(pause, remaining))
                pause = min(pause * 2, self._poll)
        finally:
            self._queue.leave(place)

    acquire = lease  # the same call, for code that reads better without `with`

    def _check_request(self, count: int, min_free_memory: int | None) -> None:
        if isinstance(count, bool) or not isinstance(count, int):
            raise InvalidLeaseRequest(f"count must be a whole number of GPUs, got {count!r}")
        if not 1 <= count <= len(self._gpus):
            raise InvalidLeaseRequest(
                f"cannot lease {count} GPU(s) from a pool of {len(self._gpus)}; ask for 1..{len(self._gpus)}"
            )
        if min_free_memory is None:
            return
        if min_free_memory < 0:
            raise InvalidLeaseRequest(f"min_free_memory must be >= 0 bytes, got {min_free_memory}")
        totals = [g.memory_total for g in self._gpus]
        if any(total is None for total in totals):
            raise InvalidLeaseRequest(
                "min_free_memory needs memory readings, but this pool's GPUs are "
                f"{self._source.note}; leave min_free_memory unset"
            )
        if sum(1 for total in totals if total is not None and total >= min_free_memory) < count:
            raise NoSuchGpu(
                f"fewer than {count} GPU(s) have {_mib(min_free_memory)} of memory in total; "
                "lower min_free_memory or the count"
            )

    def _try_take(self, count: int, min_free_memory: int | None) -> list[tuple[GpuInfo, int]] | None:
        # Only the head of the line gets here, so taking all-or-nothing cannot deadlock.
        taken: list[tuple[GpuInfo, int]] = []
        for gpu in self._gpus:
            fd = self._open_lock(gpu.index)
            if not try_lock(fd):
                os.close(fd)
                continue
            info = gpu
            if min_free_memory is not None:
                info = self._source.read(gpu.index)
                if info.memory_free is None or info.memory_free < min_free_memory:
                    os.close(fd)
                    continue
            taken.append((info, fd))
            if len(taken) == count:
                return taken
        for _, fd in taken:
            os.close(fd)
        return None

    def _timeout(self, count: int, min_free_memory: int | None, waited: float, ahead: int) -> LeaseTimeout:
        holders = self.holders()
        held = [h for h in holders if h.held]
        pids = sorted({h.pid for h in held if h.pid is not None})
        floor = f" with {_mib(min_free_memory)} free" if min_free_memory is not None else ""
        why = f"up to {ahead} waiter(s) still ahead in line" if ahead else "not enough GPUs came free"
        message = (
            f"timed out after {waited:g} s waiting for {count} GPU(s){floor} in {self._lock_dir}: "
            f"{len(held)} of {len(holders)} held (pids {pids or 'unknown'}); {why}. "
            "Raise the timeout or free a GPU (`simbridge gpus` shows the holders)."
        )
        log.info("gpus.lease_timeout", count=count, waited_s=waited, held=len(held), ahead=ahead)
        return LeaseTimeout(message)

    def _open_lock(self, index: int) -> int:
        return open_lock_file(self._lock_dir / f"gpu-{index}.lock", self._mode)

    def holders(self) -> list[GpuHolder]:
        """Per GPU: whether it is held, by which pid, since when (read from the lock files)."""
        result = []
        for gpu in self._gpus:
            fd = self._open_lock(gpu.index)
            try:
                # A shared probe never blocks a holder; at worst a waiter retries a moment later.
                free = try_lock(fd, shared=True)
                pids, since, host = ((), None, None) if free else _read_record(fd)
            finally:
                os.close(fd)
            result.append(
                GpuHolder(
                    index=gpu.index,
                    held=not free,
                    pid=_shown_pid(pids) if pids else None,
                    pids=pids,
                    since=since,
                    host=host,
                )
            )
        return result

    def waiting(self) -> int:
        """How many leases (from any process) are waiting in line now."""
        return self._queue.length()

    def read_gpus(self) -> list[GpuInfo]:
        """The pool's GPUs as read now (memory and utilisation are fresh under NVML)."""
        return read_all(self._source, [g.index for g in self._gpus])

    def close(self) -> None:
        """Let go of the discovery library (NVML); leases already granted stay valid."""
        self._source.close()

    def __enter__(self) -> GpuPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = self._source.kind
        return f"GpuPool({len(self._gpus)} GPU(s) from {kind}, lock_dir={self._lock_dir})"


def _release_forgotten(fds: tuple[int, ...], indices: tuple[int, ...]) -> None:
    log.warning("gpus.lease_not_released", indices=indices, hint="use `with pool.lease()`")
    for fd in fds:
        with contextlib.suppress(OSError):  # already closed at interpreter shutdown
            os.close(fd)


def _read_record(fd: int) -> tuple[tuple[int, ...], datetime | None, str | None]:
    """(pids, since, host) written by the holder; empty when unreadable."""
    raw = os.pread(fd, 65536, 0)
    try:
        record = json.loads(raw) if raw else {}
        pids = tuple(int(p) for p in record.get("pids", ()))
        since = record.get("since")
        host = record.get("host")
        return (
            pids,
            datetime.fromtimestamp(float(since), tz=UTC) if since is not None else None,
            str(host) if host is not None else None,
        )
    except (ValueError, TypeError, AttributeError):
        # Torn mid-write by a holder writing it right now: show "held, pid unknown".
        return (), None, None


def _shown_pid(pids: tuple[int, ...]) -> int:
    # The orchestrator may have died while its child still holds the lease: show a live pid.
    for pid in pids:
        if _alive(pid):
            return pid
    return pids[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"
