"""The lifecycle lock of a block name: create, replace, remove and clean of one name run one at a time.

The lock is an ``flock`` on ``/dev/shm/.simbridge.<name>.lock``. Its holder deletes the file before
releasing it, and a taker checks that the file it locked is still the one under that name, so two
holders never overlap and no lock file outlives its use.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from simbridge.shm.errors import AccessDenied, LockTimeout, ShmOSError
from simbridge.shm.layout import SHM_DIR

# Creating a block of many GiB (fallocate) holds the lock for seconds; far beyond that, the holder hangs.
LOCK_TIMEOUT_S: Final = 30.0


def lock_path(name: str) -> Path:
    """The lock file of block ``name`` (hidden, so listings of ``simbridge.*`` never show it)."""
    return SHM_DIR / f".simbridge.{name}.lock"


def translate_os_error(exc: OSError, doing: str) -> AccessDenied | ShmOSError:
    """``exc`` as the typed error a caller gets, with what was being done and how to fix it."""
    where = f" ({exc.filename})" if exc.filename else ""
    reason = exc.strerror or str(exc)
    code = exc.errno or 0
    if code in (errno.EACCES, errno.EPERM) or isinstance(exc, PermissionError):
        owner = _owner_of(exc.filename)
        return AccessDenied(
            code,
            f"cannot {doing}{where}: {reason}{owner}; run as the user who created it, or as root",
        )
    hint = {
        errno.EISDIR: "it is a directory, not a segment; remove it with rmdir",
        errno.ELOOP: "it is a symbolic link, not a segment; remove the link",
        errno.EMFILE: "this process has too many open files; close some or raise `ulimit -n`",
        errno.ENFILE: "the system has too many open files; close some",
        errno.EROFS: f"{SHM_DIR} is read-only; mount it read-write",
    }.get(code, f"check {SHM_DIR} (`ls -la {SHM_DIR}`, `df -h {SHM_DIR}`)")
    return ShmOSError(code, f"cannot {doing}{where}: {reason}; {hint}")


def _owner_of(filename: object) -> str:
    if not isinstance(filename, str | bytes | os.PathLike):
        return ""
    try:
        uid = os.lstat(filename).st_uid
    except OSError:
        return ""
    return f" (it belongs to uid {uid}, this process runs as uid {os.geteuid()})"


@contextmanager
def name_lock(name: str, *, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold block ``name``'s lifecycle lock; :class:`LockTimeout` after ``timeout`` seconds of waiting."""
    path = lock_path(name)
    fd = _acquire(path, name, timeout)
    try:
        yield
    finally:
        # Deleted while still held: a waiter that then locks the old file sees it gone and retries.
        # Another user's file in the sticky /dev/shm cannot be deleted; it stays, harmless and reusable.
        try:
            if _same_file(fd, path):
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


def _acquire(path: Path, name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
        except OSError as exc:
            os.close(fd)
            raise translate_os_error(exc, f"lock block {name!r}") from exc
        else:
            if _same_file(fd, path):
                return fd
            os.close(fd)  # its holder deleted it on release: lock the file under the name now
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockTimeout(
                f"block {name!r}: its lock {path} stayed held for {timeout:g} s by another process "
                f"creating or removing it; retry, or find the holder with `fuser {path}`",
                name=name,
                waited_for=f"the lock {path}",
                timeout=timeout,
            )
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def _open_lock_file(path: Path) -> int:
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    while True:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            # O_CREAT only when missing: protected_regular forbids it on another user's file in /dev/shm.
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            except OSError as exc:
                raise translate_os_error(exc, f"create the lock file {path}") from exc
            # Readable by all whatever the umask: other users' processes must be able to take it too.
            os.fchmod(fd, 0o644)
        except OSError as exc:
            raise translate_os_error(exc, f"open the lock file {path}") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ShmOSError(
                errno.EINVAL, f"{path} should be a lock file but is not a regular file; remove it"
            )
        return fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)
