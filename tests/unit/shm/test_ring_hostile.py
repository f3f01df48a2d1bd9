"""A ring whose shared bytes are torn, stale or hostile gives typed errors: never a crash, never a hang.

Each test writes into the segment's file in /dev/shm, as a buggy or hostile peer could.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from typer.testing import CliRunner

from simbridge.shm import BlockNotFound, Corrupted, LayoutMismatch, PeerGone, Ring, _core, registry
from simbridge.shm.cli import app

OFF = _core.RING_FIELD_OFFSETS
DATA = _core.RING_HEADER_BYTES


@contextmanager
def segment(name: str) -> Iterator[int]:
    fd = os.open(f"/dev/shm/simbridge.{name}", os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def poke(name: str, offset: int, fmt: str, value: int) -> None:
    with segment(name) as fd:
        os.pwrite(fd, struct.pack(fmt, value), offset)


# (field, struct format, hostile values): every write-once field, with values a check must refuse.
IDENTITY_CASES = [
    ("magic", "<Q", [1, 0x314B4C4253424D53]),  # garbage, and a Block's magic
    ("abi_version", "<I", [0, 2, 2**32 - 1]),
    ("header_bytes", "<I", [0, 384, 2**32 - 1]),
    ("capacity", "<Q", [0, 1000, 2**40 * 2, 2**63, 2**64 - 1, 2048]),
    ("mode", "<I", [0, 3, 2**32 - 1]),
    ("record_size", "<I", [1, 2**32 - 1]),
    ("data_offset", "<Q", [0, 64, 2**64 - 1]),
    ("data_bytes", "<Q", [0, 2**64 - 1, 2048]),
    ("total_bytes", "<Q", [0, 2**64 - 1, 10**9]),
    ("max_payload", "<I", [0, 1000, 2**32 - 1]),
    ("producer_pid", "<I", [0]),
    ("descr_bytes", "<I", [1025, 2**32 - 1]),
    ("flags", "<I", [2, 2**32 - 1]),
]


@pytest.mark.parametrize(("field", "fmt", "values"), IDENTITY_CASES, ids=[c[0] for c in IDENTITY_CASES])
def test_every_identity_field_is_checked_at_open(
    block_name: str, field: str, fmt: str, values: list[int]
) -> None:
    with Ring.create(block_name, capacity=1024):
        with segment(block_name) as fd:
            original = os.pread(fd, struct.calcsize(fmt), OFF[field])
        for value in values:
            poke(block_name, OFF[field], fmt, value)
            with pytest.raises(LayoutMismatch):
                Ring.open(block_name, timeout=0).close()
            info = registry.block_info(block_name)
            assert info is not None and info.state == "invalid"
        with segment(block_name) as fd:
            os.pwrite(fd, original, OFF[field])
        Ring.open(block_name, timeout=0).close()  # restored: accepted again


def test_a_ring_whose_magic_is_not_written_yet_is_waited_for_then_not_found(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024):
        poke(block_name, OFF["magic"], "<Q", 0)
        with pytest.raises(BlockNotFound, match="initialised"):
            Ring.open(block_name, timeout=0.05)


def test_a_garbage_producer_pid_reads_as_a_dead_producer(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024):
        poke(block_name, OFF["producer_pid"], "<I", 2**32 - 1)
        with Ring.open(block_name, timeout=0) as consumer, pytest.raises(PeerGone):
            consumer.pop(timeout=5)


@pytest.mark.parametrize(
    "descr",
    [b"__import__('os').system('false')", b"[" * 500 + b"]" * 500, b"[('a', '<i8')]", b"\xff\xfe", b"'<i4'"],
    ids=["code", "nested", "wrong-size", "not-ascii", "smaller"],
)
def test_a_hostile_record_description_is_refused_not_evaluated(block_name: str, descr: bytes) -> None:
    with Ring.create(block_name, capacity=4, record_dtype=np.dtype([("a", "<i8"), ("b", "<i8")])):
        with segment(block_name) as fd:
            os.pwrite(fd, descr.ljust(1024, b"\0")[:1024], 512)
        poke(block_name, OFF["descr_bytes"], "<I", len(descr))
        with pytest.raises(LayoutMismatch):
            Ring.open(block_name, timeout=0)


@pytest.mark.parametrize(
    "tail_offset", [1024 + 8, 2**63, 2**64 - 8], ids=["past-capacity", "far-ahead", "backwards"]
)
def test_a_tail_outside_the_ring_is_corrupt(block_name: str, tail_offset: int) -> None:
    with Ring.create(block_name, capacity=1024) as producer, Ring.open(block_name, timeout=0) as consumer:
        producer.push(b"ok")
        assert consumer.pop(timeout=0) == b"ok"
        with segment(block_name) as fd:
            head = struct.unpack("<Q", os.pread(fd, 8, OFF["head"]))[0]
        poke(block_name, OFF["tail"], "<Q", (head + tail_offset) % 2**64)
        with pytest.raises(Corrupted):
            consumer.pop(timeout=0)


@pytest.mark.parametrize(
    ("length", "type_"),
    [(2**32 - 1, 0), (505, 0), (400, 0), (16, 0xFFFFFFFF), (0, 0xFFFFFFFF)],
    ids=["huge", "over-max", "past-tail", "short-pad", "empty-pad"],
)
def test_a_record_header_no_producer_writes_is_corrupt(block_name: str, length: int, type_: int) -> None:
    with Ring.create(block_name, capacity=1024) as producer, Ring.open(block_name, timeout=0) as consumer:
        producer.push(b"x" * 40)
        with segment(block_name) as fd:
            os.pwrite(fd, struct.pack("<II", length, type_), DATA)
        with pytest.raises(Corrupted):
            consumer.pop(timeout=0)


def test_a_head_past_the_tail_is_corrupt_for_the_producer(block_name: str) -> None:
    with Ring.create(block_name, capacity=64) as producer, Ring.open(block_name, timeout=0):
        producer.push_many([b"x" * 8] * 4)  # full: the next push must look at the head
        poke(block_name, OFF["head"], "<Q", 2**63)
        with pytest.raises(Corrupted):
            producer.push(b"y", timeout=1)


def test_an_identity_overwritten_after_open_is_reported_by_a_waiting_consumer(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024), Ring.open(block_name, timeout=0) as consumer:
        poke(block_name, OFF["capacity"], "<Q", 2**20)
        with pytest.raises(Corrupted, match="header"):
            consumer.pop(timeout=5)


def test_a_garbage_consumer_word_reads_as_a_gone_consumer(block_name: str) -> None:
    with Ring.create(block_name, capacity=64) as producer:
        producer.push_many([b"x" * 8] * 4)
        poke(block_name, OFF["consumer"], "<Q", (2**32 - 1) << 32 | 12345)
        with pytest.raises(PeerGone):
            producer.push(b"y", timeout=5)


def test_inspect_of_a_damaged_ring_is_one_line(block_name: str) -> None:
    with Ring.create(block_name, capacity=1024):
        poke(block_name, OFF["capacity"], "<Q", 1000)
        result = CliRunner().invoke(app, ["inspect", block_name])
        assert result.exit_code == 1
        assert "error:" in result.output and "Traceback" not in result.output
