"""What blocks exist in /dev/shm, whose they are, and the removal of stale ones.

A block is stale when its owner process is gone (or it was made before the last boot), or when its
creator died before finishing initialisation. Only stale blocks are removed by :func:`cleanup_stale`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from simbridge.logs import get_logger
from simbridge.shm import _core
from simbridge.shm.errors import BlockExists, BlockNotFound, LayoutMismatch
from simbridge.shm.layout import SHM_DIR, segment_path, validate_name

log = get_logger("simbridge.shm")

UNINITIALISED_GRACE_S = 60.0


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

    @property
    def stale(self) -> bool:
        if self.state == "uninitialised":
            return self.age_s > UNINITIALISED_GRACE_S
        return self.state in ("open", "closed") and not self.alive


def _info_from_path(path: Path) -> BlockInfo | None:
    name = path.name[len(_core.SHM_PREFIX) :]
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    age = max(0.0, time.time() - stat.st_mtime)
    if not _core.name_valid(name):
        return BlockInfo(
            name=name, size=stat.st_size, state="invalid", age_s=age, error="not a valid block name"
        )
    try:
        segment = _core.open(name)
    except FileNotFoundError:
        return None
    except LayoutMismatch as exc:
        return BlockInfo(name=name, size=stat.st_size, state="invalid", age_s=age, error=str(exc))
    except OSError as exc:
        return BlockInfo(name=name, size=stat.st_size, state="invalid", age_s=age, error=str(exc))
    if segment is None:
        return BlockInfo(name=name, size=stat.st_size, state="uninitialised", age_s=age)
    try:
        header = segment.header()
        alive = bool(segment.writer_alive())
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


def block_info(name: str) -> BlockInfo | None:
    """The block called ``name``, or None if there is none."""
    return _info_from_path(segment_path(name))


def list_blocks() -> list[BlockInfo]:
    """Every simbridge segment in /dev/shm, sorted by name."""
    infos = []
    for path in sorted(SHM_DIR.glob(f"{_core.SHM_PREFIX}*")):
        info = _info_from_path(path)
        if info is not None:
            infos.append(info)
    return infos


def remove(name: str, *, force: bool = False) -> None:
    """Unlink a block. One whose owner is alive needs ``force`` (its readers keep their mapping)."""
    validate_name(name)
    info = block_info(name)
    if info is None:
        raise BlockNotFound(f"no block named {name!r} in {SHM_DIR}")
    if info.alive and not force:
        raise BlockExists(
            f"block {name!r} is held by live pid {info.owner_pid}; stop it first, or force the removal"
        )
    try:
        _core.unlink(name)
    except FileNotFoundError:
        raise BlockNotFound(f"block {name!r} vanished while removing it") from None
    log.info("block removed", name=name, owner_pid=info.owner_pid, forced=force and info.alive)


def cleanup_stale() -> list[BlockInfo]:
    """Remove every stale block (dead owner, other boot, or abandoned half-created); return them."""
    removed = []
    for info in list_blocks():
        if not info.stale:
            continue
        try:
            _core.unlink(info.name)
        except FileNotFoundError:
            continue
        log.info("stale block removed", name=info.name, owner_pid=info.owner_pid, state=info.state)
        removed.append(info)
    return removed
