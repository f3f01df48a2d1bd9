"""Block behaviour on real /dev/shm segments, within one process (several handles) or a few threads."""

from __future__ import annotations

import math
import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from simbridge.shm import (
    Block,
    BlockExists,
    BlockNotFound,
    Corrupted,
    InvalidName,
    LayoutMismatch,
    NonFinite,
    PeerGone,
    Timeout,
    WriterClosed,
    _core,
    block_info,
)


def shm_path(name: str) -> Path:
    return Path("/dev/shm") / f"simbridge.{name}"


def test_publish_then_read_round_trips_data_and_metadata(block_name: str) -> None:
    data = np.arange(24, dtype=np.float32).reshape(4, 6)
    with (
        Block.create(block_name, (4, 6), np.float32) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        assert writer.publish(data) == 1
        snap = reader.read(timeout=1)
        np.testing.assert_array_equal(snap.array, data)
        assert snap.iteration == 1
        assert snap.commit == 1
        assert snap.writer_pid == os.getpid()
        assert abs(snap.published_at - time.time()) < 60
        assert snap.checksum == _core.crc32c(data.tobytes())
        assert snap.array.flags.writeable and snap.valid()


def test_read_waits_for_an_iteration_after_the_given_one(block_name: str) -> None:
    with (
        Block.create(block_name, 3, np.int64) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.array([1, 1, 1]), iteration=10)
        assert reader.read(after=None, timeout=1).iteration == 10
        with pytest.raises(Timeout) as info:
            reader.read(after=10, timeout=0.05)
        assert "an iteration after 10" in str(info.value) and info.value.timeout == 0.05
        assert info.value.waited_for == "an iteration after 10"
        timer = threading.Timer(0.05, writer.publish, args=(np.array([2, 2, 2]),), kwargs={"iteration": 11})
        timer.start()
        snap = reader.read(after=10, timeout=5)
        timer.join()
        assert snap.iteration == 11 and snap.array.tolist() == [2, 2, 2]


def test_iterations_must_increase(block_name: str) -> None:
    with Block.create(block_name, 2, np.float64) as writer:
        writer.publish(np.zeros(2), iteration=5)
        with pytest.raises(ValueError, match="not after the last one"):
            writer.publish(np.zeros(2), iteration=5)
        assert writer.publish(np.zeros(2)) == 6


def test_read_into_out_reuses_the_callers_array(block_name: str) -> None:
    out = np.empty((2, 3), np.float64)
    with (
        Block.create(block_name, (2, 3), np.float64) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.full((2, 3), 4.5))
        snap = reader.read(out=out, timeout=1)
        assert snap.array is out and (out == 4.5).all()
        with pytest.raises(LayoutMismatch):
            reader.read(out=np.empty((3, 2)), timeout=1)
        with pytest.raises(LayoutMismatch):
            reader.read(out=np.empty((2, 3), np.float32), timeout=1)


def test_zero_copy_view_is_read_only_and_reports_when_overwritten(block_name: str) -> None:
    with (
        Block.create(block_name, 4, np.float32, slots=2) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.full(4, 1.0, np.float32))
        snap = reader.read(copy=False, timeout=1)
        assert not snap.array.flags.writeable
        assert snap.array.tolist() == [1.0] * 4 and snap.valid()
        writer.publish(np.full(4, 2.0, np.float32))  # the other slot: the view is untouched
        assert snap.valid() and snap.array.tolist() == [1.0] * 4
        writer.publish(np.full(4, 3.0, np.float32))  # back to the view's slot
        assert not snap.valid()


def test_views_outlive_close_without_crashing(block_name: str) -> None:
    writer = Block.create(block_name, 1000, np.float64)
    reader = Block.open(block_name, timeout=1)
    writer.publish(np.arange(1000, dtype=np.float64))
    view = reader.read(copy=False, timeout=1).array
    reader.close()
    writer.close()
    assert view.sum() == sum(range(1000))  # the mapping lives as long as the view


def test_loan_commits_on_success_and_aborts_on_error(block_name: str) -> None:
    with (
        Block.create(block_name, 5, np.int32) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        with writer.loan() as view:
            view[:] = 7
        snap = reader.read(timeout=1)
        assert snap.array.tolist() == [7] * 5 and snap.iteration == 1
        with pytest.raises(RuntimeError), writer.loan() as view:
            view[:] = 99
            raise RuntimeError("model failed half-way")
        with pytest.raises(Timeout):
            reader.read(after=1, timeout=0.05)
        assert reader.read(timeout=1).array.tolist() == [7] * 5


def test_publish_rejects_wrong_shape_and_dtype(block_name: str) -> None:
    with Block.create(block_name, (2, 2), np.float32) as writer:
        with pytest.raises(LayoutMismatch, match=r"holds \(2, 2\) float32"):
            writer.publish(np.zeros((2, 3), np.float32))
        with pytest.raises(LayoutMismatch):
            writer.publish(np.zeros((2, 2), np.float64))


def test_non_contiguous_arrays_are_published_correctly(block_name: str) -> None:
    base = np.arange(16, dtype=np.float64).reshape(4, 4)
    with (
        Block.create(block_name, (4, 2), np.float64) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(base[:, ::2])
        np.testing.assert_array_equal(reader.read(timeout=1).array, base[:, ::2])


@pytest.mark.parametrize(
    "dtype", [np.dtype(">f8"), np.dtype(object), np.dtype("U3"), np.dtype([("a", "i4")])]
)
def test_unsupported_dtypes_are_refused(block_name: str, dtype: np.dtype) -> None:
    with pytest.raises(LayoutMismatch):
        Block.create(block_name, 3, dtype)
    assert not shm_path(block_name).exists()


def test_open_checks_expected_layout(block_name: str) -> None:
    with Block.create(block_name, (16, 216), np.float32):
        with Block.open(block_name, timeout=1, shape=(16, 216), dtype=np.float32) as ok:
            assert ok.shape == (16, 216)
        with pytest.raises(LayoutMismatch, match="other sizes"):
            Block.open(block_name, timeout=1, shape=(16, 100))
        with pytest.raises(LayoutMismatch):
            Block.open(block_name, timeout=1, dtype=np.float64)


def test_non_finite_values_are_reported_with_count_and_first_index(block_name: str) -> None:
    data = np.zeros((3, 4), np.float32)
    data[1, 2] = np.nan
    data[2, 0] = np.inf
    with (
        Block.create(block_name, (3, 4), np.float32) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        with pytest.raises(NonFinite) as info:
            writer.publish(data, check_finite=True)
        assert info.value.count == 2 and info.value.first_index == (1, 2)
        writer.publish(data)
        with pytest.raises(NonFinite, match="2 NaN/Inf"):
            reader.read(timeout=1, check_finite=True)
        assert np.isnan(reader.read(timeout=1).array[1, 2])


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", "x\0y", ".hidden", "has space", "quote'", "é", "a" * 201, "$(id)"]
)
def test_bad_names_get_value_errors(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        Block.create(name, 1, np.float32)
    assert isinstance(info.value, ValueError)
    with pytest.raises(ValueError):
        Block.open(name, timeout=0)


def test_longest_valid_name_works() -> None:
    name = "t" + f"{os.getpid()}".rjust(199, "n")
    assert len(name) == 200
    with Block.create(name, 1, np.uint8) as writer:
        assert writer.publish(np.array([3], np.uint8)) == 1
    assert not shm_path(name).exists()


def test_segments_are_private_by_default_and_mode_is_honoured(block_name: str) -> None:
    with Block.create(block_name, 1, np.float32):
        assert stat.S_IMODE(shm_path(block_name).stat().st_mode) == 0o600
    with Block.create(block_name, 1, np.float32, mode=0o640):
        assert stat.S_IMODE(shm_path(block_name).stat().st_mode) == 0o640


def test_owner_unlinks_at_close_and_reader_never_does(block_name: str) -> None:
    writer = Block.create(block_name, 1, np.float32)
    reader = Block.open(block_name, timeout=1)
    reader.close()
    assert shm_path(block_name).exists()
    writer.close()
    assert not shm_path(block_name).exists()
    writer.close()  # idempotent


def test_owner_unlinks_when_garbage_collected(block_name: str) -> None:
    writer = Block.create(block_name, 1, np.float32)
    del writer
    assert not shm_path(block_name).exists()


def test_open_times_out_with_a_clear_message(block_name: str) -> None:
    start = time.monotonic()
    with pytest.raises(BlockNotFound, match=r"did not become available within 0\.1 s"):
        Block.open(block_name, timeout=0.1)
    assert time.monotonic() - start < 5


def test_open_waits_for_the_block_to_appear(block_name: str) -> None:
    created: list[Block] = []
    timer = threading.Timer(0.1, lambda: created.append(Block.create(block_name, 2, np.int16)))
    timer.start()
    with Block.open(block_name, timeout=10) as reader:
        assert reader.shape == (2,)
    timer.join()
    created[0].close()


def test_reader_waiting_on_a_closed_block_gets_writer_closed(block_name: str) -> None:
    writer = Block.create(block_name, 1, np.float32)
    reader = Block.open(block_name, timeout=1)
    threading.Timer(0.1, writer.close).start()
    with pytest.raises(WriterClosed) as info:
        reader.read(timeout=10)
    assert isinstance(info.value, PeerGone) and info.value.pid == os.getpid()
    reader.close()


def test_creating_a_live_block_twice_is_refused(block_name: str) -> None:
    with Block.create(block_name, 1, np.float32), pytest.raises(BlockExists, match="alive"):
        Block.create(block_name, 1, np.float32)


def test_a_checksum_mismatch_is_reported_as_corrupted(block_name: str) -> None:
    with (
        Block.create(block_name, 64, np.float64) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.ones(64))
        header = writer.header()
        # Flip one payload byte behind the protocol's back, as a stray write or bad RAM would.
        with open(shm_path(block_name), "r+b") as raw:
            raw.seek(header["payload_offset"] + 100)
            byte = raw.read(1)
            raw.seek(header["payload_offset"] + 100)
            raw.write(bytes([byte[0] ^ 0x40]))
        with pytest.raises(Corrupted, match="checksum"):
            reader.read(timeout=1)


def test_checksums_can_be_turned_off(block_name: str) -> None:
    with (
        Block.create(block_name, 8, np.uint8, checksum=False) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.arange(8, dtype=np.uint8))
        snap = reader.read(timeout=1)
        assert snap.array.tolist() == list(range(8)) and not reader.checksum


def test_zero_sized_and_one_slot_blocks(block_name: str) -> None:
    with (
        Block.create(block_name, (0, 5), np.float32) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.zeros((0, 5), np.float32))
        assert reader.read(timeout=1).array.shape == (0, 5)
    with (
        Block.create(block_name, 3, np.float32, slots=1) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        for i in range(1, 4):
            writer.publish(np.full(3, i, np.float32))
            assert reader.read(after=i - 1, timeout=1).array.tolist() == [i] * 3


def test_bad_slot_counts_and_shapes(block_name: str) -> None:
    with pytest.raises(ValueError, match="slots"):
        Block.create(block_name, 1, np.float32, slots=0)
    with pytest.raises(ValueError, match="slots"):
        Block.create(block_name, 1, np.float32, slots=65)
    with pytest.raises(LayoutMismatch):
        Block.create(block_name, (1,) * 9, np.float32)
    with pytest.raises(LayoutMismatch):
        Block.create(block_name, (-1, 2), np.float32)
    with pytest.raises(LayoutMismatch):
        Block.create(block_name, (2**40, 2**30), np.float32)
    assert block_info(block_name) is None


def test_many_readers_each_see_every_iteration_in_order(block_name: str) -> None:
    results: dict[int, list[int]] = {}

    def reader_thread(index: int) -> None:
        seen = []
        with Block.open(block_name, timeout=5) as reader:
            last = 0
            while last < 50:
                snap = reader.read(after=last, timeout=10)
                assert (snap.array == snap.iteration).all()
                seen.append(snap.iteration)
                last = snap.iteration
        results[index] = seen

    with Block.create(block_name, 1000, np.int64) as writer:
        threads = [threading.Thread(target=reader_thread, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for it in range(1, 51):
            writer.publish(np.full(1000, it, np.int64))
            time.sleep(0.001)
        for t in threads:
            t.join(timeout=30)
    assert sorted(results) == [0, 1, 2]
    for seen in results.values():
        assert seen == sorted(seen) and seen[-1] == 50  # monotonic; a slow reader may skip, never go back


def test_infinite_timeout_is_accepted(block_name: str) -> None:
    with (
        Block.create(block_name, 1, np.float32) as writer,
        Block.open(block_name, timeout=1) as reader,
    ):
        writer.publish(np.ones(1, np.float32))
        assert reader.read(timeout=math.inf).iteration == 1


BIG = 400_000  # float32 elements: 1.6 MB, above the cut-through threshold (256 KiB)


def _read_in_thread(name: str, after: int, results: list[object], copy: bool = True) -> threading.Thread:
    def run() -> None:
        with Block.open(name, timeout=5) as reader:
            snap = reader.read(after=after, timeout=20, copy=copy)
            results.append((snap.iteration, snap.array.copy(), snap.valid()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "view"])
def test_cut_through_delivers_a_big_publish_to_a_waiting_reader(block_name: str, copy: bool) -> None:
    data = np.random.default_rng(3).random(BIG, dtype=np.float32)
    with Block.create(block_name, BIG, np.float32) as writer:
        writer.publish(np.zeros(BIG, np.float32))
        results: list[object] = []
        thread = _read_in_thread(block_name, 1, results, copy)
        time.sleep(0.05)  # the reader is parked, waiting for iteration 2
        writer.publish(data)
        thread.join(timeout=30)
    ((iteration, array, valid),) = results  # type: ignore[misc]
    assert iteration == 2 and valid
    np.testing.assert_array_equal(array, data)


def test_cut_through_waits_out_a_loan(block_name: str) -> None:
    with Block.create(block_name, BIG, np.float32) as writer:
        results: list[object] = []
        thread = _read_in_thread(block_name, 0, results)
        time.sleep(0.05)
        with writer.loan() as view:  # no progress counter: the reader must wait for the commit
            view[: BIG // 2] = 1
            time.sleep(0.05)
            view[BIG // 2 :] = 2
        thread.join(timeout=30)
    ((iteration, array, _),) = results  # type: ignore[misc]
    assert iteration == 1 and (array[: BIG // 2] == 1).all() and (array[BIG // 2 :] == 2).all()


@pytest.mark.parametrize("slots", [1, 2])
def test_a_reader_racing_a_fast_big_writer_never_sees_mixed_iterations(block_name: str, slots: int) -> None:
    stop = threading.Event()
    errors: list[str] = []
    reads = 0

    def reader_loop() -> None:
        nonlocal reads
        with Block.open(block_name, timeout=5) as reader:
            out = np.empty(BIG, np.int32)
            last = 0
            while not stop.is_set():
                try:
                    snap = reader.read(after=last, timeout=0.5, out=out)
                except Timeout:
                    continue
                if not (out == snap.iteration).all():
                    errors.append(f"iteration {snap.iteration} holds {np.unique(out)[:5]}")
                last = snap.iteration
                reads += 1

    with Block.create(block_name, BIG, np.int32, slots=slots) as writer:
        thread = threading.Thread(target=reader_loop)
        thread.start()
        for it in range(1, 300):
            writer.publish(np.full(BIG, it, np.int32), iteration=it)
        stop.set()
        thread.join(timeout=30)
    assert not errors, errors[:3]
    assert reads > 0
