"""A granted lease (the GPUs and the lock fds that hold them) and what ``holders()`` reports.

The kernel drops an flock when the last process holding its file dies, so a killed holder (or a
killed orchestrator whose child inherited the lease's fds) frees its GPU without any cleanup step.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType

from simbridge.gpus._files import close_all, encode_record, valid_pid, write_record
from simbridge.gpus.discovery import GpuInfo
from simbridge.gpus.errors import InvalidLeaseRequest, LeaseReleased
from simbridge.logs import get_logger

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class GpuHolder:
    """Who holds one GPU now: ``pid`` to show (a live one if any), ``pids`` all recorded holders."""

    index: int
    held: bool
    pid: int | None = None
    pids: tuple[int, ...] = ()
    since: datetime | None = None
    host: str | None = None
    uuid: str | None = None


def child_env(gpus: Sequence[GpuInfo], source_kind: str) -> dict[str, str]:
    """The variables that make a child see exactly ``gpus``."""
    if source_kind == "nvml":
        # UUIDs name the same physical GPU (or MIG instance, which has no index at all) in any
        # view: a container, cgroup or parent that renumbers GPUs cannot shift them.
        env = {"CUDA_VISIBLE_DEVICES": ",".join(str(g.uuid) for g in gpus)}
        # Kept for tools that print indices: NVML numbers GPUs in PCI bus order.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        return env
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in gpus)}


def grant(gpus: Sequence[GpuInfo], fds: Sequence[int], source_kind: str) -> GpuLease:
    """Write the holder record into each lock file, then hand over the fds as a lease.

    Raises LockIOError (disk full, ...) before anything owns the fds; the caller closes them.
    """
    since = time.time()
    data = encode_record([os.getpid()], since, _HOST)
    for fd in fds:
        write_record(fd, data)
    return GpuLease(gpus=gpus, fds=fds, env=child_env(gpus, source_kind), since=since)


_HOST = socket.gethostname()


class GpuLease:
    """GPUs held exclusively until :meth:`release` (or the end of a ``with`` block).

    Pass :attr:`fds` to ``subprocess.Popen(pass_fds=lease.fds)`` and merge :attr:`env` into the
    child's environment: the child then shares the locks, and the GPUs stay held until the last of
    parent and child lets go or dies. Call :meth:`record_holder` with the child's pid so that
    ``simbridge gpus`` shows it. Built by :meth:`GpuPool.lease`, not by callers.
    """

    def __init__(
        self, *, gpus: Sequence[GpuInfo], fds: Sequence[int], env: dict[str, str], since: float
    ) -> None:
        self._gpus = tuple(gpus)
        self._fds = tuple(fds)
        self._pids = [os.getpid()]
        self._since = since
        self._granted_ns = time.monotonic_ns()
        self._released = False
        self._lock = threading.Lock()
        self._env = dict(env)
        # Last, and nothing after it can fail: a finalizer registered by a constructor that then
        # raised would close these fd numbers again later, when they belong to someone else.
        # A lease dropped without release() still frees its GPUs (like a file object), loudly.
        self._finalizer = weakref.finalize(self, _release_forgotten, self._fds, self.indices)

    @property
    def indices(self) -> tuple[int, ...]:
        """The leased GPU indices (pool indices: NVML order, MIG instances after their board's)."""
        return self.indices_of(self._gpus)

    @staticmethod
    def indices_of(gpus: Sequence[GpuInfo]) -> tuple[int, ...]:
        """The indices of ``gpus``, in order."""
        return tuple(g.index for g in gpus)

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        """Facts of the leased GPUs as read when the lease was granted (memory read then)."""
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
        if valid_pid(pid) is None:
            raise InvalidLeaseRequest(f"record_holder needs a process id (1..4194304), got {pid!r}")
        with self._lock:
            self._check_live()
            if pid not in self._pids:
                self._pids.append(pid)
            data = encode_record(self._pids, self._since, _HOST)
            for fd in self._fds:
                write_record(fd, data)

    def release(self) -> None:
        """Let go of the GPUs (idempotent). Children that inherited :attr:`fds` keep them held."""
        with self._lock:
            if self._released:
                return
            self._released = True
            self._finalizer.detach()
            # Close, never LOCK_UN: an unlock would also drop the lock of a child sharing the fd.
            close_all(self._fds)

    def _check_live(self) -> None:
        if self._released:
            raise LeaseReleased(f"the lease of GPU(s) {self.indices} was released; lease again to use them")

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


def _release_forgotten(fds: tuple[int, ...], indices: tuple[int, ...]) -> None:
    log.warning("gpus.lease_not_released", indices=indices, hint="use `with pool.lease()`")
    close_all(fds)
