"""The feed adapter: one WebSocket to Bitget's ``books`` channel, kept whole and verified.

It subscribes, builds the book from the snapshot, applies each update and checks the exchange's CRC32
of the top 25 levels after every one. A mismatch or a sequence gap means the local book is wrong:
it unsubscribes and subscribes again for a fresh snapshot (RESYNC). A dropped connection waits an
exponential, jittered backoff and reconnects. Every verified snapshot and update goes to ``on_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidURI, WebSocketException

from simbridge.demos.orderbook.bitget import (
    Channel,
    DepthMessage,
    EventMessage,
    parse_message,
    subscribe_message,
)
from simbridge.demos.orderbook.book import L2Book, Level
from simbridge.demos.orderbook.errors import (
    ChecksumMismatch,
    EventSinkFailed,
    FeedProtocolError,
    InvalidDecimal,
    ResyncNeeded,
)
from simbridge.demos.orderbook.states import FeedState, FeedStateMachine, Transition
from simbridge.logs import get_logger

log = get_logger("simbridge.demos.orderbook")


@dataclass(frozen=True)
class FeedOptions:
    """Where to connect and how patiently."""

    url: str
    channel: Channel = field(default_factory=Channel)
    price_scale: int = 8
    size_scale: int = 8
    backoff_initial_s: float = 0.05
    backoff_max_s: float = 5.0
    open_timeout_s: float = 5.0
    ping_every_s: float = 25.0  # Bitget drops a connection that sent no "ping" for 30 s
    silence_timeout_s: float = 60.0  # nothing at all received this long: the connection is dead


@dataclass(frozen=True)
class BookEvent:
    """A verified snapshot or update, with the exchange's time and ours."""

    kind: Literal["snapshot", "update"]
    bids: list[Level]
    asks: list[Level]
    seq: int
    exchange_ts_ms: int
    receive_ns: int


@dataclass
class FeedStats:
    """Counters the live view shows."""

    messages: int = 0
    snapshots: int = 0
    updates: int = 0
    checksum_failures: int = 0
    gaps: int = 0
    connects: int = 0
    drops: int = 0
    nodelay: bool = False


class FeedAdapter:
    """Run with ``await adapter.run(stop)``; it returns (state CLOSED) once ``stop`` is set."""

    def __init__(
        self,
        *,
        options: FeedOptions,
        on_event: Callable[[BookEvent], None],
        on_transition: Callable[[Transition], None] | None = None,
        seed: int | None = None,
    ) -> None:
        self.options = options
        self.on_event = on_event
        self.book = L2Book(price_scale=options.price_scale, size_scale=options.size_scale)
        self.machine = FeedStateMachine(on_change=self._log_transition)
        self._on_transition = on_transition
        self.stats = FeedStats()
        self._random = random.Random(seed)
        self._last_seq: int | None = None

    def _log_transition(self, step: Transition) -> None:
        log.info("feed state", source=step.source.value, target=step.target.value, reason=step.reason)
        if self._on_transition is not None:
            self._on_transition(step)

    async def run(self, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            reached_live = False
            try:
                async with connect(
                    self.options.url,
                    open_timeout=self.options.open_timeout_s,
                    compression=None,  # latency over bandwidth; Bitget sends small frames
                    ping_interval=None,  # Bitget's keep-alive is the text "ping", sent below
                    max_size=2**24,
                    close_timeout=2.0,
                ) as ws:
                    self._set_nodelay(ws)
                    self.stats.connects += 1
                    reached_live = await self._session(ws, stop)
            except EventSinkFailed:
                raise  # downstream is broken (and a ring's PeerGone is also an OSError)
            except (OSError, TimeoutError, WebSocketException, FeedProtocolError, InvalidDecimal) as exc:
                reason = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, InvalidURI | InvalidHandshake) and self.stats.connects == 0:
                    log.warning("feed cannot connect", url=self.options.url, error=reason)
            else:
                reason = "connection closed"
            if stop.is_set():
                break
            self.stats.drops += 1
            failures = 0 if reached_live else failures + 1
            self.machine.transition_to(FeedState.BACKOFF, reason)
            delay = self._backoff(failures)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                break
            self.machine.transition_to(FeedState.CONNECTING, f"retry after {delay:.3f} s")
        self.machine.transition_to(FeedState.CLOSED, "stop requested")

    def _backoff(self, failures: int) -> float:
        # Full jitter: many clients dropped at once must not come back in step.
        ceiling = min(self.options.backoff_max_s, self.options.backoff_initial_s * 2**failures)
        return float(ceiling * (0.5 + 0.5 * self._random.random()))

    def _set_nodelay(self, ws: ClientConnection) -> None:
        # Small frames must leave at once, not wait for Nagle to fill a segment.
        sock = ws.transport.get_extra_info("socket") if ws.transport is not None else None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.stats.nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def _subscribe(self, ws: ClientConnection, reason: str) -> None:
        await ws.send(subscribe_message(self.options.channel))
        self._last_seq = None
        self.machine.transition_to(FeedState.SUBSCRIBED, reason)

    async def _session(self, ws: ClientConnection, stop: asyncio.Event) -> bool:
        """Serve one connection until it drops (returns) or stop is set; True if it went live."""
        reached_live = False
        await self._subscribe(ws, "connected")
        last_sent = last_heard = time.monotonic()
        while not stop.is_set():
            try:
                frame = await asyncio.wait_for(ws.recv(), 0.1)
            except TimeoutError:
                now = time.monotonic()
                if now - last_heard > self.options.silence_timeout_s:
                    raise TimeoutError(f"nothing received for {self.options.silence_timeout_s} s") from None
                if now - last_sent > self.options.ping_every_s:
                    await ws.send("ping")
                    last_sent = now
                continue
            last_heard = time.monotonic()
            receive_ns = time.time_ns()
            self.stats.messages += 1
            try:
                self._handle(parse_message(frame, self.book), receive_ns)
            except ResyncNeeded as why:
                self.machine.transition_to(FeedState.RESYNC, str(why))
                await ws.send(subscribe_message(self.options.channel, op="unsubscribe"))
                await self._subscribe(ws, "resubscribed for a fresh snapshot")
            reached_live = reached_live or self.machine.state is FeedState.LIVE
        await self._leave(ws)
        return reached_live

    async def _leave(self, ws: ClientConnection) -> None:
        """Unsubscribe and read until the exchange confirms, then close.

        Closing while updates still pour in would stall: frames nobody reads fill the queue, the
        connection stops reading, and the server's close frame is never seen (a 10 s close timeout).
        """
        await ws.send(subscribe_message(self.options.channel, op="unsubscribe"))
        deadline = time.monotonic() + 1.0
        with contextlib.suppress(TimeoutError):
            while (left := deadline - time.monotonic()) > 0:
                frame = await asyncio.wait_for(ws.recv(), left)
                if isinstance(frame, str) and frame.startswith('{"event"') and '"unsubscribe"' in frame:
                    break
        await ws.close()

    def _handle(self, message: DepthMessage | EventMessage | None, receive_ns: int) -> None:
        if message is None:
            return
        if isinstance(message, EventMessage):
            if message.event == "error":
                raise ResyncNeeded(f"the exchange answered error {message.code}: {message.msg}")
            return
        state = self.machine.state
        if message.action == "snapshot":
            if state is not FeedState.SUBSCRIBED:
                raise ResyncNeeded(f"a snapshot arrived while {state.value}")
            self.book.apply_snapshot(message.bids, message.asks)
            if message.checksum:  # some snapshots carry 0: "not given"
                self._verify(message)
            self._last_seq = message.seq
            self.stats.snapshots += 1
            self.machine.transition_to(FeedState.LIVE, "snapshot received")
        else:
            if state is not FeedState.LIVE:
                return  # updates of the old subscription, still in flight while resubscribing
            if message.seq is not None and self._last_seq is not None and message.seq <= self._last_seq:
                self.stats.gaps += 1
                raise ResyncNeeded(f"sequence went from {self._last_seq} to {message.seq}")
            self.book.apply_update(message.bids, message.asks)
            self._verify(message)
            self._last_seq = message.seq
            self.stats.updates += 1
        event = BookEvent(
            kind=message.action,
            bids=message.bids,
            asks=message.asks,
            seq=message.seq or 0,
            exchange_ts_ms=message.exchange_ts_ms,
            receive_ns=receive_ns,
        )
        try:
            self.on_event(event)
        except Exception as exc:
            raise EventSinkFailed(f"the feed's consumer failed: {type(exc).__name__}: {exc}") from exc

    def _verify(self, message: DepthMessage) -> None:
        if message.checksum is None:
            raise ResyncNeeded("an update without a checksum")
        computed = self.book.checksum()
        if computed != message.checksum:
            self.stats.checksum_failures += 1
            raise ChecksumMismatch(
                f"checksum mismatch at seq {message.seq}: exchange {message.checksum}, book {computed}",
                expected=message.checksum,
                computed=computed,
            )


def feed_snapshot(adapter: FeedAdapter) -> dict[str, Any]:
    """The adapter's counters and state as plain values (for a stats block or a log line)."""
    return {"state": adapter.machine.state.value, **adapter.stats.__dict__}
