"""The demo's processes: replay server, feed, book/OBI and recorder, each optionally pinned to a CPU.

feed --(ring, variable records)--> book/OBI --(ring, TOP_DTYPE records)--> ParquetRecorder

Each is a top-level function started from multiprocessing's fork server. The feed and the book
publish their counters into small Blocks (``PREFIX.feed``, ``PREFIX.stats``) that the live view reads.
A process that fails puts one line on the ``errors`` queue and exits non-zero.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import numpy as np

from simbridge.demos.orderbook import channels
from simbridge.demos.orderbook.book import L2Book
from simbridge.demos.orderbook.feed import BookEvent, FeedAdapter, FeedOptions
from simbridge.demos.orderbook.replay import ReplayServer, Scenario
from simbridge.demos.orderbook.states import FeedState
from simbridge.demos.orderbook.wire import SNAPSHOT, TOP_DTYPE, decode_event, encode_event
from simbridge.shm import Block
from simbridge.shm.errors import PeerGone

FEED_FIELDS = (
    "state",
    "messages",
    "snapshots",
    "updates",
    "checksum_failures",
    "gaps",
    "connects",
    "drops",
    "nodelay",
)
STATE_CODES = {state: index for index, state in enumerate(FeedState)}
STATS_FIELDS = (
    "events",
    "events_per_s",
    "best_bid",
    "best_ask",
    "obi",
    "p50_us",
    "p99_us",
    "snapshots",
    "mid",
)
_PUBLISH_EVERY_S = 0.1


def pin(cpu: int | None) -> None:
    """Run this process on ``cpu`` only (None: wherever the kernel likes)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _guarded(name: str, errors: Queue[str], body: Callable[[], None]) -> None:
    try:
        body()
    except BaseException as exc:
        errors.put(f"{name}: {type(exc).__name__}: {exc} | {traceback.format_exc(limit=-3)!r}")
        raise SystemExit(1) from exc


def replay_main(*, scenario: Scenario, urls: Queue[str], stop: Event, errors: Queue[str]) -> None:
    def body() -> None:
        parent = os.getppid()
        with ReplayServer(scenario) as server:
            urls.put(server.url)
            # Until told to stop, or until orphaned (the demo died without telling anyone).
            while not stop.wait(0.5) and os.getppid() == parent:
                pass

    _guarded("replay server", errors, body)


def feed_main(
    *, url: str, ring: str, feed_block: str, cpu: int | None, stop: Event, errors: Queue[str], capacity: int
) -> None:
    def body() -> None:
        pin(cpu)
        with (
            channels.create_variable(ring, capacity=capacity) as out,
            Block.create(feed_block, len(FEED_FIELDS), np.int64) as block,
        ):
            counters = np.zeros(len(FEED_FIELDS), np.int64)

            def forward(event: BookEvent) -> None:
                kind, payload = encode_event(event)
                channels.push(out, kind, payload)

            adapter = FeedAdapter(options=FeedOptions(url=url), on_event=forward)

            async def run() -> None:
                halt = asyncio.Event()
                task = asyncio.create_task(adapter.run(halt))
                parent = os.getppid()
                while not task.done():
                    if stop.is_set() or os.getppid() != parent:  # told to stop, or orphaned
                        halt.set()
                    counters[0] = STATE_CODES[adapter.machine.state]
                    for index, key in enumerate(FEED_FIELDS[1:], start=1):
                        counters[index] = int(getattr(adapter.stats, key))
                    block.publish(counters)
                    await asyncio.wait([task], timeout=_PUBLISH_EVERY_S)
                await task

            asyncio.run(run())

    _guarded("feed", errors, body)


def book_main(
    *,
    source_ring: str,
    out_ring: str,
    stats_block: str,
    depth: int,
    cpu: int | None,
    errors: Queue[str],
    capacity: int,
) -> None:
    def body() -> None:
        pin(cpu)
        book = L2Book()
        latencies: collections.deque[float] = collections.deque(maxlen=8192)
        stats = np.zeros(len(STATS_FIELDS), np.float64)
        rows = np.zeros(256, TOP_DTYPE)
        events = snapshots = 0
        window_start, window_events = time.monotonic(), 0
        started = window_start
        with (
            channels.open_consumer(source_ring, timeout=30) as source,
            channels.create_fixed(out_ring, TOP_DTYPE, capacity=capacity) as out,
            Block.create(stats_block, len(STATS_FIELDS), np.float64) as block,
        ):
            last_publish = 0.0
            while True:
                try:
                    batch = channels.pop_records(source, len(rows), timeout=_PUBLISH_EVERY_S)
                except PeerGone:
                    break  # the feed closed its ring (or died) and everything in it was read
                for index, (kind, payload) in enumerate(batch):
                    event = decode_event(kind, payload)
                    if event.kind == SNAPSHOT:
                        book.apply_snapshot(event.bids, event.asks)
                        snapshots += 1
                    else:
                        book.apply_update(event.bids, event.asks)
                    now = time.time_ns()
                    bid, ask = book.best_bid(), book.best_ask()
                    rows[index] = (
                        event.exchange_ts_ns,
                        event.receive_ts_ns,
                        now,
                        event.seq,
                        event.kind,
                        bid.price if bid else 0,
                        ask.price if ask else 0,
                        bid.size if bid else 0,
                        ask.size if ask else 0,
                        book.imbalance(depth),
                    )
                    latencies.append((now - event.exchange_ts_ns) / 1e3)
                if batch:
                    channels.push_fixed(out, rows[: len(batch)])
                    events += len(batch)
                    window_events += len(batch)
                clock = time.monotonic()
                if clock - last_publish >= _PUBLISH_EVERY_S:
                    rate = window_events / max(clock - window_start, 1e-9)
                    if clock - window_start >= 1.0:
                        window_start, window_events = clock, 0
                    _fill_stats(stats, book, events, rate, latencies, snapshots=snapshots, depth=depth)
                    block.publish(stats)
                    last_publish = clock
            # The last look: the mean rate over the whole run, as the live rate means nothing once stopped.
            mean_rate = events / max(time.monotonic() - started, 1e-9)
            _fill_stats(stats, book, events, mean_rate, latencies, snapshots=snapshots, depth=depth)
            block.publish(stats)

    _guarded("book", errors, body)


def _fill_stats(
    stats: Any, book: L2Book, events: int, rate: float, latencies: Any, *, snapshots: int, depth: int
) -> None:
    bid, ask = book.best_bid(), book.best_ask()
    p50, p99 = np.percentile(np.fromiter(latencies, float), [50, 99]) if latencies else (0.0, 0.0)
    scale = 10**book.price_scale
    stats[:] = (
        events,
        rate,
        bid.price / scale if bid else np.nan,
        ask.price / scale if ask else np.nan,
        book.imbalance(depth),
        p50,
        p99,
        snapshots,
        book.mid() or np.nan,
    )


def recorder_main(
    *,
    ring: str,
    directory: Path,
    cpu: int | None,
    errors: Queue[str],
    rotate_seconds: float,
    metadata: dict[str, str],
) -> None:
    def body() -> None:
        from simbridge.shm.parquet import ParquetRecorder

        pin(cpu)
        with channels.open_consumer(ring, timeout=30) as source:
            recorder = ParquetRecorder(
                source,
                directory,
                prefix="book",
                rotate_seconds=rotate_seconds,
                flush_interval_s=0.25,
                metadata=metadata,
            )
            recorder.run(stop=threading.Event())

    _guarded("recorder", errors, body)
