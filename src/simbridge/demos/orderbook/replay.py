"""A local stand-in for Bitget's public WebSocket: serves a simulated (or recorded) ``books`` stream.

It answers ``subscribe`` with a snapshot of its own true book and then streams updates, each with the
CRC32 of its top 25 levels. A :class:`Scenario` can make chosen updates carry a wrong checksum and
drop the connection (no close frame) after chosen updates: the faults the feed adapter must survive.
It runs its event loop in a thread, so tests, the demo and plain scripts can all start one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from simbridge.demos.orderbook.bitget import Channel, depth_push
from simbridge.demos.orderbook.book import L2Book, Level
from simbridge.demos.orderbook.errors import FeedProtocolError
from simbridge.demos.orderbook.fixed import format_fixed

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class Scenario:
    """What the server sends. Update numbers count from 1 over the server's whole life."""

    seed: int = 0
    updates: int | None = None  # stop streaming after this many updates (None: until stopped)
    rate_hz: float = 0.0  # updates per second; 0 = as fast as the connection takes them
    depth: int = 40  # levels per side in the first snapshot
    bad_checksum_at: frozenset[int] = frozenset()
    drop_at: frozenset[int] = frozenset()
    # After a deliberately bad checksum, hold the stream up to this long for the client's resync
    # (its unsubscribe cancels the stream): otherwise a fast server reaches the next scripted event
    # (a drop) before a busy client has read the bad update, and a test sees whichever came first.
    resync_wait_s: float = 5.0
    recording: Path | None = None  # replay these pushes' levels instead of simulating


class SimulatedMarket:
    """A random walk of a two-decimal market around 30000.96 with four-decimal sizes ("0.0500")."""

    def __init__(self, *, seed: int, depth: int) -> None:
        self.book = L2Book(price_scale=2, size_scale=4)
        self._random = random.Random(seed)
        self._mid = 3_000_097  # in cents: best bid 30000.96 (the price), best ask 30000.98
        bids = [self._pair(self._mid - 1 - i) for i in range(depth)]
        asks = [self._pair(self._mid + 1 + i) for i in range(depth)]
        self._apply(bids, asks)

    def _size(self) -> str:
        return format_fixed(self._random.randrange(1, 50_000) * 10, 4, 4)  # trailing zero kept

    def _pair(self, cents: int, size: str | None = None) -> tuple[str, str]:
        return format_fixed(cents, 2, 2), self._size() if size is None else size

    def _apply(self, bids: Pairs, asks: Pairs) -> None:
        self.book.apply_update(
            [self.book.parse_level(p, s) for p, s in bids], [self.book.parse_level(p, s) for p, s in asks]
        )

    def next_update(self) -> tuple[Pairs, Pairs]:
        bids: Pairs = []
        asks: Pairs = []
        step = self._random.random()
        if step < 0.1:  # the mid moves one cent: the level it crosses goes, a new best level comes
            up = step < 0.05
            self._mid += 1 if up else -1
            if up:
                asks.append(self._pair(self._mid, "0"))
                bids.append(self._pair(self._mid - 1))
            else:
                bids.append(self._pair(self._mid, "0"))
                asks.append(self._pair(self._mid + 1))
        for _ in range(self._random.randint(1, 4)):
            side = bids if self._random.random() < 0.5 else asks
            offset = 1 + int(self._random.expovariate(0.15))
            cents = self._mid - offset if side is bids else self._mid + offset
            size = "0" if self._random.random() < 0.2 else None
            if not any(p == format_fixed(cents, 2, 2) for p, _ in side):
                side.append(self._pair(cents, size))
        self._apply(bids, asks)
        return bids, asks


class RecordedMarket:
    """Replays the levels of a JSONL file of ``books`` pushes (first a snapshot, then updates)."""

    def __init__(self, path: Path) -> None:
        self.book = L2Book(price_scale=8, size_scale=8)
        self._pushes = iter(_read_pushes(path))
        first = next(self._pushes, None)
        if first is None or first["action"] != "snapshot":
            raise FeedProtocolError(f"{path} must begin with a snapshot push")
        self._apply(*_pairs(first))

    def _apply(self, bids: Pairs, asks: Pairs) -> None:
        self.book.apply_update(
            [self.book.parse_level(p, s) for p, s in bids], [self.book.parse_level(p, s) for p, s in asks]
        )

    def next_update(self) -> tuple[Pairs, Pairs] | None:
        push = next(self._pushes, None)
        if push is None:
            return None
        bids, asks = _pairs(push)
        self._apply(bids, asks)
        return bids, asks


def _read_pushes(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


def _pairs(push: dict[str, Any]) -> tuple[Pairs, Pairs]:
    item = push["data"][0]
    return [(p, s) for p, s, *_ in item["bids"]], [(p, s) for p, s, *_ in item["asks"]]


def _text(book: L2Book, levels: list[Level]) -> Pairs:
    return [
        (
            format_fixed(level.price, book.price_scale, level.price_digits),
            format_fixed(level.size, book.size_scale, level.size_digits),
        )
        for level in levels
    ]


@dataclass
class ServerStats:
    """What the server did, for tests to check."""

    connections: int = 0
    subscribes: int = 0
    unsubscribes: int = 0
    snapshots: int = 0
    updates: int = 0
    bad_checksums: int = 0
    drops: int = 0
    last_seq: int = 0


class ReplayServer:
    """``with ReplayServer(scenario) as server: ... server.url``; binds 127.0.0.1 on a free port."""

    def __init__(
        self, scenario: Scenario | None = None, *, channel: Channel | None = None, port: int = 0
    ) -> None:
        self.scenario = scenario or Scenario()
        self.channel = channel or Channel()
        self.market: SimulatedMarket | RecordedMarket = (
            RecordedMarket(self.scenario.recording)
            if self.scenario.recording is not None
            else SimulatedMarket(seed=self.scenario.seed, depth=self.scenario.depth)
        )
        self.stats = ServerStats()
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._stopped: asyncio.Event | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> ReplayServer:
        self._thread = threading.Thread(target=self._main, name="replay-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the replay server did not start listening within {timeout} s")
        if self._failure is not None:
            raise self._failure
        return self

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or stop(); a thread must not die silently
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        async with serve(self._connection, "127.0.0.1", self._port, compression=None) as server:
            self._server = server
            port = next(iter(server.sockets)).getsockname()[1]
            self.url = f"ws://127.0.0.1:{port}"
            self._ready.set()
            await self._stopped.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the replay server did not stop within {timeout} s")

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- one client ----------------------------------------------------------------------------

    async def _connection(self, ws: ServerConnection) -> None:
        self.stats.connections += 1
        streaming: asyncio.Task[None] | None = None
        try:
            async for frame in ws:
                if frame == "ping":
                    await ws.send("pong")
                    continue
                request = json.loads(frame)
                op = request.get("op")
                # Counted when received: a client that leaves without waiting for the answer (its
                # wait is bounded) closes before the answer is sent, and it still asked.
                if op == "subscribe":
                    self.stats.subscribes += 1
                elif op == "unsubscribe":
                    self.stats.unsubscribes += 1
                await ws.send(json.dumps({"event": op, "arg": self.channel.arg()}))
                if streaming is not None:
                    streaming.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await streaming
                    streaming = None
                if op == "subscribe":
                    streaming = asyncio.create_task(self._stream(ws))
        except ConnectionClosed:
            pass
        finally:
            if streaming is not None:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await streaming

    async def _stream(self, ws: ServerConnection) -> None:
        book = self.market.book
        self.stats.last_seq += 1
        await ws.send(
            depth_push(
                self.channel,
                action="snapshot",
                bids=_text(book, book.bids.top(len(book.bids))),
                asks=_text(book, book.asks.top(len(book.asks))),
                checksum=book.checksum(),
                seq=self.stats.last_seq,
                ts_ms=time.time_ns() // 1_000_000,
            )
        )
        self.stats.snapshots += 1
        period = 1.0 / self.scenario.rate_hz if self.scenario.rate_hz > 0 else 0.0
        next_at = time.monotonic()
        while self.scenario.updates is None or self.stats.updates < self.scenario.updates:
            update = self.market.next_update()
            if update is None:
                return  # the recording is over
            number = self.stats.updates + 1
            checksum = book.checksum()
            if number in self.scenario.bad_checksum_at:
                checksum = checksum + 1 if checksum < 2**31 - 1 else checksum - 1
                self.stats.bad_checksums += 1
            self.stats.last_seq += 1
            self.stats.updates = number
            await ws.send(
                depth_push(
                    self.channel,
                    action="update",
                    bids=update[0],
                    asks=update[1],
                    checksum=checksum,
                    seq=self.stats.last_seq,
                    ts_ms=time.time_ns() // 1_000_000,
                )
            )
            if number in self.scenario.bad_checksum_at and self.scenario.resync_wait_s > 0:
                await asyncio.sleep(self.scenario.resync_wait_s)
            if number in self.scenario.drop_at:
                self.stats.drops += 1
                if ws.transport is not None:
                    ws.transport.abort()  # a dropped connection: no close frame, as a network cut
                return
            if period:
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            else:
                await asyncio.sleep(0)  # let the reader side see unsubscribe between updates


def record_session(path: Path, *, seed: int = 0, updates: int = 1000, depth: int = 40) -> Path:
    """Write a JSONL recording of a simulated session (snapshot, then ``updates`` updates)."""
    market = SimulatedMarket(seed=seed, depth=depth)
    channel = Channel()
    book = market.book
    with open(path, "w", encoding="utf-8") as out:
        now = time.time_ns() // 1_000_000
        out.write(
            depth_push(
                channel,
                action="snapshot",
                bids=_text(book, book.bids.top(len(book.bids))),
                asks=_text(book, book.asks.top(len(book.asks))),
                checksum=book.checksum(),
                seq=1,
                ts_ms=now,
            )
            + "\n"
        )
        for n in range(updates):
            bids, asks = market.next_update()
            push = depth_push(
                channel, action="update", bids=bids, asks=asks, checksum=book.checksum(), seq=n + 2, ts_ms=now
            )
            out.write(push + "\n")
    return path
