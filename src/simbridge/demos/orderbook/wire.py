"""What travels through the demo's two rings.

Feed -> book: variable records, type 1 (snapshot) or 2 (update); payload = header (exchange time ns,
local receive time ns, seq, bid count, ask count) then int64 ``(price, size)`` pairs, bids first.
Book -> recorder: fixed records of :data:`TOP_DTYPE`, one per book event (prices in fixed point).
A payload read from shared memory is checked against its own counts before it is sliced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from simbridge.demos.orderbook.book import Level
from simbridge.demos.orderbook.errors import FeedProtocolError
from simbridge.demos.orderbook.feed import BookEvent

SNAPSHOT, UPDATE = 1, 2
_HEADER = struct.Struct("<qqqII")
_KINDS = {"snapshot": SNAPSHOT, "update": UPDATE}

# One row per book event; the recorder turns each field into a Parquet column.
TOP_DTYPE = np.dtype(
    [
        ("exchange_ts_ns", "<i8"),  # the exchange's matching-engine time
        ("receive_ts_ns", "<i8"),  # when the feed process read the frame off the socket
        ("book_ts_ns", "<i8"),  # when the book process had applied it and computed the OBI
        ("seq", "<i8"),
        ("kind", "<i8"),  # SNAPSHOT or UPDATE
        ("best_bid", "<i8"),  # fixed point, 10**price_scale
        ("best_ask", "<i8"),
        ("bid_size", "<i8"),  # at the best level, 10**size_scale
        ("ask_size", "<i8"),
        ("obi", "<f8"),  # over the top N levels
    ]
)


def encode_event(event: BookEvent) -> tuple[int, bytes]:
    """``(type, payload)`` for the feed -> book ring."""
    header = _HEADER.pack(
        event.exchange_ts_ms * 1_000_000, event.receive_ns, event.seq, len(event.bids), len(event.asks)
    )
    levels = np.array(
        [(lv.price, lv.size) for lv in event.bids] + [(lv.price, lv.size) for lv in event.asks], dtype="<i8"
    )
    return _KINDS[event.kind], header + levels.tobytes()


@dataclass(frozen=True)
class DecodedEvent:
    """A feed -> book record, decoded."""

    kind: int
    exchange_ts_ns: int
    receive_ts_ns: int
    seq: int
    bids: list[Level]
    asks: list[Level]


def decode_event(kind: int, payload: bytes) -> DecodedEvent:
    """The inverse of :func:`encode_event`; a record whose sizes disagree is a typed error."""
    if kind not in (SNAPSHOT, UPDATE) or len(payload) < _HEADER.size:
        raise FeedProtocolError(f"ring record type {kind} of {len(payload)} bytes is not a book event")
    exchange_ns, receive_ns, seq, n_bids, n_asks = _HEADER.unpack_from(payload)
    if len(payload) != _HEADER.size + 16 * (n_bids + n_asks):
        raise FeedProtocolError(
            f"ring record says {n_bids} bids and {n_asks} asks but holds {len(payload) - _HEADER.size} bytes"
        )
    pairs: NDArray[Any] = np.frombuffer(payload, dtype="<i8", offset=_HEADER.size).reshape(-1, 2)
    levels = [Level(int(p), int(s), 0, 0) for p, s in pairs.tolist()]
    return DecodedEvent(kind, exchange_ns, receive_ns, seq, levels[:n_bids], levels[n_bids:])
