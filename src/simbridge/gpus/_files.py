"""The files under a GPU lock folder: the folder itself (held open), lock files and holder records.

Every OS failure here becomes a typed :mod:`simbridge.gpus.errors` error, and everything read back
from a file (another process, or a hostile user, may have written it) is checked before use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import stat
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from simbridge.gpus.errors import InvalidLeaseRequest, LockDirError, LockDirRemoved, LockIOError

_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
# PID_MAX_LIMIT of 64-bit Linux: no real pid is larger, and os.kill must never see a value it
# cannot take (OverflowError) or one <= 0 (a process group, or every process).
PID_MAX = 4 * 1024 * 1024
# A record is a few hundred bytes; more is garbage, and never read or padded to.
RECORD_MAX = 65536
# More recorded holders than this is garbage too (a lease is shared by a handful of children).
PIDS_MAX = 1024
HOST_MAX = 255


def dir_mode(file_mode: int) -> int:
    """Folder bits matching file bits: each class that may read a file may also enter the folder."""
    return 0o700 | file_mode | ((file_mode & 0o444) >> 2)


def check_lock_mode(mode: object) -> int:
    """``mode`` if it is usable permission bits for lock files, else InvalidLeaseRequest."""
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0o600 <= mode <= 0o777:
        raise InvalidLeaseRequest(
            f"lock_mode must be permission bits between 0o600 and 0o777 (the owner must read and "
            f"write its lock files), got {mode!r}"
        )
    if mode & 0o600 != 0o600:
        raise InvalidLeaseRequest(f"lock_mode {mode:#o} must include 0o600 (owner read and write)")
    return mode


def io_error(exc: OSError, what: str) -> LockIOError:
    """``exc`` as a typed error saying what was being done (errno kept, for callers that test it)."""
    hint = ""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        hint = "; raise the open-file limit (ulimit -n) or hold fewer leases"
    elif exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "; free space where the lock folder lives or set gpus.lock_dir"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; fix the lock folder's permissions or set gpus.lock_dir"
    return LockIOError(exc.errno or errno.EIO, f"{what}: {exc.strerror or exc}{hint}")


def ensure_dir(path: Path, file_mode: int) -> None:
    """Create ``path`` (mode matched to ``file_mode``), or check it is a real folder we can use."""
    if "\0" in str(path):
        raise InvalidLeaseRequest(f"lock folder {str(path)!r} contains a NUL byte")
    try:
        path.mkdir(parents=True, mode=dir_mode(file_mode))
    except FileExistsError:
        pass
    except OSError as exc:
        raise LockDirError(
            exc.errno, f"cannot create lock folder {path}: {exc.strerror}; fix it or set gpus.lock_dir"
        ) from exc
    else:
        try:
            # mkdir's mode is cut by the umask; a shared folder must really be shared.
            os.chmod(path, dir_mode(file_mode))
        except OSError as exc:
            raise LockDirError(
                exc.errno, f"cannot set the mode of lock folder {path}: {exc.strerror}"
            ) from exc
        return
    if path.is_symlink() or not path.is_dir():
        raise LockDirError(
            f"{path} exists but is not a folder (or is a symlink); remove it or set gpus.lock_dir"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise LockDirError(
            f"{path} is not writable by uid {os.getuid()}; fix its permissions or set gpus.lock_dir"
        )


class LockDir:
    """A folder of lock files, held open: files are opened relative to the folder we checked.

    A folder removed (and perhaps re-created by another process) under us would let two processes
    lock two different files for one GPU; :meth:`verify` notices, and callers refuse to grant.
    """

    def __init__(self, path: Path, mode: int) -> None:
        ensure_dir(path, mode)
        self.path = path
        self._mode = mode
        try:
            fd = os.open(path, _DIR_FLAGS)
        except OSError as exc:
            raise LockDirError(exc.errno, f"cannot open lock folder {path}: {exc.strerror}") from exc
        self.fd = fd
        try:
            info = os.fstat(fd)
        except OSError as exc:  # pragma: no cover - fstat of an open fd does not fail
            os.close(fd)
            raise io_error(exc, f"cannot stat lock folder {path}") from exc
        self._identity = (info.st_dev, info.st_ino)
        self.uid = info.st_uid
        # Closed when the pool goes away, never earlier: a closed (and reused) fd number would
        # make every open relative to it land in some other folder.
        weakref.finalize(self, _close_quietly, fd)

    def verify(self) -> None:
        """Raise LockDirRemoved when the folder at ``path`` is no longer the one we hold open."""
        try:
            held = os.fstat(self.fd)
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            raise self._removed() from None
        except OSError as exc:
            raise io_error(exc, f"cannot check lock folder {self.path}") from exc
        if held.st_nlink == 0 or (now.st_dev, now.st_ino) != self._identity:
            raise self._removed()

    def _removed(self) -> LockDirRemoved:
        return LockDirRemoved(
            f"lock folder {self.path} was removed or replaced while in use; leases held through the "
            "old folder are invisible to the new one. Stop every process using it, then start again."
        )

    def open(self, name: str, *, exclusive: bool = False) -> int:
        """Open (creating) ``name`` read-write; shared modes get exactly ``mode``, whatever the umask."""
        try:
            fd = os.open(name, _OPEN_FLAGS | (os.O_EXCL if exclusive else 0), self._mode, dir_fd=self.fd)
        except FileNotFoundError:
            # O_CREAT in a folder that is gone: it was removed under us.
            raise self._removed() from None
        except OSError as exc:
            raise io_error(exc, f"cannot open {self.path / name}") from exc
        try:
            if self._mode & 0o077:
                # Other users must be able to write the holder record: the umask may have cut that bit.
                info = os.fstat(fd)
                if info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) != self._mode:
                    os.fchmod(fd, self._mode)
        except OSError as exc:
            os.close(fd)
            raise io_error(exc, f"cannot set the mode of {self.path / name}") from exc
        return fd

    def open_existing(self, name: str) -> int | None:
        """Open ``name`` read-only, or None when it is not there (any more)."""
        try:
            return os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise io_error(exc, f"cannot open {self.path / name}") from exc

    def verify_file(self, name: str, fd: int) -> None:
        """Raise LockDirRemoved unless ``fd`` is the file now at ``name`` in the folder now at ``path``."""
        try:
            held = os.fstat(fd)
            now = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            raise self._removed() from None
        except OSError as exc:
            raise io_error(exc, f"cannot check {self.path / name}") from exc
        if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
            raise self._removed()
        self.verify()

    def names(self) -> list[str]:
        """The names in the folder (empty when it was removed)."""
        try:
            return os.listdir(self.fd)
        except OSError as exc:
            raise io_error(exc, f"cannot list {self.path}") from exc

    def unlink(self, name: str) -> bool:
        """Remove ``name``; False when it was already gone or may not be removed (left for later)."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except OSError:
            # Gone already, or another user's file in a sticky shared folder: a leftover ticket is
            # only ever probed (and skipped) by later scans, never waited on.
            return False
        return True


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # already closed at interpreter shutdown
        os.close(fd)


def try_lock(fd: int, *, shared: bool = False) -> bool:
    """Take an flock without waiting; False when someone else holds a conflicting one."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):  # EWOULDBLOCK under another name
            return False
        raise io_error(exc, "cannot take a lock") from exc
    return True


def close_all(fds: Sequence[int]) -> None:
    """Close every fd, even when one close fails (each drops a lock that must not stay held)."""
    for fd in fds:
        _close_quietly(fd)


def valid_pid(value: object) -> int | None:
    """``value`` if it can be a real process id, else None (never a group, never too big)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= PID_MAX:
        return None
    return value


@dataclass(frozen=True, slots=True)
class HolderRecord:
    """What a holder wrote into a lock file, checked: pids (all valid), since, host."""

    pids: tuple[int, ...] = ()
    since: datetime | None = None
    host: str | None = None


def encode_record(pids: Sequence[int], since: float, host: str) -> bytes:
    """The holder record as written into each lock file of a lease."""
    return json.dumps({"pid": pids[0], "pids": list(pids), "since": since, "host": host}).encode()


def write_record(fd: int, data: bytes) -> None:
    """Write ``data`` at the start of the lock file; LockIOError (e.g. disk full) when it cannot."""
    try:
        size = os.fstat(fd).st_size
        if len(data) < size <= RECORD_MAX:
            # Padded with spaces (which JSON ignores) over the longer record before it: a pwrite
            # in place, much cheaper than truncating on every lease.
            data = data.ljust(size)
        elif size > len(data):
            os.ftruncate(fd, len(data))  # a huge file is garbage: never pad up to it
        done = 0
        while done < len(data):
            # A short write is legal (a file-size limit, a nearly full disk): write the rest, and
            # the next call reports why it cannot (EFBIG, ENOSPC) instead of a torn record.
            written = os.pwrite(fd, data[done:], done)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
    except OSError as exc:
        raise io_error(exc, "cannot write the holder record into a GPU lock file") from exc


def read_record(fd: int) -> HolderRecord:
    """The record in the lock file, every field checked; empty when unreadable or garbage."""
    try:
        raw = os.pread(fd, RECORD_MAX, 0)
    except OSError as exc:
        raise io_error(exc, "cannot read a GPU lock file's holder record") from exc
    try:
        record = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        # Torn mid-write by a holder writing it right now, or garbage: "held, pid unknown".
        return HolderRecord()
    if not isinstance(record, dict):
        return HolderRecord()
    listed = record.get("pids")
    if not isinstance(listed, list):
        listed = []
    pids = tuple(pid for pid in (valid_pid(p) for p in listed[:PIDS_MAX]) if pid is not None)
    return HolderRecord(pids=pids, since=_since(record.get("since")), host=_host(record.get("host")))


def _since(value: object) -> datetime | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    try:
        return datetime.fromtimestamp(value, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _host(value: object) -> str | None:
    if not isinstance(value, str) or not value.isprintable():
        return None
    return value[:HOST_MAX]


def alive(pid: int) -> bool:
    """Whether process ``pid`` (checked by :func:`valid_pid`) exists; a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:  # pragma: no cover - pids are checked before they get here
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as status:
            # "pid (comm) S ...": the state follows the last ')' (comm may hold one).
            return status.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc (or it went away): the kill probe said it exists
