"""The demo's use of :class:`simbridge.shm.Ring`, in one place: who creates, who opens, how batches move.

The producer of each ring creates it (and unlinks it when it closes); the consumer opens it and
learns the producer is done from ``WriterClosed`` (a clean close) or ``PeerGone`` (a death), both
raised only after every completed record was delivered.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from simbridge.shm.errors import Timeout
from simbridge.shm.ring import Ring


def create_variable(name: str, *, capacity: int) -> Ring:
    return Ring.create(name, capacity=capacity)


def create_fixed(name: str, dtype: np.dtype[Any], *, capacity: int) -> Ring:
    # ``capacity`` is in bytes for both rings: the fixed one holds that many bytes' worth of records.
    records = 1 << max(1, (capacity // dtype.itemsize).bit_length() - 1)
    return Ring.create(name, capacity=records, record_dtype=dtype)


def open_consumer(name: str, *, timeout: float) -> Ring:
    return Ring.open(name, timeout=timeout)


def push(ring: Ring, kind: int, payload: bytes) -> None:
    # Blocks while the ring is full: the feed slows down rather than losing an update.
    ring.push(payload, type=kind, timeout=30.0)


def push_fixed(ring: Ring, rows: NDArray[Any]) -> None:
    ring.push_many(rows, timeout=30.0)


def pop_records(ring: Ring, count: int, *, timeout: float) -> list[tuple[int, bytes]]:
    """Up to ``count`` variable records as ``(type, payload)``; empty if none came within ``timeout``."""
    try:
        return list(ring.pop_many(count, timeout=timeout, typed=True))
    except Timeout:
        return []
