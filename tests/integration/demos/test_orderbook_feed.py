"""The feed adapter against the local replay server over real WebSockets: a bad checksum resyncs,
a dropped connection reconnects, and the downstream book rebuilt from the events equals the server's."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from simbridge.demos.orderbook.book import L2Book
from simbridge.demos.orderbook.errors import EventSinkFailed
from simbridge.demos.orderbook.feed import BookEvent, FeedAdapter, FeedOptions
from simbridge.demos.orderbook.replay import ReplayServer, Scenario, record_session
from simbridge.demos.orderbook.states import FeedState

pytestmark = pytest.mark.integration


def _run_until(adapter: FeedAdapter, server: ReplayServer, *, updates: int, timeout: float) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(adapter.run(stop))
        deadline = time.monotonic() + timeout
        # Named wait: every update served, and the adapter live again on the last connection.
        while not (
            server.stats.updates >= updates
            and adapter.machine.state is FeedState.LIVE
            and adapter.stats.messages >= server.stats.updates // 2
        ):
            if time.monotonic() > deadline or task.done():
                stop.set()
                await task
                raise AssertionError(f"timed out after {timeout} s waiting for {updates} updates served")
            await asyncio.sleep(0.02)
        # Every frame the server sent before it stopped has been read when the book matches its own.
        while adapter.book.checksum() != server.market.book.checksum():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the adapter's book to catch up with the server's")
            await asyncio.sleep(0.02)
        stop.set()
        await asyncio.wait_for(task, timeout)

    asyncio.run(main())


def _rebuild(events: list[BookEvent]) -> L2Book:
    book = L2Book()
    for event in events:
        if event.kind == "snapshot":
            book.apply_snapshot(event.bids, event.asks)
        else:
            book.apply_update(event.bids, event.asks)
    return book


def test_bad_checksum_resyncs_and_a_drop_reconnects_with_a_fresh_snapshot() -> None:
    events: list[BookEvent] = []
    scenario = Scenario(updates=400, bad_checksum_at=frozenset({60}), drop_at=frozenset({200}))
    with ReplayServer(scenario) as server:
        adapter = FeedAdapter(
            options=FeedOptions(url=server.url, backoff_initial_s=0.01), on_event=events.append, seed=1
        )
        _run_until(adapter, server, updates=400, timeout=20)
    states = [(s.source, s.target) for s in adapter.machine.history]
    # The mismatch: LIVE -> RESYNC -> SUBSCRIBED -> LIVE on the same connection.
    assert (FeedState.LIVE, FeedState.RESYNC) in states
    # One unsubscribe to resync, one to leave cleanly at the end.
    assert adapter.stats.checksum_failures == 1 and server.stats.unsubscribes == 2
    # The drop: LIVE -> BACKOFF -> CONNECTING, a second connection, a snapshot on it.
    assert (FeedState.LIVE, FeedState.BACKOFF) in states
    assert server.stats.connections == 2 and adapter.stats.connects == 2
    assert server.stats.snapshots == 3 and adapter.stats.snapshots == 3
    assert [e.kind for e in events].count("snapshot") == 3
    assert adapter.machine.state is FeedState.CLOSED
    assert adapter.stats.nodelay  # TCP_NODELAY really set on the feed socket
    # Downstream (what goes into the ring) rebuilds exactly the server's book, level for level.
    rebuilt = _rebuild(events)
    assert rebuilt.checksum_text() == server.market.book.checksum_text()
    assert [(lv.price, lv.size) for lv in rebuilt.bids.top(1000)] == [
        (lv.price * 10**6, lv.size * 10**4) for lv in server.market.book.bids.top(1000)
    ]


def test_a_recorded_session_replays_and_verifies(tmp_path: Path) -> None:
    recording = record_session(tmp_path / "session.jsonl", seed=3, updates=150)
    events: list[BookEvent] = []
    with ReplayServer(Scenario(recording=recording)) as server:
        adapter = FeedAdapter(options=FeedOptions(url=server.url), on_event=events.append)
        _run_until(adapter, server, updates=150, timeout=20)
    assert adapter.stats.checksum_failures == 0 and adapter.stats.updates == 150
    assert _rebuild(events).checksum() == server.market.book.checksum()


def test_a_failing_consumer_stops_the_feed_instead_of_reconnecting() -> None:
    def broken(event: BookEvent) -> None:
        raise ConnectionResetError("the ring's consumer is gone")  # an OSError, like PeerGone

    with ReplayServer(Scenario(updates=10)) as server:
        adapter = FeedAdapter(options=FeedOptions(url=server.url), on_event=broken)
        with pytest.raises(EventSinkFailed, match="consumer is gone"):
            asyncio.run(asyncio.wait_for(adapter.run(asyncio.Event()), 20))
    assert adapter.stats.connects == 1  # no reconnect loop
