"""What a ring may hold and how its failures read: record dtypes and their description in the segment,
capacity rules, and the typed error for each shm.h status of a push or pop (used by ring.py and _ring.c).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from simbridge.shm import _core
from simbridge.shm.errors import (
    Corrupted,
    Full,
    InvalidArgument,
    InvalidLayout,
    LayoutMismatch,
    PeerGone,
    RecordTooLarge,
    ShmError,
    Timeout,
    WriterClosed,
)


def dtype_descr(dtype: np.dtype[Any]) -> bytes:
    """The record dtype as text a consumer can rebuild without evaluating code (numpy's descr)."""
    text = repr(np.lib.format.dtype_to_descr(dtype)).encode()
    if len(text) > _core.RING_DESCR_MAX:
        raise InvalidLayout(
            f"record dtype {dtype} needs {len(text)} bytes to describe, at most {_core.RING_DESCR_MAX} fit; "
            "use fewer or shorter field names"
        )
    return text


def dtype_from_descr(text: bytes, record_size: int, name: str) -> np.dtype[Any] | None:
    if not text:
        return None
    try:
        # literal_eval builds only literals: a hostile description cannot run code.
        dtype = np.lib.format.descr_to_dtype(ast.literal_eval(text.decode("ascii")))
    except Exception as exc:  # any malformed text, whatever numpy or ast raise for it
        raise LayoutMismatch(f"ring {name!r}: its record description {text[:80]!r} is not a dtype") from exc
    if dtype.itemsize != record_size or dtype.hasobject:
        raise LayoutMismatch(
            f"ring {name!r}: record description {dtype} disagrees with its {record_size}-byte records"
        )
    return dtype


def record_dtype_of(record_dtype: DTypeLike) -> np.dtype[Any]:
    try:
        dtype = np.dtype(record_dtype)
    except (TypeError, ValueError) as exc:
        raise InvalidLayout(f"{record_dtype!r} is not a numpy dtype ({exc})") from exc
    if dtype.hasobject or dtype.itemsize == 0 or dtype.itemsize > _core.RING_MAX_RECORD_SIZE:
        raise InvalidLayout(
            f"record dtype {dtype} cannot be a ring record: it must hold no Python objects and be "
            f"1..{_core.RING_MAX_RECORD_SIZE} bytes"
        )
    return dtype


def check_capacity(capacity: object, fixed: bool) -> int:
    unit, low = ("records", 2) if fixed else ("bytes", _core.RING_MIN_BYTES)
    value = capacity if isinstance(capacity, int) and not isinstance(capacity, bool) else None
    if value is None or value < low or value & (value - 1):
        raise InvalidArgument(f"capacity is a power of two >= {low} ({unit}), got {capacity!r}")
    return value


@dataclass(frozen=True)
class ErrorContext:
    """What an error message says about its ring (kept apart from Ring: the C handle holds it)."""

    name: str
    is_producer: bool
    producer_pid: int
    capacity: int
    fixed: bool
    max_payload: int
    default_timeout: float

    def error(
        self, rc: int, waited_for: str, timeout: float | None, pushed: int, consumer_pid: int
    ) -> ShmError:
        """The typed error for a shm.h status of a push or pop (the C core calls it too)."""
        name = self.name
        if rc == _core.ETIMEDOUT:
            limit = self.default_timeout if timeout is None else timeout
            return Timeout(
                f"ring {name!r}: waited {limit:g} s for {waited_for}, none came "
                f"({'the consumer is slow or stopped' if self.is_producer else 'the producer sent nothing'})",
                name=name,
                waited_for=waited_for,
                timeout=limit,
            )
        if rc == _core.EPEERGONE and self.is_producer:
            return PeerGone(
                f"ring {name!r}: the consumer died or closed the ring while the producer waited for room "
                f"({pushed} record(s) of this call went in)",
                name=name,
                pid=consumer_pid,
            )
        if rc == _core.EPEERGONE:
            return PeerGone(
                f"ring {name!r}: producer pid {self.producer_pid} is gone; every record it completed "
                "was delivered",
                name=name,
                pid=self.producer_pid,
            )
        if rc == _core.ECLOSED:
            return WriterClosed(
                f"ring {name!r}: the producer (pid {self.producer_pid}) closed it and every record was read",
                name=name,
                pid=self.producer_pid,
            )
        if rc == _core.EFULL:
            return Full(
                f"ring {name!r} is full ({self.capacity} {'records' if self.fixed else 'bytes'}; "
                f"overflow='fail'); {pushed} record(s) of this call went in",
                name=name,
                pushed=pushed,
            )
        if rc == _core.ETOOBIG:
            return RecordTooLarge(
                f"ring {name!r}: a record is at most {self.max_payload} bytes (capacity/2 - 8); "
                "create the ring with a larger capacity"
            )
        if rc in (_core.ECORRUPT, _core.EHEADER):
            return Corrupted(
                f"ring {name!r}: its indexes, records or header hold values no correct peer writes "
                "(a peer wrote outside the protocol); recreate the ring"
            )
        return ShmError(f"ring {name!r}: unexpected status {rc}")
