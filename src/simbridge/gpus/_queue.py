"""The first-come-first-served line of a GPU pool, shared by all processes using its lock folder.

Each waiter holds an flock on its own ticket file in ``queue/`` and watches only the nearest live
waiter ahead of it (a CLH queue over files); the kernel drops a dead waiter's lock, so a killed
waiter never blocks the line.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from simbridge.gpus._files import LockDir, close_all, io_error, try_lock
from simbridge.gpus.errors import GpuError, LockDirError

# Tickets are zero-padded so that name order is ticket order.
_TICKET_WIDTH = 16
_TICKET_LIMIT = 10**_TICKET_WIDTH
# Only names we write count as tickets; anything else in the folder is ignored, never parsed.
_TICKET_NAME = re.compile(rf"([0-9]{{{_TICKET_WIDTH}}})-[0-9]{{1,10}}", re.ASCII)
_FIRST_POLL_S = 0.0002
_NEXT_IN_LINE_POLL_S = 0.001


@dataclass(frozen=True, slots=True)
class Place:
    """A waiter's place in the line: its ticket number, ticket file name and the fd holding its flock."""

    ticket: int
    name: str
    fd: int


class QueueTimeout(GpuError):
    """Raised inside the pool when the deadline passes with waiters still ahead; never leaves it."""

    def __init__(self, ahead: int) -> None:
        super().__init__(ahead)
        self.ahead = ahead


class TicketQueue:
    """FIFO line of waiters in ``root/queue``; the ticket counter lives in ``root/queue.lock``."""

    def __init__(self, *, root: LockDir, mode: int) -> None:
        self._root = root
        self._dir = LockDir(root.path / "queue", mode)

    @contextlib.contextmanager
    def _mutex(self) -> Iterator[int]:
        # A blocking flock is fine here: every critical section is a few syscalls long, and a
        # holder that dies inside one has its lock dropped by the kernel.
        fd = self._root.open("queue.lock")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise io_error(exc, "cannot lock the line's counter") from exc
            # A line in a folder re-created under us would be a second, separate line.
            self._root.verify_file("queue.lock", fd)
            self._dir.verify()
            yield fd
        finally:
            os.close(fd)

    def join(self) -> tuple[Place, int | None, int]:
        """Take the next ticket and stand in line (holding the ticket file's flock).

        Returns the place, an fd on the nearest live waiter ahead (None when first) and how many
        live waiters are ahead, all seen in one critical section. When it raises, it holds
        nothing: no ticket stays in line behind a process that is still alive.
        """
        with self._mutex() as mutex:
            entries = self._entries()
            ticket = self._next_ticket(mutex, entries)
            name = f"{ticket:0{_TICKET_WIDTH}d}-{os.getpid()}"
            fd = self._dir.open(name, exclusive=True)
            place = Place(ticket=ticket, name=name, fd=fd)
            try:
                # Created and locked under the mutex, so a scan (also under the mutex) never sees a
                # live waiter's file unlocked and mistakes it for a dead one.
                if not try_lock(fd):  # pragma: no cover - a file we just created exclusively
                    raise io_error(OSError(11, "ticket file locked by another"), f"cannot lock {name}")
                nearest, alive = self._scan(place, entries)
            except BaseException:
                self.leave(place)
                raise
        return place, nearest, alive

    def _next_ticket(self, mutex: int, entries: list[tuple[int, str]]) -> int:
        try:
            raw = os.pread(mutex, _TICKET_WIDTH, 0).strip()
        except OSError as exc:
            raise io_error(exc, "cannot read the line's counter") from exc
        # The counter is anyone's file: only plain digits count, anything else starts from the
        # listing, which also guards against a counter that was removed or torn by a crash.
        last = int(raw) if raw.isdigit() and raw.isascii() else 0
        if entries:
            last = max(last, entries[-1][0])
        elif last >= _TICKET_LIMIT - 1:
            last = 0  # an empty line may start again; only order among live tickets matters
        ticket = last + 1
        if ticket >= _TICKET_LIMIT:
            raise LockDirError(
                f"the ticket counter in {self._root.path} ran out (a garbage ticket?); "
                f"remove {self._dir.path} when no lease is waiting"
            )
        try:
            # Fixed width, so the counter is overwritten in place without a (slow) truncate.
            os.pwrite(mutex, f"{ticket:0{_TICKET_WIDTH}d}".encode(), 0)
        except OSError as exc:
            raise io_error(exc, "cannot write the line's counter") from exc
        return ticket

    def _entries(self) -> list[tuple[int, str]]:
        entries = []
        for name in self._dir.names():
            match = _TICKET_NAME.fullmatch(name)
            if match is not None:
                entries.append((int(match.group(1)), name))
        entries.sort()
        return entries

    def _scan(self, place: Place, entries: list[tuple[int, str]]) -> tuple[int | None, int]:
        # Under the mutex. Walks back from our ticket to the nearest live waiter only (one open in
        # the usual case), removing ticket files of dead waiters on the way; the entries further
        # ahead are counted, not probed.
        earlier = [(ticket, name) for ticket, name in entries if ticket < place.ticket]
        while earlier:
            _, name = earlier.pop()
            fd = self._dir.open_existing(name)
            if fd is None:
                continue  # it left between the listing and now
            try:
                free = try_lock(fd)
            except BaseException:
                os.close(fd)
                raise
            if free:
                # Nobody holds it: its waiter died (a leaving waiter unlinks first).
                self._dir.unlink(name)
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
        # Unlink first, then close: a file left unlocked but listed would read as a dead waiter,
        # which is harmless; the close always runs, so our flock never outlives a failed lease.
        try:
            self._dir.unlink(place.name)
        finally:
            close_all([place.fd])

    def length(self) -> int:
        """How many live waiters stand in line now."""
        count = 0
        with self._mutex():
            for _, name in self._entries():
                fd = self._dir.open_existing(name)
                if fd is None:
                    continue
                try:
                    if not try_lock(fd, shared=True):
                        count += 1
                finally:
                    os.close(fd)
        return count
