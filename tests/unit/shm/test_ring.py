"""Ring's Python API: record modes, overflow policies, timeouts, closing, consumers, asyncio, registry."""

from __future__ import annotations

import asyncio
import math
import os
import threading

import numpy as np
import pytest
from tests.support import wait_for
from typer.testing import CliRunner

from simbridge.shm import (
    BlockExists,
    Full,
    LayoutMismatch,
    NotConsumer,
    NotWriter,
    OutOfRange,
    PeerGone,
    RecordTooLarge,
    Ring,
    RingBusy,
    Timeout,
    WriterClosed,
    registry,
)
from simbridge.shm.cli import app
from simbridge.shm.errors import InvalidArgument, InvalidLayout

TICK = np.dtype([("ts", "<i8"), ("price", "<i8"), ("size", "<i8"), ("side", "u1")])


def test_variable_records_keep_bytes_types_and_order(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024) as producer, Ring.open(block_name, timeout=1) as consumer:
        producer.push(b"hello", type=7)
        producer.push(bytearray(b""), type=0)
        producer.push(memoryview(b"abc"))
        assert consumer.peek(timeout=1) == b"hello"
        assert consumer.pop_typed(timeout=1) == (7, b"hello")
        assert consumer.pop(timeout=1) == b""
        assert consumer.pop_many(10, timeout=1) == [b"abc"]
        assert producer.push_many([b"a", b"bb", b"ccc"], type=3) == 3
        assert consumer.pop_many(2, timeout=1, typed=True) == [(3, b"a"), (3, b"bb")]
        assert consumer.pop(timeout=0) == b"ccc"
        assert producer.counters()["pushed"] == 6 and consumer.counters()["popped"] == 6


def test_records_wrap_around_the_ring_many_times(block_name: str) -> None:
    with Ring.create(block_name, capacity=256) as producer, Ring.open(block_name, timeout=1) as consumer:
        for i in range(3000):
            payload = bytes([i % 256]) * (i % 120)
            producer.push(payload, type=i % 5)
            assert consumer.pop_typed(timeout=0) == (i % 5, payload)


def test_fixed_records_round_trip_as_numpy(block_name: str) -> None:
    with (
        Ring.create(block_name, capacity=64, record_dtype=TICK) as producer,
        Ring.open(block_name, timeout=1) as consumer,
    ):
        assert consumer.record_dtype == TICK and consumer.fixed
        ticks = np.zeros(100, TICK)
        ticks["ts"] = np.arange(100)
        ticks["price"] = 3_000_096 + np.arange(100)
        got = []
        for start in range(0, 100, 40):
            producer.push_many(ticks[start : start + 40])
            out = np.empty(50, TICK)
            n = consumer.pop_many(out, timeout=1)
            got.append(out[:n].copy())
        producer.push((1, 2, 3, 1))
        got.append(consumer.pop_many(100, timeout=1))
        np.testing.assert_array_equal(np.concatenate(got)[:100], ticks)
        with pytest.raises(Timeout):
            consumer.pop(timeout=0)


def test_fixed_pop_and_peek_return_one_record(block_name: str) -> None:
    with (
        Ring.create(block_name, capacity=4, record_dtype=TICK) as producer,
        Ring.open(block_name, timeout=1) as consumer,
    ):
        producer.push(np.array((5, 6, 7, 0), TICK))
        assert consumer.peek(timeout=1)["price"] == 6
        record = consumer.pop(timeout=1)
        assert (record["ts"], record["size"]) == (5, 7)


def test_overflow_fail_raises_full_with_the_count_that_went_in(block_name: str) -> None:
    with Ring.create(block_name, capacity=8, record_dtype=TICK, overflow="fail") as producer:
        with pytest.raises(Full) as full:
            producer.push_many(np.zeros(12, TICK))
        assert full.value.pushed == 8
        with pytest.raises(Full):
            producer.push(np.zeros((), TICK))
    with Ring.create(f"{block_name}.v", capacity=64, overflow="fail") as producer:
        with pytest.raises(Full) as full:
            producer.push_many([b"12345678"] * 10)
        assert full.value.pushed == 4  # 16 bytes per record (8 of header) in 64


def test_overflow_block_waits_for_room_then_times_out(block_name: str) -> None:
    with Ring.create(block_name, capacity=64) as producer, Ring.open(block_name, timeout=1) as consumer:
        producer.push_many([b"x" * 8] * 4)
        with pytest.raises(Timeout) as waited:
            producer.push(b"y", timeout=0.05)
        assert waited.value.timeout == 0.05
        consumer.pop(timeout=1)
        producer.push(b"y", timeout=1)
        assert producer.counters()["full_waits"] >= 1


def test_a_blocked_push_resumes_when_the_consumer_pops(block_name: str) -> None:
    with Ring.create(block_name, capacity=64) as producer, Ring.open(block_name, timeout=1) as consumer:
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(consumer.pop(timeout=10) for _ in range(50)))
        reader.start()
        for i in range(50):
            producer.push(str(i).encode() * 3, timeout=10)
        reader.join(timeout=30)
        assert got == [str(i).encode() * 3 for i in range(50)]


def test_records_larger_than_half_the_ring_are_refused(block_name: str) -> None:
    with Ring.create(block_name, capacity=128) as producer:
        assert producer.max_payload == 56
        producer.push(b"x" * 56)
        with pytest.raises(RecordTooLarge):
            producer.push(b"x" * 57)


def test_consumer_drains_then_gets_writer_closed(block_name: str) -> None:
    producer = Ring.create(block_name, capacity=1024)
    with Ring.open(block_name, timeout=1) as consumer:
        producer.push_many([b"1", b"2"])
        producer.close()
        assert not os.path.exists(f"/dev/shm/simbridge.{block_name}")  # unlinked; the mapping lives on
        assert list(consumer) == [b"1", b"2"]
        with pytest.raises(WriterClosed):
            consumer.pop(timeout=5)


def test_one_live_consumer_at_a_time_and_a_successor_resumes(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024) as producer:
        producer.push_many([b"a", b"b", b"c"])
        first = Ring.open(block_name, timeout=1)
        with pytest.raises(RingBusy):
            Ring.open(block_name, timeout=0)
        assert first.pop(timeout=1) == b"a"
        first.close()
        with Ring.open(block_name, timeout=1) as second:
            assert second.pop_many(10, timeout=1) == [b"b", b"c"]


def test_producer_gets_peer_gone_when_the_consumer_closes_while_it_waits(block_name: str) -> None:
    with Ring.create(block_name, capacity=64) as producer:
        consumer = Ring.open(block_name, timeout=1)
        producer.push_many([b"x" * 8] * 4)
        threading.Timer(0.05, consumer.close).start()
        with pytest.raises(PeerGone):
            producer.push(b"y", timeout=10)


def test_the_wrong_side_is_refused(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024) as producer, Ring.open(block_name, timeout=1) as consumer:
        with pytest.raises(NotWriter):
            consumer.push(b"x")
        with pytest.raises(NotConsumer):
            producer.pop(timeout=0)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"capacity": 100}, InvalidArgument),
        ({"capacity": 32}, InvalidArgument),
        ({"capacity": True}, InvalidArgument),
        ({"capacity": 64, "overflow": "drop"}, InvalidArgument),
        ({"capacity": 64, "mode": 0o4777}, InvalidArgument),
        ({"capacity": 3, "record_dtype": TICK}, InvalidArgument),
        ({"capacity": 4, "record_dtype": object}, InvalidLayout),
        ({"capacity": 4, "record_dtype": "not a dtype"}, InvalidLayout),
    ],
)
def test_bad_create_arguments_are_refused(
    block_name: str, kwargs: dict[str, object], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Ring.create(block_name, **kwargs)  # type: ignore[arg-type]
    assert not os.path.exists(f"/dev/shm/simbridge.{block_name}")


def test_bad_call_arguments_are_refused(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024) as producer, Ring.open(block_name, timeout=1) as consumer:
        with pytest.raises(OutOfRange):
            producer.push(b"x", type=2**32 - 1)  # reserved for padding
        with pytest.raises(OutOfRange):
            producer.push(b"x", timeout=math.nan)
        with pytest.raises(OutOfRange):
            consumer.pop(timeout=-1)
        with pytest.raises(OutOfRange):
            consumer.pop_many(0)
        with pytest.raises(LayoutMismatch):
            consumer.pop_into(np.empty(4, TICK))


def test_open_checks_the_expected_record_dtype(block_name: str) -> None:
    with Ring.create(block_name, capacity=4, record_dtype=TICK):
        with pytest.raises(LayoutMismatch):
            Ring.open(block_name, timeout=1, record_dtype=np.dtype([("ts", "<i8")]))
        with Ring.open(block_name, timeout=1, record_dtype=TICK) as consumer:
            assert consumer.record_dtype == TICK


def test_a_live_producers_name_is_refused_and_a_dead_ones_is_replaced(block_name: str) -> None:
    with Ring.create(block_name, capacity=64), pytest.raises(BlockExists):
        Ring.create(block_name, capacity=64)
    pid = os.fork()
    if pid == 0:  # a producer that dies without closing leaves a stale ring behind
        ring = Ring.create(block_name, capacity=64)
        ring._finalizer.detach()  # the Ring must outlive the detach, or its finalizer runs first
        os._exit(0)
    os.waitpid(pid, 0)
    info = registry.block_info(block_name)
    assert info is not None and info.kind == "ring" and info.stale
    with Ring.create(block_name, capacity=128) as ring:
        assert ring.capacity == 128


def test_registry_lists_rings_and_cleans_stale_ones(block_name: str) -> None:
    pid = os.fork()
    if pid == 0:
        ring = Ring.create(block_name, capacity=64)
        ring._finalizer.detach()  # the Ring must outlive the detach, or its finalizer runs first
        os._exit(0)
    os.waitpid(pid, 0)
    with Ring.create(f"{block_name}.live", capacity=64, record_dtype=TICK) as live:
        live.push(np.zeros((), TICK))
        infos = {i.name: i for i in registry.list_blocks()}
        assert infos[f"{block_name}.live"].ring is not None
        assert infos[f"{block_name}.live"].ring["queued"] == 1  # type: ignore[index]
        assert infos[f"{block_name}.live"].alive and infos[block_name].stale
        removed = registry.clean(prefix=block_name).removed
        assert [i.name for i in removed] == [block_name]
        result = CliRunner().invoke(app, ["inspect", f"{block_name}.live"])
        assert result.exit_code == 0 and "pushed" in result.output and "1 of 64 records" in result.output


def test_asyncio_consumption_does_not_block_the_loop_and_loses_nothing_on_cancel(block_name: str) -> None:
    async def main() -> None:
        with Ring.create(block_name, capacity=4096) as producer, Ring.open(block_name, timeout=1) as consumer:
            waiting = asyncio.create_task(consumer.pop_async(timeout=10))
            await asyncio.sleep(0.02)  # the loop runs while the pop waits
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            producer.push(b"kept")  # pushed after the cancel: nobody consumed it
            assert await consumer.pop_async(timeout=5) == b"kept"

            def feed() -> None:
                for i in range(300):
                    producer.push(str(i).encode(), timeout=10)
                producer.close()

            feeder = threading.Thread(target=feed)
            feeder.start()
            got = [record async for record in consumer]
            feeder.join(timeout=30)
            assert got == [str(i).encode() for i in range(300)]

    asyncio.run(main())


def test_closed_ring_handles_refuse_calls(block_name: str) -> None:
    from simbridge.shm import BlockClosed

    producer = Ring.create(block_name, capacity=64)
    producer.close()
    producer.close()  # idempotent
    with pytest.raises(BlockClosed):
        producer.push(b"x")


def test_close_from_another_thread_ends_an_endless_wait(block_name: str) -> None:
    from simbridge.shm import BlockClosed

    with Ring.create(block_name, capacity=64):
        consumer = Ring.open(block_name, timeout=1)
        outcome: list[BaseException] = []

        def wait_forever() -> None:
            try:
                consumer.pop(timeout=math.inf)
            except BaseException as exc:  # the test looks at what it was
                outcome.append(exc)

        waiter = threading.Thread(target=wait_forever)
        waiter.start()
        wait_for(lambda: consumer.header()["consumer_parked"] == 1, timeout=10, what="the pop to park")
        consumer.close()
        waiter.join(timeout=10)
        assert not waiter.is_alive() and isinstance(outcome[0], BlockClosed)
