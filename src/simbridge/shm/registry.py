"""What blocks exist in /dev/shm, whose they are, and the removal of stale ones.

A block is stale when its owner process is gone (or it was made before the last boot), or when its
creator died before finishing initialisation. Removal takes the name's lifecycle lock, judges the
segment again under it and unlinks only that very segment, so a live owner's new block is never hit.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from simbridge.logs import get_logger
from simbridge.shm import _core
from simbridge.shm.errors import BlockExists, BlockNotFound, InvalidLayout, LayoutMismatch, NoSpace, ShmError
from simbridge.shm.layout import SHM_DIR, CreateArgs, validate_name
from simbridge.shm.namelock import name_lock, translate_os_error

log = get_logger("simbridge.shm")

UNINITIALISED_GRACE_S = 60.0

SegmentT = TypeVar("SegmentT", _core.Segment, _core.RingHandle)

# (st_dev, st_ino) of the segment a verdict was made on.
Identity = tuple[int, int]


@dataclass(frozen=True)
class BlockInfo:
    """One segment as seen from outside; ``state`` is open, closed, uninitialised or invalid."""

    name: str
    size: int
    state: str
    owner_pid: int | None = None
    alive: bool = False
    dtype: str | None = None
    shape: tuple[int, ...] | None = None
    slots: int | None = None
    commit: int = 0
    iteration: int | None = None
    last_publish: float | None = None
    age_s: float = 0.0
    error: str | None = None
    kind: str = "block"
    ring: dict[str, Any] | None = None  # a ring's counters and consumer (kind "ring")

    @property
    def stale(self) -> bool:
        if self.state == "uninitialised":
            return self.age_s > UNINITIALISED_GRACE_S
        return self.state in ("open", "closed") and not self.alive


def _path(name: str) -> Path:
    return SHM_DIR / f"{_core.SHM_PREFIX}{name}"


def _invalid(name: str, st: os.stat_result, age: float, error: str) -> BlockInfo:
    return BlockInfo(name=name, size=st.st_size, state="invalid", age_s=age, error=error)


def _info_from_path(path: Path) -> BlockInfo | None:
    name = path.name[len(_core.SHM_PREFIX) :]
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise translate_os_error(exc, f"look at {path}") from exc
    age = max(0.0, time.time() - st.st_mtime)
    # A name from a directory listing may be anything, bytes that are not UTF-8 included.
    if not name.isascii() or not _core.name_valid(name):
        return _invalid(name, st, age, "not a valid block name")
    if not stat.S_ISREG(st.st_mode):
        return _invalid(name, st, age, "not a regular file (a directory or link named like a block)")
    try:
        segment = _core.open(name)
    except FileNotFoundError:
        return None
    except LayoutMismatch as exc:  # not a block: a ring, or something damaged
        return _ring_info(name, st, age, exc)
    except (ShmError, OSError, ValueError) as exc:  # permission, a damaged header
        return _invalid(name, st, age, str(exc))
    if segment is None:
        return BlockInfo(name=name, size=st.st_size, state="uninitialised", age_s=age)
    try:
        header = segment.header()
        alive = bool(segment.writer_alive())
    except (ShmError, OSError, ValueError) as exc:  # a peer rewrote the header under us
        return _invalid(name, st, age, str(exc))
    finally:
        segment.close()
    published = header["commit"] > 0
    return BlockInfo(
        name=name,
        size=header["total_bytes"],
        state="closed" if header["state"] == _core.STATE_CLOSED else "open",
        owner_pid=header["owner_pid"],
        alive=alive,
        dtype=header["dtype_name"],
        shape=tuple(header["shape"]),
        slots=header["slot_count"],
        commit=header["commit"],
        iteration=header["last_iteration"] if published else None,
        last_publish=header["heartbeat_ns"] / 1e9 if published else None,
        age_s=age,
    )


RING_COUNTERS = ("pushed", "popped", "full_waits", "empty_waits", "producer_wakes", "consumer_wakes")


def _ring_info(name: str, st: os.stat_result, age: float, not_a_block: Exception) -> BlockInfo | None:
    try:
        header = _core.ring_inspect(name)
    except FileNotFoundError:
        return None
    except (ShmError, OSError, ValueError):
        return _invalid(name, st, age, str(not_a_block))
    if header is None:
        return BlockInfo(name=name, size=st.st_size, state="uninitialised", age_s=age, kind="ring")
    ring = {key: header[key] for key in RING_COUNTERS}
    ring |= {
        "mode": header["mode"],
        "record_size": header["record_size"],
        "consumer_pid": header["consumer_pid"] or None,
        "consumer_alive": header["consumer_alive"] and header["consumer_pid"] != 0,
        "queued": (header["tail"] - header["head"]) % 2**64,
    }
    return BlockInfo(
        name=name,
        size=header["total_bytes"],
        state="closed" if header["state"] == _core.STATE_CLOSED else "open",
        owner_pid=header["producer_pid"],
        alive=header["producer_alive"],
        dtype=header["descr"].decode("ascii", "replace") if header["descr"] else "bytes",
        shape=(header["capacity"],),
        commit=header["pushed"],
        age_s=age,
        kind="ring",
        ring=ring,
    )


def block_info(name: str) -> BlockInfo | None:
    """The block called ``name``, or None if there is none."""
    validate_name(name)
    return _info_from_path(_path(name))


def list_blocks() -> list[BlockInfo]:
    """Every simbridge segment in /dev/shm, sorted by name."""
    infos = []
    for path in sorted(SHM_DIR.glob(f"{_core.SHM_PREFIX}*")):
        info = _info_from_path(path)
        if info is not None:
            infos.append(info)
    return infos


def judge(name: str) -> tuple[BlockInfo | None, Identity | None]:
    """The block under ``name`` and the identity of the very segment judged; call it under the lock.

    The identity is None when the segment cannot be pinned (e.g. another user's), and the verdict is
    ``(None, None)`` when the name is missing or changed while it was judged.
    """
    path = _path(name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None, None
    except OSError:
        return _info_from_path(path), None  # unreadable to us: described, never judged stale by us
    try:
        pinned = os.fstat(fd)
        info = _info_from_path(path)
        # Our fd keeps the inode alive, so its number cannot be reused: if the name points to it
        # before and after the judgement, the judgement was about this very segment.
        try:
            now = os.lstat(path)
        except FileNotFoundError:
            return None, None
        if (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino):
            return None, None
        return info, (pinned.st_dev, pinned.st_ino)
    finally:
        os.close(fd)


def unlink_if_same(name: str, identity: Identity) -> bool:
    """Unlink ``name`` if it still names the segment of ``identity``; call it under the name's lock.

    POSIX has no "unlink if still this inode": between the check and the unlink only a process outside
    the lock (a C peer's create after a hand-run ``rm``) could swap the name, never a simbridge one.
    """
    path = _path(name)
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise translate_os_error(exc, f"look at block {name!r}") from exc
    if (now.st_dev, now.st_ino) != identity:
        return False
    return _unlink(name)


def _unlink(name: str) -> bool:
    try:
        _core.unlink(name)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.filename is not None and str(exc.filename).startswith("/"):
            exc.filename = str(SHM_DIR) + str(exc.filename)  # shm_unlink names it without /dev/shm
        raise translate_os_error(exc, f"remove block {name!r}") from exc
    return True


def create_segment(name: str, args: CreateArgs) -> _core.Segment:
    """Make block ``name``'s segment, replacing a stale one; call it under the name's lock."""

    def make() -> _core.Segment:
        return _core.create(name, args.code, args.shape, args.slots, args.mode, args.checksum)

    try:
        return make()
    except FileExistsError:
        return _replace_stale(name, make, replace_stale=args.replace_stale)
    except OSError as exc:  # typed by the C core or not: said again with the size and the fix
        raise _create_error(exc, name, args.total_bytes) from exc
    except ShmError:
        raise
    except ValueError as exc:
        raise InvalidLayout(f"block {name!r}: cannot hold shape {args.shape} of {args.dtype}: {exc}") from exc


def create_ring_segment(
    name: str, make: Callable[[], _core.RingHandle], *, replace_stale: bool, size: int
) -> _core.RingHandle:
    """Make ring ``name``'s segment with ``make``, replacing a stale one; call it under the name's lock."""
    try:
        return make()
    except FileExistsError:
        return _replace_stale(name, make, replace_stale=replace_stale)
    except OSError as exc:
        raise _create_error(exc, name, size) from exc


def _replace_stale(name: str, make: Callable[[], SegmentT], *, replace_stale: bool) -> SegmentT:
    # Under the name's lock the verdict and the unlink concern the same segment, and no other
    # simbridge process can replace it in between, so exactly one replacer wins.
    for _ in range(3):  # the name changes under the lock only when a live owner unlinks its own
        info, identity = judge(name)
        if info is not None and not info.stale:
            held = (
                f"its owner pid {info.owner_pid} is alive"
                if info.alive
                else f"is {info.state} ({info.error or 'being created'})"
            )
            raise BlockExists(f"block {name!r} exists and {held}; pick another name or stop that process")
        if info is not None and not replace_stale:
            raise BlockExists(
                f"block {name!r} exists (stale: owner gone); remove it with "
                f"`simbridge shm rm {name}` or pass replace_stale=True"
            )
        if info is not None and identity is not None:
            log.warning("replacing stale block", name=name, owner_pid=info.owner_pid)
            unlink_if_same(name, identity)
        try:
            return make()
        except FileExistsError:
            continue
    raise BlockExists(
        f"block {name!r} kept reappearing while a stale one was replaced; a process outside "
        "simbridge's lock (a C peer?) is creating it: pick another name or stop that process"
    )


def _create_error(exc: OSError, name: str, size: int) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
        return NoSpace(
            errno.ENOSPC,
            f"{SHM_DIR} has no room for block {name!r} (about {size:,} bytes: {exc.strerror}); free "
            f"space (`simbridge shm clean`, `df -h {SHM_DIR}`) or enlarge {SHM_DIR}",
        )
    if (
        isinstance(exc.filename, str)
        and exc.filename.startswith("/")
        and not exc.filename.startswith(str(SHM_DIR))
    ):
        exc.filename = f"{SHM_DIR}{exc.filename}"  # shm_open names it without /dev/shm
    return translate_os_error(exc, f"create block {name!r}")


def remove(name: str, *, force: bool = False) -> None:
    """Unlink a block. One whose owner is alive, or that is still being created, needs ``force``."""
    validate_name(name)
    with name_lock(name):
        info, identity = judge(name)
        if info is None:
            raise BlockNotFound(f"no block named {name!r} in {SHM_DIR}")
        if not force:
            if info.alive:
                raise BlockExists(
                    f"block {name!r} is held by live pid {info.owner_pid}; stop it first, "
                    "or force the removal"
                )
            if info.state == "uninitialised" and not info.stale:
                raise BlockExists(
                    f"block {name!r} is being created ({info.age_s:.0f} s old, not initialised); wait "
                    f"{UNINITIALISED_GRACE_S:g} s for it to count as abandoned, or force the removal"
                )
        removed = unlink_if_same(name, identity) if identity is not None else _unlink(name)
        if not removed:
            raise BlockNotFound(f"block {name!r} vanished while removing it")
    log.info("block removed", name=name, owner_pid=info.owner_pid, forced=force and info.alive)


@dataclass
class CleanReport:
    """What :func:`clean` did: the stale blocks removed, and those it could not remove with why."""

    removed: list[BlockInfo] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def clean(*, prefix: str = "") -> CleanReport:
    """Remove every stale block (dead owner, other boot, or abandoned half-created) named ``prefix...``."""
    report = CleanReport()
    for candidate in list_blocks():
        if not candidate.stale or not candidate.name.startswith(prefix):
            continue
        try:
            with name_lock(candidate.name):
                # Judged again under the lock: since the listing, the name may hold a live owner's block.
                info, identity = judge(candidate.name)
                if info is None or identity is None or not info.stale:
                    continue
                if not unlink_if_same(candidate.name, identity):
                    continue
        except ShmError as exc:
            report.failed.append((candidate.name, str(exc)))
            continue
        log.info("stale block removed", name=info.name, owner_pid=info.owner_pid, state=info.state)
        report.removed.append(info)
    return report


def cleanup_stale(*, prefix: str = "") -> list[BlockInfo]:
    """Remove every stale block (dead owner, other boot, or abandoned half-created); return them."""
    return clean(prefix=prefix).removed
