"""Snapshot: one committed iteration of a Block as a reader saw it."""

from __future__ import annotations

from typing import Any

from numpy.typing import NDArray

from simbridge.shm import _core


class Snapshot:
    """One committed iteration as a reader saw it.

    ``array`` is a private copy, unless the read used ``copy=False``: then it is a read-only view of
    the writer's slot, valid until the writer has published ``slots - 1`` more iterations (with the
    default two slots: until the next-but-one publish starts). Call :meth:`valid` after using such a
    view: if it returns False the view may have been overwritten while you used it; read again.
    """

    # Built on every read, so it keeps the raw tuple from the C core and derives fields on access.
    __slots__ = ("_raw", "_segment", "array", "writer_pid")

    def __init__(
        self,
        array: NDArray[Any],
        raw: tuple[int, int, int, int, int, int],
        writer_pid: int,
        segment: _core.Segment | None,
    ) -> None:
        self.array = array
        self._raw = raw
        self.writer_pid = writer_pid
        self._segment = segment

    @property
    def iteration(self) -> int:
        """The iteration id the writer gave this publish."""
        return self._raw[1]

    @property
    def commit(self) -> int:
        """The writer's publish counter (1 for its first publish)."""
        return self._raw[0]

    @property
    def published_at(self) -> float:
        """When the writer committed it, in seconds since the epoch."""
        return self._raw[2] / 1e9

    @property
    def checksum(self) -> int:
        """The CRC32C the writer stored (0 when the block has checksums off)."""
        return self._raw[3]

    def valid(self) -> bool:
        """True if the data is still what was read (always True for a copy)."""
        return self._segment is None or self._segment.valid(self._raw[4], self._raw[5])

    def __repr__(self) -> str:
        return (
            f"Snapshot(iteration={self.iteration}, commit={self.commit}, shape={self.array.shape}, "
            f"dtype={self.array.dtype}, writer_pid={self.writer_pid})"
        )
