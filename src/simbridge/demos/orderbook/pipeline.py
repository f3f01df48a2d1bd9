"""Runs the whole demo: starts the processes, shows their counters, stops them in order, plots the run.

Stop order matters: the feed stops first and closes its ring; the book drains that ring, then closes
its own; the recorder drains that one and closes its Parquet file. Nothing in flight is lost.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from simbridge.demos.orderbook.errors import PipelineFailed
from simbridge.demos.orderbook.options import LiveStats, PipelineOptions
from simbridge.demos.orderbook.processes import (
    FEED_FIELDS,
    STATS_FIELDS,
    book_main,
    feed_main,
    recorder_main,
    replay_main,
)
from simbridge.demos.orderbook.replay import Scenario
from simbridge.shm import Block, registry
from simbridge.shm.errors import ShmError


@dataclass
class PipelineResult:
    """What a run produced."""

    output: Path
    parquet_files: list[Path]
    last: LiveStats
    seconds: float


def check_cpus(cpus: tuple[int | None, ...]) -> None:
    allowed = os.sched_getaffinity(0)
    for cpu in cpus:
        if cpu is not None and cpu not in allowed:
            raise PipelineFailed(f"CPU {cpu} is not one this process may run on ({sorted(allowed)})")


def run_pipeline(
    options: PipelineOptions, *, on_tick: Callable[[LiveStats], None] | None = None
) -> PipelineResult:
    """Run feed -> book -> recorder against a local replay server for ``options.seconds``."""
    check_cpus(options.cpus)
    output = options.output
    data = output / "parquet"
    data.mkdir(parents=True, exist_ok=True)
    prefix = f"ob.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    rate = options.rate_hz
    scenario = Scenario(
        seed=options.seed,
        rate_hz=rate,
        bad_checksum_at=frozenset({max(1, int(rate * options.bad_checksum_after_s))}),
        drop_at=frozenset({max(2, int(rate * options.drop_after_s))}),
    )
    # A fork server imports the demo once; every process then starts as a fork of that clean,
    # thread-free server (never of this process, whose live view runs a thread).
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["simbridge.demos.orderbook.processes"])
    errors: Any = ctx.Queue()
    urls: Any = ctx.Queue()
    stop_feed, stop_server = ctx.Event(), ctx.Event()
    procs: dict[str, BaseProcess] = {}
    names = {
        "feed": f"{prefix}.feed",
        "stats": f"{prefix}.stats",
        "raw": f"{prefix}.raw",
        "top": f"{prefix}.top",
    }
    start = time.monotonic()
    last = LiveStats()
    try:
        procs["replay"] = ctx.Process(
            target=replay_main,
            kwargs={"scenario": scenario, "urls": urls, "stop": stop_server, "errors": errors},
            name="replay",
        )
        procs["replay"].start()
        url = _get(urls, errors, procs, what="the replay server's address")
        procs["recorder"] = ctx.Process(
            target=recorder_main,
            kwargs={
                "ring": names["top"],
                "directory": data,
                "cpu": options.cpus[2],
                "errors": errors,
                "rotate_seconds": options.rotate_seconds,
                "metadata": {"price_scale": "8", "size_scale": "8"},
            },
            name="recorder",
        )
        procs["book"] = ctx.Process(
            target=book_main,
            kwargs={
                "source_ring": names["raw"],
                "out_ring": names["top"],
                "stats_block": names["stats"],
                "depth": options.depth,
                "cpu": options.cpus[1],
                "errors": errors,
                "capacity": options.ring_capacity,
            },
            name="book",
        )
        procs["feed"] = ctx.Process(
            target=feed_main,
            kwargs={
                "url": url,
                "ring": names["raw"],
                "feed_block": names["feed"],
                "cpu": options.cpus[0],
                "stop": stop_feed,
                "errors": errors,
                "capacity": options.ring_capacity,
            },
            name="feed",
        )
        for name in ("feed", "book", "recorder"):
            procs[name].start()
        with (
            _open_block(names["feed"], errors, procs) as feed_block,
            _open_block(names["stats"], errors, procs) as stats_block,
        ):
            start = time.monotonic()
            while (elapsed := time.monotonic() - start) < options.seconds:
                _check(errors, procs)
                last = _look(feed_block, stats_block, elapsed, last)
                if on_tick is not None:
                    on_tick(last)
                time.sleep(0.1)  # the view's refresh period, not a synchronisation
            stop_feed.set()
            for name in ("feed", "book", "recorder"):
                _join(procs[name], errors, timeout=30)
            last = _look(feed_block, stats_block, time.monotonic() - start, last)
        stop_server.set()
        _join(procs["replay"], errors, timeout=10)
    finally:
        stop_feed.set()
        stop_server.set()
        for proc in procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        # A process ended by a signal left its segments behind; they are stale now (owner dead).
        for name in names.values():
            with contextlib.suppress(ShmError):
                registry.remove(name)
    return PipelineResult(output, sorted(data.glob("*.parquet")), last, time.monotonic() - start)


def _get(source: Any, errors: Any, procs: dict[str, BaseProcess], *, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _check(errors, procs)
        with contextlib.suppress(queue.Empty):
            return source.get(timeout=0.1)
    raise PipelineFailed(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def _open_block(name: str, errors: Any, procs: dict[str, BaseProcess], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        _check(errors, procs)
        try:
            block = Block.open(name, timeout=0.2)
            break
        except ShmError:
            if time.monotonic() > deadline:
                raise PipelineFailed(f"timed out after {timeout} s waiting for block {name}") from None
    with block:
        yield block


def _look(feed_block: Block, stats_block: Block, elapsed: float, last: LiveStats) -> LiveStats:
    feed, book = dict(last.feed), dict(last.book)
    with contextlib.suppress(ShmError):
        values = feed_block.read(timeout=0).array
        feed = {key: int(v) for key, v in zip(FEED_FIELDS, values, strict=True)}
    with contextlib.suppress(ShmError):
        values = stats_block.read(timeout=0).array
        book = {key: float(v) for key, v in zip(STATS_FIELDS, values, strict=True)}
    return LiveStats(elapsed, feed, book)


def _check(errors: Any, procs: dict[str, BaseProcess]) -> None:
    with contextlib.suppress(queue.Empty):
        raise PipelineFailed(errors.get_nowait())
    for name, proc in procs.items():
        if proc.exitcode not in (None, 0):
            raise PipelineFailed(f"the {name} process exited with status {proc.exitcode}")


def _join(proc: BaseProcess, errors: Any, *, timeout: float) -> None:
    proc.join(timeout)
    if proc.is_alive():
        raise PipelineFailed(f"the {proc.name} process did not stop within {timeout} s")
    _check(errors, {proc.name or "?": proc})


def load_run(files: list[Path]) -> dict[str, np.ndarray[Any, Any]]:
    """The recorded columns of a run, concatenated in file order (needs pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not files:
        return {}
    table = pa.concat_tables([pq.read_table(path) for path in files])
    return {name: table.column(name).to_numpy() for name in table.column_names}
