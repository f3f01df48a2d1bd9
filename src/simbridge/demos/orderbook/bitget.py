"""Bitget's public order-book channel (``books``): the messages a client sends and parses.

A push is ``{"action": "snapshot"|"update", "arg": {...}, "data": [{"bids": [["30000.96", "0.0500"],
...], "asks": [...], "checksum": -123, "seq": 7, "ts": "1695710946294"}], "ts": ...}``. Prices and
sizes arrive as strings and stay strings until :mod:`.fixed` makes them int64; a JSON float anywhere
is refused, because a float price is the bug this demo exists to prevent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from simbridge.demos.orderbook.book import L2Book, Level
from simbridge.demos.orderbook.errors import FeedProtocolError, InvalidDecimal

PUBLIC_URL = "wss://ws.bitget.com/v2/ws/public"


@dataclass(frozen=True)
class Channel:
    """One subscription: product line, channel and instrument."""

    inst_type: str = "SPOT"
    channel: str = "books"
    inst_id: str = "BTCUSDT"

    def arg(self) -> dict[str, str]:
        return {"instType": self.inst_type, "channel": self.channel, "instId": self.inst_id}


def subscribe_message(channel: Channel, *, op: Literal["subscribe", "unsubscribe"] = "subscribe") -> str:
    return json.dumps({"op": op, "args": [channel.arg()]})


@dataclass(frozen=True)
class DepthMessage:
    """One parsed push of the depth channel."""

    action: Literal["snapshot", "update"]
    bids: list[Level]
    asks: list[Level]
    checksum: int | None
    seq: int | None
    exchange_ts_ms: int


@dataclass(frozen=True)
class EventMessage:
    """A reply to an op: ``subscribe``, ``unsubscribe`` or ``error`` (with code and msg)."""

    event: str
    arg: dict[str, Any]
    code: str = ""
    msg: str = ""


def _no_float(text: str) -> float:
    raise FeedProtocolError(f"the feed sent the JSON number {text}; prices and sizes must be strings")


def parse_message(text: str | bytes, book: L2Book) -> DepthMessage | EventMessage | None:
    """Parse one frame; ``None`` for ``pong``. Levels are parsed at ``book``'s fixed-point scales."""
    if text in ("pong", b"pong"):
        return None
    try:
        raw = json.loads(text, parse_float=_no_float)
    except ValueError as exc:
        if isinstance(exc, FeedProtocolError):
            raise
        raise FeedProtocolError(f"the feed sent a frame that is not JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise FeedProtocolError(f"the feed sent a {type(raw).__name__}, not a JSON object")
    if "event" in raw:
        arg = raw.get("arg")
        return EventMessage(
            event=str(raw["event"]),
            arg=arg if isinstance(arg, dict) else {},
            code=str(raw.get("code", "")),
            msg=str(raw.get("msg", "")),
        )
    action = raw.get("action")
    data = raw.get("data")
    if action not in ("snapshot", "update") or not isinstance(data, list) or len(data) != 1:
        raise FeedProtocolError(
            f"a push needs action snapshot|update and one data item, got {str(raw)[:200]}"
        )
    item = data[0]
    if not isinstance(item, dict):
        raise FeedProtocolError("a push's data item is not an object")
    try:
        bids = [_level(book, pair) for pair in item.get("bids", [])]
        asks = [_level(book, pair) for pair in item.get("asks", [])]
    except InvalidDecimal:
        raise
    checksum, seq, ts = item.get("checksum"), item.get("seq"), item.get("ts", raw.get("ts"))
    for label, value in (("checksum", checksum), ("seq", seq)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise FeedProtocolError(f"{label} {value!r} is not an integer")
    if checksum is not None and not -(2**31) <= checksum < 2**31:
        raise FeedProtocolError(f"checksum {checksum} is not a signed 32-bit integer")
    try:
        exchange_ts_ms = int(ts)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise FeedProtocolError(f"timestamp {ts!r} is not milliseconds since the epoch") from exc
    return DepthMessage(action, bids, asks, checksum, seq, exchange_ts_ms)


def _level(book: L2Book, pair: object) -> Level:
    if not isinstance(pair, list) or len(pair) < 2 or not all(isinstance(x, str) for x in pair[:2]):
        raise FeedProtocolError(f"a level must be [price, size] as strings, got {str(pair)[:80]}")
    return book.parse_level(pair[0], pair[1])


def depth_push(
    channel: Channel,
    *,
    action: Literal["snapshot", "update"],
    bids: list[tuple[str, str]],
    asks: list[tuple[str, str]],
    checksum: int,
    seq: int,
    ts_ms: int,
) -> str:
    """A push as the exchange frames it (the replay server's side)."""
    item = {
        "asks": [list(a) for a in asks],
        "bids": [list(b) for b in bids],
        "checksum": checksum,
        "seq": seq,
        "ts": str(ts_ms),
    }
    return json.dumps({"action": action, "arg": channel.arg(), "data": [item], "ts": ts_ms})
