"""Copying trees that come from outside (case folders, staged and simulated outputs) safely.

Every walk is relative to open directory descriptors with O_NOFOLLOW: a symbolic link, fifo,
device or socket anywhere in a tree is refused, never followed or opened, and a file swapped for
a link between the check and the copy is caught by the fstat of the opened descriptor, not by a
second lookup of its path. Limits (depth, files, bytes, path length) bound every walk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from simbridge.jobs.errors import UnsafeFileError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in after the lstat must not block the open; fstat refuses it next.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CHUNK = 1 << 20
# Recursion and open descriptors grow with depth: even "no limits" stops here.
HARD_MAX_DEPTH = 128

Prune = Callable[[tuple[str, ...]], bool]


@dataclass(frozen=True)
class TreeLimits:
    """Bounds of one tree: folder depth, file count, total bytes, bytes of one relative path."""

    max_depth: int = HARD_MAX_DEPTH
    max_files: int = 1 << 62
    max_bytes: int = 1 << 62
    max_path_bytes: int = 4096


@dataclass
class TreeSummary:
    """What a walk found: regular files, their bytes, and folders (each relative to the root)."""

    files: int = 0
    bytes: int = 0
    dirs: int = 0


def show(parts: Sequence[str]) -> str:
    """A relative path for messages: undecodable bytes shown escaped, never raw."""
    return "/".join(parts).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def _refusal(dir_fd: int, name: str, rel: Sequence[str], mode: int, where: str) -> UnsafeFileError:
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        shown = target.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return UnsafeFileError(
            f"{show(rel)} {where} is a symbolic link (to {shown!r}); links are refused: "
            "put the file itself there"
        )
    return UnsafeFileError(
        f"{show(rel)} {where} is {_kind(mode)}; only regular files and folders are allowed"
    )


def open_dir(path: Path) -> int:
    """Open a folder without following a link at its last component."""
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(f"{path} is not a folder (a link or a file)") from exc
        raise


_CHANGED = "changed into a link or a file while it was read"


def _open_sub(dir_fd: int, name: str, rel: Sequence[str], where: str, why: str = _CHANGED) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeFileError(f"{show(rel)} {where} {why}") from exc
        raise


def open_parent(root: Path, parts: Sequence[str], *, where: str = "", why: str = _CHANGED) -> int:
    """Open (creating them) the folders of ``root/parts`` down to its parent, following no link
    below ``root``; the caller closes the descriptor. UnsafeFileError (``why``) for a link or file."""
    root.mkdir(parents=True, exist_ok=True)
    fd = open_dir(root)
    try:
        for i, name in enumerate(parts[:-1]):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=fd)
            sub = _open_sub(fd, name, parts[: i + 1], where, why)
            os.close(fd)
            fd = sub
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(root: Path, parts: Sequence[str], *, where: str = "") -> int:
    """Open ``root/parts`` for reading, refusing a link or special file at any component.

    Raises IsADirectoryError for a folder (callers skip those) and UnsafeFileError for the rest.
    """
    fd = open_dir(root)
    try:
        for i, name in enumerate(parts[:-1]):
            sub = _open_sub(fd, name, parts[: i + 1], where)
            os.close(fd)
            fd = sub
        return _open_file(fd, parts[-1], parts, where)
    finally:
        os.close(fd)


def _open_file(dir_fd: int, name: str, rel: Sequence[str], where: str) -> int:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refusal(dir_fd, name, rel, stat.S_IFLNK, where) from exc
        raise
    mode = os.fstat(fd).st_mode
    if stat.S_ISREG(mode):
        return fd
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", show(rel))
    raise _refusal(dir_fd, name, rel, mode, where)


class _Walk:
    def __init__(self, *, limits: TreeLimits, prune: Prune | None, where: str) -> None:
        self.limits = limits
        self.prune = prune
        self.where = where
        self.summary = TreeSummary()
        self._tmp = f".sb-partial.{os.getpid()}.{threading.get_ident()}"

    def walk(self, src_fd: int, dst_fd: int | None, parts: tuple[str, ...]) -> None:
        for name in sorted(os.listdir(src_fd)):
            rel = (*parts, name)
            if self.prune is not None and self.prune(rel):
                continue
            if len(os.fsencode("/".join(rel))) > self.limits.max_path_bytes:
                raise UnsafeFileError(
                    f"{show(rel)[:200]}... {self.where} is a path longer than "
                    f"{self.limits.max_path_bytes} bytes; shorten the names"
                )
            mode = os.stat(name, dir_fd=src_fd, follow_symlinks=False).st_mode
            if stat.S_ISDIR(mode):
                self._dir(src_fd, dst_fd, name, rel)
            elif stat.S_ISREG(mode):
                self._file(src_fd, dst_fd, name, rel)
            else:
                raise _refusal(src_fd, name, rel, mode, self.where)

    def _dir(self, src_fd: int, dst_fd: int | None, name: str, rel: tuple[str, ...]) -> None:
        if len(rel) > min(self.limits.max_depth, HARD_MAX_DEPTH):
            raise UnsafeFileError(
                f"{show(rel[:3])}/... {self.where} nests folders deeper than "
                f"{min(self.limits.max_depth, HARD_MAX_DEPTH)} levels; flatten it"
            )
        self.summary.dirs += 1
        sub = _open_sub(src_fd, name, rel, self.where)
        sub_dst: int | None = None
        try:
            if dst_fd is not None:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=dst_fd)
                sub_dst = _open_sub(dst_fd, name, rel, "(in the destination)")
            self.walk(sub, sub_dst, rel)
        finally:
            os.close(sub)
            if sub_dst is not None:
                os.close(sub_dst)

    def _count(self, rel: tuple[str, ...], size: int) -> None:
        self.summary.files += 1
        self.summary.bytes += size
        if self.summary.files > self.limits.max_files:
            raise UnsafeFileError(
                f"{self.where} holds more than {self.limits.max_files} files (at {show(rel)[:200]})"
            )
        if self.summary.bytes > self.limits.max_bytes:
            raise UnsafeFileError(
                f"{self.where} holds more than {self.limits.max_bytes} bytes (at {show(rel)[:200]})"
            )

    def _file(self, src_fd: int, dst_fd: int | None, name: str, rel: tuple[str, ...]) -> None:
        if dst_fd is None:
            # Opened, not just stat'ed: an unreadable file is found before anything is copied.
            fd = _open_file(src_fd, name, rel, self.where)
            try:
                self._count(rel, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            return
        fd = _open_file(src_fd, name, rel, self.where)
        try:
            st = os.fstat(fd)
            self._count(rel, st.st_size)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp, dir_fd=dst_fd)
            out = os.open(
                self._tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                (st.st_mode & 0o777) | 0o600,
                dir_fd=dst_fd,
            )
            try:
                left = st.st_size
                # Never more than was counted: a file still growing must not blow the limit.
                while left > 0:
                    chunk = os.read(fd, min(_CHUNK, left))
                    if not chunk:
                        break
                    os.write(out, chunk)
                    left -= len(chunk)
            finally:
                os.close(out)
            os.replace(self._tmp, name, src_dir_fd=dst_fd, dst_dir_fd=dst_fd)
        finally:
            os.close(fd)


def check_tree(
    root: Path, *, limits: TreeLimits | None = None, prune: Prune | None = None, where: str = ""
) -> TreeSummary:
    """Walk ``root`` refusing links, special files and anything past ``limits``; what it holds."""
    walker = _Walk(limits=limits or TreeLimits(), prune=prune, where=where)
    fd = open_dir(root)
    try:
        walker.walk(fd, None, ())
    finally:
        os.close(fd)
    return walker.summary


def copy_tree(
    src: Path,
    dst: Path,
    *,
    limits: TreeLimits | None = None,
    prune: Prune | None = None,
    where: str = "",
    check_first: bool = True,
) -> TreeSummary:
    """Copy the folders and regular files of ``src`` into ``dst`` (created), refusing the rest.

    With ``check_first`` (or after the caller's own :func:`check_tree`) the tree is checked in
    full first, so a refused tree copies nothing; either way every file is re-checked as it is
    opened. Each file is written under a temporary name and renamed (never torn), and nothing
    in ``dst`` is followed either.
    """
    limits = limits or TreeLimits()
    if check_first:
        check_tree(src, limits=limits, prune=prune, where=where)
    walker = _Walk(limits=limits, prune=prune, where=where)
    dst.mkdir(parents=True, exist_ok=True)
    src_fd = open_dir(src)
    try:
        dst_fd = open_dir(dst)
        try:
            walker.walk(src_fd, dst_fd, ())
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    return walker.summary


def copy_file(src: Path, parts: Sequence[str], dst_root: Path) -> Path:
    """Copy ``src/parts`` to ``dst_root/parts`` atomically; no link is followed on either side.

    Raises IsADirectoryError when ``src/parts`` is a folder, UnsafeFileError for a link or a
    special file at any component.
    """
    fd = open_regular(src, parts, where="(in the outputs)")
    try:
        parent = open_parent(dst_root, parts, where="(in the destination)")
        try:
            tmp = f".sb-partial.{os.getpid()}.{threading.get_ident()}"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            out = os.open(tmp, flags, 0o644, dir_fd=parent)
            try:
                while chunk := os.read(fd, _CHUNK):
                    os.write(out, chunk)
            finally:
                os.close(out)
            os.replace(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
        finally:
            os.close(parent)
    finally:
        os.close(fd)
    return dst_root.joinpath(*parts)
