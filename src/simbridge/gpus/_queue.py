"""The first-come-first-served line of a GPU pool, shared by all processes using its lock folder.

Each waiter holds an flock on its own ticket file in ``queue/`` and watches only the nearest live
waiter ahead of it (a CLH queue over files); the kernel drops a dead waiter's lock, so a killed
waiter never blocks the line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from simbridge.gpus.errors import GpuError, LockDirError

# Tickets are zero-padded so that name order is ticket order.
_TICKET_WIDTH = 16
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_FIRST_POLL_S = 0.0002
_NEXT_IN_LINE_POLL_S = 0.001


@dataclass(frozen=True, slots=True)
class Place:
    """A waiter's place in the line: its ticket number, ticket file and the fd holding its flock."""

    ticket: int
    path: Path
    fd: int


class QueueTimeout(GpuError):
    """Raised inside the pool when the deadline passes with waiters still ahead; never leaves it."""

    def __init__(self, ahead: int) -> None:
        super().__init__(ahead)
        self.ahead = ahead


def dir_mode(file_mode: int) -> int:
    """Folder bits matching file bits: each class that may read a file may also enter the folder."""
    return 0o700 | file_mode | ((file_mode & 0o444) >> 2)


def ensure_dir(path: Path, file_mode: int) -> None:
    """Create ``path`` (mode matched to ``file_mode``), or check it is a real folder we can use."""
    try:
        path.mkdir(parents=True, mode=dir_mode(file_mode))
    except FileExistsError:
        pass
    else:
        # mkdir's mode is cut by the umask; a shared folder must really be shared.
        os.chmod(path, dir_mode(file_mode))
        return
    if path.is_symlink() or not path.is_dir():
        raise LockDirError(
            f"{path} exists but is not a folder (or is a symlink); remove it or set gpus.lock_dir"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise LockDirError(
            f"{path} is not writable by uid {os.getuid()}; fix its permissions or set gpus.lock_dir"
        )


def open_lock_file(path: Path, mode: int, *, exclusive: bool = False) -> int:
    """Open (creating) a lock file read-write; shared modes get exactly ``mode``, whatever the umask."""
    fd = os.open(path, _OPEN_FLAGS | (os.O_EXCL if exclusive else 0), mode)
    if mode & 0o077:
        # Other users must be able to write the holder record: the umask may have cut that bit.
        info = os.fstat(fd)
        if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != mode:
            os.fchmod(fd, mode)
    return fd


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take an flock without waiting; False when someone else holds a conflicting one."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:  # pragma: no cover - EWOULDBLOCK under another name on odd platforms
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


class TicketQueue:
    """FIFO line of waiters in ``root/queue``; the ticket counter lives in ``root/queue.lock``."""

    def __init__(self, *, root: Path, mode: int) -> None:
        self._dir = root / "queue"
        self._mutex_path = root / "queue.lock"
        self._mode = mode
        ensure_dir(self._dir, mode)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[int]:
        # A blocking flock is fine here: every critical section is a few syscalls long, and a
        # holder that dies inside one has its lock dropped by the kernel.
        fd = open_lock_file(self._mutex_path, self._mode)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def join(self) -> tuple[Place, int | None, int]:
        """Take the next ticket and stand in line (holding the ticket file's flock).

        Returns the place, an fd on the nearest live waiter ahead (None when first) and how many
        live waiters are ahead, all seen in one critical section.
        """
        with self._mutex() as mutex:
            entries = self._entries()
            ticket = self._next_ticket(mutex, entries)
            path = self._dir / f"{ticket:0{_TICKET_WIDTH}d}-{os.getpid()}"
            fd = open_lock_file(path, self._mode, exclusive=True)
            # Created and locked under the mutex, so a scan (also under the mutex) never sees a
            # live waiter's file unlocked and mistakes it for a dead one.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            place = Place(ticket=ticket, path=path, fd=fd)
            nearest, alive = self._scan(place, entries)
        return place, nearest, alive

    def _next_ticket(self, mutex: int, entries: list[tuple[int, Path]]) -> int:
        raw = os.pread(mutex, _TICKET_WIDTH, 0).strip()
        try:
            last = int(raw) if raw else 0
        except ValueError:
            last = 0
        # The listing guards against a counter file that was removed or torn by a crash.
        if entries:
            last = max(last, entries[-1][0])
        ticket = last + 1
        # Fixed width, so the counter is overwritten in place without a (slow) truncate.
        os.pwrite(mutex, f"{ticket:0{_TICKET_WIDTH}d}".encode(), 0)
        return ticket

    def _entries(self) -> list[tuple[int, Path]]:
        entries = []
        for path in self._dir.iterdir():
            head, _, _ = path.name.partition("-")
            if head.isdigit():
                entries.append((int(head), path))
        entries.sort()
        return entries

    def _scan(self, place: Place, entries: list[tuple[int, Path]]) -> tuple[int | None, int]:
        # Under the mutex. Walks back from our ticket to the nearest live waiter only (one open in
        # the usual case), removing ticket files of dead waiters on the way; the entries further
        # ahead are counted, not probed.
        earlier = [(ticket, path) for ticket, path in entries if ticket < place.ticket]
        while earlier:
            _, path = earlier.pop()
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue  # it left between the listing and now
            if try_lock(fd):
                # Nobody holds it: its waiter died (a leaving waiter unlinks first).
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.close(fd)
                continue
            return fd, len(earlier) + 1
        return None, 0

    def ahead(self, place: Place) -> tuple[int | None, int]:
        """(fd on the nearest live waiter ahead or None when first, waiters ahead, at most)."""
        with self._mutex():
            return self._scan(place, self._entries())

    def wait_turn(
        self, place: Place, watched: int | None, ahead: int, *, deadline: float, poll: float
    ) -> None:
        """Return when no live waiter is ahead; raise :class:`QueueTimeout` at ``deadline``.

        ``watched`` and ``ahead`` are what :meth:`join` saw; ``watched`` is closed here.
        """
        while watched is not None:
            try:
                # The next in line looks often; those further back have time to spare.
                cap = min(poll, _NEXT_IN_LINE_POLL_S) if ahead <= 1 else poll
                delay = min(_FIRST_POLL_S, cap)
                while not try_lock(watched):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueTimeout(ahead)
                    time.sleep(min(delay, remaining))
                    delay = min(delay * 2, cap)
            finally:
                os.close(watched)
            watched, ahead = self.ahead(place)

    def leave(self, place: Place) -> None:
        """Step out of line; the waiter behind notices when the flock goes with the fd."""
        with contextlib.suppress(FileNotFoundError):
            place.path.unlink()
        os.close(place.fd)

    def length(self) -> int:
        """How many live waiters stand in line now."""
        count = 0
        with self._mutex():
            for _, path in self._entries():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                except FileNotFoundError:
                    continue
                try:
                    if not try_lock(fd, shared=True):
                        count += 1
                finally:
                    os.close(fd)
        return count
