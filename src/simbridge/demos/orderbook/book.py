"""An L2 order book in int64 fixed point: one size per price level, updates replace, size 0 deletes.

Prices and sizes are parsed exactly from the exchange's decimal strings (:mod:`.fixed`), so an update
for ``"30000.96"`` always finds the level it replaces. Each level keeps the fraction digits of its text,
which the exchange's CRC32 over the top 25 levels (:meth:`L2Book.checksum`) is computed from.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from simbridge.demos.orderbook.fixed import format_fixed, parse_fixed

CHECKSUM_LEVELS = 25


@dataclass(frozen=True, slots=True)
class Level:
    """One price level: fixed-point price and size, and the fraction digits their texts had."""

    price: int
    size: int
    price_digits: int
    size_digits: int


class _Side:
    """One side of the book: a dict for the levels and a sorted key list for the order."""

    def __init__(self, *, descending: bool, price_scale: int, size_scale: int) -> None:
        self._sign = -1 if descending else 1
        self._scales = (price_scale, size_scale)
        self._keys: list[int] = []  # sign * price, ascending: the best level first
        self.levels: dict[int, Level] = {}
        # "price:size" as the exchange wrote it, made once per level change rather than per checksum.
        self._texts: dict[int, str] = {}

    def set(self, level: Level) -> None:
        if level.size == 0:
            if self.levels.pop(level.price, None) is not None:
                del self._keys[bisect.bisect_left(self._keys, self._sign * level.price)]
                self._texts.pop(level.price, None)
            return
        if level.price not in self.levels:
            bisect.insort(self._keys, self._sign * level.price)
        self.levels[level.price] = level
        self._texts.pop(level.price, None)

    def clear(self) -> None:
        self._keys.clear()
        self.levels.clear()
        self._texts.clear()

    def top_texts(self, count: int) -> list[str]:
        """The top ``count`` levels as ``"price:size"`` in their original text."""
        out = []
        price_scale, size_scale = self._scales
        for key in self._keys[:count]:
            price = self._sign * key
            text = self._texts.get(price)
            if text is None:
                level = self.levels[price]
                text = (
                    f"{format_fixed(level.price, price_scale, level.price_digits)}:"
                    f"{format_fixed(level.size, size_scale, level.size_digits)}"
                )
                self._texts[price] = text
            out.append(text)
        return out

    def top(self, count: int) -> list[Level]:
        return [self.levels[self._sign * key] for key in self._keys[:count]]

    def __len__(self) -> int:
        return len(self._keys)


class L2Book:
    """Bids and asks at fixed point ``10**price_scale`` and ``10**size_scale``."""

    def __init__(self, *, price_scale: int = 8, size_scale: int = 8) -> None:
        self.price_scale = price_scale
        self.size_scale = size_scale
        self.bids = _Side(descending=True, price_scale=price_scale, size_scale=size_scale)
        self.asks = _Side(descending=False, price_scale=price_scale, size_scale=size_scale)

    def parse_level(self, price: str, size: str) -> Level:
        """One ``[price, size]`` pair of the feed as a :class:`Level` (typed errors for bad text)."""
        p, p_digits = parse_fixed(price, self.price_scale)
        s, s_digits = parse_fixed(size, self.size_scale)
        return Level(p, s, p_digits, s_digits)

    def apply_snapshot(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Replace the whole book."""
        self.bids.clear()
        self.asks.clear()
        self.apply_update(bids, asks)

    def apply_update(self, bids: Iterable[Level], asks: Iterable[Level]) -> None:
        """Each level replaces the one at its price; a size of 0 deletes it."""
        for level in bids:
            self.bids.set(level)
        for level in asks:
            self.asks.set(level)

    def best_bid(self) -> Level | None:
        top = self.bids.top(1)
        return top[0] if top else None

    def best_ask(self) -> Level | None:
        top = self.asks.top(1)
        return top[0] if top else None

    def mid(self) -> float | None:
        """The mid price as a float — for display and plots only, never to key a level."""
        bid, ask = self.best_bid(), self.best_ask()
        if bid is None or ask is None:
            return None
        return float((bid.price + ask.price) / 2 / 10**self.price_scale)

    def imbalance(self, depth: int) -> float:
        """Order-book imbalance over the top ``depth`` levels: (bid size - ask size) / (sum), in [-1, 1]."""
        bid = sum(level.size for level in self.bids.top(depth))
        ask = sum(level.size for level in self.asks.top(depth))
        return 0.0 if bid + ask == 0 else (bid - ask) / (bid + ask)

    def checksum_text(self, levels: int = CHECKSUM_LEVELS) -> str:
        """Bitget's checksum string: ``bid1p:bid1s:ask1p:ask1s:bid2p:...``, a missing side skipped."""
        bids, asks = self.bids.top_texts(levels), self.asks.top_texts(levels)
        common = min(len(bids), len(asks))
        parts = [text for pair in zip(bids[:common], asks[:common], strict=True) for text in pair]
        parts += bids[common:] + asks[common:]  # the longer side's rest, once the other has run out
        return ":".join(parts)

    def checksum(self, levels: int = CHECKSUM_LEVELS) -> int:
        """CRC32 of :meth:`checksum_text` as a signed 32-bit integer, as Bitget sends it."""
        crc = zlib.crc32(self.checksum_text(levels).encode("ascii"))
        return crc - 2**32 if crc >= 2**31 else crc
