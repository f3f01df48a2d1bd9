"""Cross-process GPU leases: one flock'ed lock file per physical GPU (by UUID), taken in arrival order.

Lock files are named by GPU (or MIG instance) UUID, so processes that number GPUs differently
(containers, cgroups, CUDA_VISIBLE_DEVICES) still exclude each other; configured slots by number.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import time
from pathlib import Path
from types import TracebackType

from simbridge.config import Settings, load_settings
from simbridge.errors import SimbridgeError
from simbridge.gpus._files import LockDir, alive, check_lock_mode, close_all, read_record, try_lock
from simbridge.gpus._queue import QueueTimeout, TicketQueue
from simbridge.gpus.discovery import GpuInfo, GpuSource, SlotSource, open_source, read_usable, select_gpus
from simbridge.gpus.errors import (
    InvalidLeaseRequest,
    LeaseTimeout,
    LockDirError,
    NoSuchGpu,
    NvmlUnavailable,
)
from simbridge.gpus.lease import GpuHolder, GpuLease, grant

__all__ = ["GpuHolder", "GpuLease", "GpuPool", "default_lock_dir", "lock_name"]
from simbridge.logs import get_logger

log = get_logger(__name__)

_FIRST_PAUSE_S = 0.0002
# A longer pause between looks is never useful and would make an infinite wait unresponsive.
_MAX_POLL_S = 60.0


def default_lock_dir() -> Path:
    """``/dev/shm/simbridge-gpus-<uid>`` (``/tmp/...`` without /dev/shm): one per user.

    Fixed on purpose, never ``$TMPDIR``: a process with another TMPDIR (a Slurm job, a test
    harness) would otherwise lock a different folder and share GPUs without knowing it.
    """
    root = Path("/dev/shm")
    if not root.is_dir():
        root = Path("/tmp")
    return root / f"simbridge-gpus-{os.getuid()}"


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
        if not _is_real(default_timeout) or math.isnan(default_timeout) or default_timeout < 0:
            raise InvalidLeaseRequest(f"default_timeout must be >= 0 seconds, got {default_timeout!r}")
        if not _is_real(poll_interval) or not 0 < poll_interval <= _MAX_POLL_S:
            raise InvalidLeaseRequest(
                f"poll_interval must be > 0 and <= {_MAX_POLL_S:g} seconds, got {poll_interval!r}"
            )
        if lock_dir is not None and not isinstance(lock_dir, str | Path):
            raise InvalidLeaseRequest(f"lock_dir must be a path, got {lock_dir!r}")
        self._mode = check_lock_mode(lock_mode)
        self._source: GpuSource = source if source is not None else SlotSource(slots=slots)  # type: ignore[arg-type]
        self._gpus = tuple(select_gpus(self._source))
        self._names = {gpu.index: lock_name(gpu) for gpu in self._gpus}
        # Absolute: the folder is checked by path again at every grant, and a later chdir must
        # neither move the pool to another folder nor make its own folder look replaced.
        self._lock_dir = _absolute(Path(lock_dir) if lock_dir is not None else default_lock_dir())
        self._default_timeout = float(default_timeout)
        self._poll = float(poll_interval)
        self._dir = LockDir(self._lock_dir, self._mode)
        if lock_dir is None and self._dir.uid != os.getuid():
            raise LockDirError(f"{self._lock_dir} belongs to another user; remove it or set gpus.lock_dir")
        self._queue = TicketQueue(root=self._dir, mode=self._mode)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> GpuPool:
        """A pool as configured in ``settings.gpus`` (NVML when present, else configured slots)."""
        gpus = (settings if settings is not None else load_settings()).gpus
        source = open_source(gpus)
        try:
            return cls(
                source=source,
                lock_dir=gpus.lock_dir,
                lock_mode=gpus.lock_mode,
                default_timeout=gpus.lease_timeout_s,
                poll_interval=gpus.poll_ms / 1000,
            )
        except BaseException:
            source.close()  # nobody else will: NVML stays initialised otherwise
            raise

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
        Whatever it raises, it holds nothing afterwards: no lock, no place in the line.
        """
        self._check_request(count, min_free_memory)
        if timeout is not None and not _is_real(timeout):
            raise InvalidLeaseRequest(f"timeout must be a number of seconds, got {timeout!r}")
        wait = self._default_timeout if timeout is None else float(timeout)
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
                lease = self._try_grant(count, min_free_memory)
                if lease is not None:
                    return lease
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
        if isinstance(min_free_memory, bool) or not isinstance(min_free_memory, int):
            raise InvalidLeaseRequest(
                f"min_free_memory must be a whole number of bytes, got {min_free_memory!r}"
            )
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

    def _try_grant(self, count: int, min_free_memory: int | None) -> GpuLease | None:
        # Only the head of the line gets here, so taking all-or-nothing cannot deadlock. Every
        # way out but the returned lease closes every fd taken here: a lock must never outlive
        # a failed attempt while this process lives.
        taken: list[tuple[GpuInfo, int]] = []
        try:
            for gpu in self._gpus:
                info = self._take(gpu, min_free_memory, taken)
                if info is not None and len(taken) == count:
                    return grant([i for i, _ in taken], [fd for _, fd in taken], self._source.kind)
        except BaseException:
            close_all([fd for _, fd in taken])
            raise
        close_all([fd for _, fd in taken])
        return None

    def _take(
        self, gpu: GpuInfo, min_free_memory: int | None, taken: list[tuple[GpuInfo, int]]
    ) -> GpuInfo | None:
        """Lock ``gpu`` and read it now; on success it is appended to ``taken`` (which then owns the fd)."""
        name = self._names[gpu.index]
        fd = self._dir.open(name)
        try:
            if not try_lock(fd):
                os.close(fd)
                return None
            # A folder removed and re-created under us holds new files: the lock just taken
            # would not exclude a holder of the old one. Refuse rather than share a GPU.
            self._dir.verify_file(name, fd)
            info = self._read_now(gpu)
        except BaseException:
            os.close(fd)
            raise
        if info is None or (
            min_free_memory is not None and (info.memory_free is None or info.memory_free < min_free_memory)
        ):
            os.close(fd)
            return None
        taken.append((info, fd))
        return info

    def _read_now(self, gpu: GpuInfo) -> GpuInfo | None:
        """The GPU as read at grant; None when unreadable and the source skips such GPUs."""
        try:
            return self._source.read(gpu.index)
        except NvmlUnavailable as exc:
            if not getattr(self._source, "skip_unreadable", False):
                raise
            log.warning("gpus.gpu_skipped", index=gpu.index, reason=str(exc))
            return None

    def _timeout(self, count: int, min_free_memory: int | None, waited: float, ahead: int) -> LeaseTimeout:
        floor = f" with {_mib(min_free_memory)} free" if min_free_memory is not None else ""
        why = f"up to {ahead} waiter(s) still ahead in line" if ahead else "not enough GPUs came free"
        try:
            holders = self.holders()
        except SimbridgeError as exc:
            # The timeout is the error to report; who holds the GPUs is only a hint.
            state = f"holders unknown ({exc})"
            held_count = -1
        else:
            held = [h for h in holders if h.held]
            pids = sorted({h.pid for h in held if h.pid is not None})
            state = f"{len(held)} of {len(holders)} held (pids {pids or 'unknown'})"
            held_count = len(held)
        message = (
            f"timed out after {waited:g} s waiting for {count} GPU(s){floor} in {self._lock_dir}: "
            f"{state}; {why}. Raise the timeout or free a GPU (`simbridge gpus` shows the holders)."
        )
        log.info("gpus.lease_timeout", count=count, waited_s=waited, held=held_count, ahead=ahead)
        return LeaseTimeout(message)

    def holders(self) -> list[GpuHolder]:
        """Per GPU: whether it is held, by which pid, since when (read from the lock files)."""
        result = []
        for gpu in self._gpus:
            fd = self._dir.open(self._names[gpu.index])
            try:
                # A shared probe never blocks a holder; at worst a waiter retries a moment later.
                free = try_lock(fd, shared=True)
                record = None if free else read_record(fd)
            finally:
                os.close(fd)
            pids = record.pids if record is not None else ()
            result.append(
                GpuHolder(
                    index=gpu.index,
                    held=not free,
                    pid=_shown_pid(pids) if pids else None,
                    pids=pids,
                    since=record.since if record is not None else None,
                    host=record.host if record is not None else None,
                    uuid=gpu.uuid,
                )
            )
        return result

    def waiting(self) -> int:
        """How many leases (from any process) are waiting in line now."""
        return self._queue.length()

    def read_gpus(self) -> list[GpuInfo]:
        """The pool's GPUs as read now (memory and utilisation are fresh under NVML).

        A GPU that became unreadable is left out (logged) where the source skips such GPUs.
        """
        return read_usable(self._source, [g.index for g in self._gpus])

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


_SAFE_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", re.ASCII)


def lock_name(gpu: GpuInfo) -> str:
    """The lock file of ``gpu``: by UUID (the same GPU in every process's view), slots by number."""
    if gpu.uuid is None:
        return f"gpu-{gpu.index}.lock"
    if _SAFE_UUID.fullmatch(gpu.uuid):
        return f"{gpu.uuid}.lock"
    return f"uuid-{hashlib.sha256(gpu.uuid.encode()).hexdigest()[:32]}.lock"


def _absolute(path: Path) -> Path:
    try:
        return path.absolute()
    except OSError as exc:  # a relative path, and the working folder was removed
        raise LockDirError(exc.errno, f"cannot resolve lock folder {path}: {exc.strerror}") from exc


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def _shown_pid(pids: tuple[int, ...]) -> int:
    # The orchestrator may have died while its child still holds the lease: show a live pid.
    for pid in pids:
        if alive(pid):
            return pid
    return pids[0]


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"
