"""Every error a Block caller can get is a SimbridgeError (with the nearest builtin as second base),
and out-of-range arguments are refused with the rule in the message instead of wrapping or hanging."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from simbridge.errors import SimbridgeError
from simbridge.shm import (
    Block,
    BlockClosed,
    BlockExists,
    BlockNotFound,
    InvalidName,
    IterationOrder,
    LayoutMismatch,
    NotWriter,
    OutOfRange,
    _core,
)
from simbridge.shm.layout import dtype_code


def raises(kind: type[BaseException], call: Callable[[], Any], match: str | None = None) -> BaseException:
    with pytest.raises(kind, match=match) as info:
        call()
    assert isinstance(info.value, SimbridgeError), f"{type(info.value).__name__} is outside the tree"
    return info.value


@pytest.mark.parametrize("iteration", [2**64, 2**64 - 1, 2**70, -1, -(2**63), 3.5, "7"])
def test_out_of_range_iteration_ids_are_refused_by_publish_and_loan(block_name: str, iteration: Any) -> None:
    with Block.create(block_name, 2, np.float64) as writer, Block.open(block_name, timeout=1) as reader:
        writer.publish(np.zeros(2), iteration=4)
        raises(OutOfRange, lambda: writer.publish(np.ones(2), iteration=iteration), r"0\.\.2\*\*64-2")

        def loan() -> None:
            with writer.loan(iteration=iteration) as view:
                view[:] = 9

        raises(OutOfRange, loan, r"0\.\.2\*\*64-2")
        # Nothing was poisoned: the next default id still follows the last good one.
        assert writer.publish(np.ones(2)) == 5
        snap = reader.read(after=4, timeout=1)
        assert snap.iteration == 5 and snap.array.tolist() == [1, 1]


def test_the_largest_iteration_id_works_and_nothing_can_follow_it(block_name: str) -> None:
    top = _core.MAX_ITERATION
    with Block.create(block_name, 2, np.float64) as writer, Block.open(block_name, timeout=1) as reader:
        assert writer.publish(np.ones(2), iteration=top) == top
        assert reader.read(after=top - 1, timeout=1).iteration == top
        raises(OutOfRange, lambda: writer.publish(np.ones(2)), r"0\.\.2\*\*64-2")


@pytest.mark.parametrize("after", [2**64 - 2, 2**64 - 1, 2**64, -2, 1.5])
def test_read_after_an_impossible_iteration_is_refused(block_name: str, after: Any) -> None:
    with Block.create(block_name, 2, np.float64) as writer, Block.open(block_name, timeout=1) as reader:
        writer.publish(np.ones(2), iteration=7)
        raises(OutOfRange, lambda: reader.read(after=after, timeout=0.05), r"-1\.\.2\*\*64-3")


@pytest.mark.parametrize("timeout", [math.nan, -math.inf, -1.0, "soon"])
def test_bad_timeouts_are_refused_everywhere(block_name: str, timeout: Any) -> None:
    with Block.create(block_name, 2, np.float64) as writer, Block.open(block_name, timeout=1) as reader:
        writer.publish(np.ones(2))
        rule = r"seconds >= 0 \(math.inf waits forever\)"
        raises(OutOfRange, lambda: reader.read(timeout=timeout), rule)  # even when data is there
        raises(OutOfRange, lambda: reader.read(after=1, timeout=timeout), rule)
        raises(OutOfRange, lambda: Block.open(block_name, timeout=timeout), rule)


def test_every_misuse_raises_a_simbridge_error(block_name: str) -> None:
    with Block.create(block_name, 3, np.float32) as writer, Block.open(block_name, timeout=1) as reader:
        writer.publish(np.zeros(3, np.float32), iteration=5)
        raises(IterationOrder, lambda: writer.publish(np.zeros(3, np.float32), iteration=5), "not after")
        raises(NotWriter, lambda: reader.publish(np.zeros(3, np.float32)), "only the creator")
        raises(LayoutMismatch, lambda: reader.read(out=np.empty(4, np.float32)))
        raises(LayoutMismatch, lambda: reader.read(out=[0.0, 0.0, 0.0]))  # type: ignore[arg-type]
        raises(LayoutMismatch, lambda: Block.open(block_name, timeout=0, dtype="no such dtype"))
        raises(BlockExists, lambda: _core.create(block_name, dtype_code(np.float32), (3,), 2, 0o600, True))
        other = Block.open(block_name, timeout=1)
        other.close()
        for call in (
            lambda: other.read(timeout=0),
            lambda: other.read(timeout=0, copy=False),
            other.header,
            other.writer_alive,
            lambda: other.latest_iteration,
        ):
            raises(BlockClosed, call, "closed")
    for call in (lambda: writer.publish(np.zeros(3, np.float32)), writer.header):
        raises(BlockClosed, call, "closed")
    raises(BlockNotFound, lambda: _core.unlink(block_name))
    raises(InvalidName, lambda: _core.unlink("../etc"))
    raises(BlockNotFound, lambda: Block.open(block_name, timeout=0))


def test_refused_layouts_and_modes_are_simbridge_errors(block_name: str) -> None:
    code = dtype_code(np.float32)
    for shape in [(0, 2**63), (2**47,), (2**40, 2**40), (-1,), (2**64,), (1.5,)]:
        raises(SimbridgeError, lambda shape=shape: _core.create(block_name, code, shape, 2, 0o600, True))
    raises(OutOfRange, lambda: _core.create(block_name, code, (3,), 2, 0o1777, True), "mode 0..0o777")
    assert not Path(f"/dev/shm/simbridge.{block_name}").exists()


def test_a_segment_claiming_a_huge_zero_sized_shape_is_refused_at_open(block_name: str) -> None:
    # A (0, 4) block rewritten to claim (0, 2**63): still 0 payload bytes, but no numpy array can
    # have that shape, so a reader would die in np.empty with a builtin ValueError.
    with Block.create(block_name, (0, 4), np.float32):
        raw = np.memmap(f"/dev/shm/simbridge.{block_name}", dtype=np.uint64, mode="r+")
        raw[_core.FIELD_OFFSETS["shape"] // 8 + 1] = 2**63
        raw.flush()
        del raw
        raises(LayoutMismatch, lambda: Block.open(block_name, timeout=0), "layout mismatch")


def test_mode_zero_means_the_documented_0600(block_name: str) -> None:
    code = dtype_code(np.float32)
    segment = _core.create(block_name, code, (3,), 2, 0, True)
    try:
        assert os.stat(f"/dev/shm/simbridge.{block_name}").st_mode & 0o777 == 0o600
    finally:
        segment.unlink()
        segment.close()
