"""kill -9 of `simbridge shm record`: every closed Parquet file reads back, the open one is recovered
from its journal, and the rows are exactly the records pushed (in order, none twice)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests.support import wait_for

from simbridge.shm.parquet_files import JOURNAL_SUFFIX, TMP_SUFFIX, recover
from simbridge.shm.ring import Ring

pytestmark = pytest.mark.integration

DT = np.dtype([("exchange_ts_ns", "<i8"), ("value", "<i8")])


def _start_recorder(ring: str, folder: Path) -> subprocess.Popen[bytes]:
    # The shm commands alone: the same command as `simbridge shm record`, without importing every plane.
    code = "from simbridge.shm.cli import app; app(prog_name='simbridge shm')"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "record",
            ring,
            str(folder),
            "--rotate-size",
            "4k",
            "--flush-seconds",
            "0.05",
            "--flush-rows",
            "400",
            "--open-timeout",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _rows_on_disk(folder: Path) -> int:
    """Rows in closed files plus the complete batches of open journals (what recovery will give)."""
    total = 0
    for path in folder.glob("*.parquet"):
        total += pq.ParquetFile(path).metadata.num_rows
    for path in folder.glob(f"*{JOURNAL_SUFFIX}"):
        try:
            with pa.OSFile(str(path)) as source:
                total += pa.ipc.open_stream(source).read_all().num_rows
        except (OSError, pa.ArrowException):
            pass  # mid-write: counted on the next look
    return total


def _values(folder: Path) -> list[int]:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).column("value").to_pylist() if files else []


def _batch(start: int, count: int) -> np.ndarray:
    rows = np.zeros(count, DT)
    rows["value"] = np.arange(start, start + count)
    rows["exchange_ts_ns"] = time.time_ns()
    return rows


def test_kill9_after_flush_loses_nothing(block_name: str, tmp_path: Path) -> None:
    total = 6000
    with Ring.create(block_name, capacity=4096, record_dtype=DT) as producer:
        proc = _start_recorder(block_name, tmp_path)
        try:
            for start in range(0, total, 200):
                producer.push_many(_batch(start, 200), timeout=20)
            wait_for(
                lambda: _rows_on_disk(tmp_path) == total, timeout=30, what=f"{total} rows flushed to disk"
            )
            closed_before = sorted(tmp_path.glob("*.parquet"))
            assert len(closed_before) >= 2 and list(tmp_path.glob(f"*{TMP_SUFFIX}"))  # some closed, one open
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    for path in closed_before:  # every closed file reads back as it was
        assert pq.read_table(path).num_rows > 0
    recovered = recover(tmp_path)
    assert [r.action for r in recovered] == ["rebuilt"]
    assert _values(tmp_path) == list(range(total))
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}")) and not list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))


def test_kill9_mid_stream_keeps_a_clean_prefix_and_a_restart_continues(
    block_name: str, tmp_path: Path
) -> None:
    with Ring.create(block_name, capacity=1024, record_dtype=DT) as producer:
        proc = _start_recorder(block_name, tmp_path)
        pushed = 0
        try:
            while _rows_on_disk(tmp_path) < 3000:
                pushed += producer.push_many(_batch(pushed, 100), timeout=20)
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # while records are still flowing
            proc.wait(10)
        # A new recorder on the same ring and folder: recovers the leftovers, then takes the consumer's
        # place and goes on from the last record the dead one popped.
        wait_for(lambda: not producer.consumer_alive(), timeout=10, what="the killed consumer seen dead")
        # Files rotate every 4 KB: the kill may land between two files, with nothing left open.
        leftovers = list(tmp_path.glob(f"*{TMP_SUFFIX}")) + list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))
        second = _start_recorder(block_name, tmp_path)
        wait_for(producer.consumer_alive, timeout=30, what="the second recorder attached to the ring")
        for _ in range(10):
            pushed += producer.push_many(_batch(pushed, 100), timeout=20)
        producer.close()
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err.decode()
        assert (b"recovered" in out) == bool(leftovers), (out, leftovers)
    values = _values(tmp_path)
    # What the killed recorder had flushed survives, in order; records it had popped but not flushed are
    # the only loss (at most one flush interval), and nothing is duplicated.
    assert values == sorted(set(values)) and values[-1] == pushed - 1
    assert 3000 <= len(values) <= pushed


def test_sigterm_stops_the_recorder_cleanly(block_name: str, tmp_path: Path) -> None:
    with Ring.create(block_name, capacity=1024, record_dtype=DT) as producer:
        proc = _start_recorder(block_name, tmp_path)
        producer.push_many(_batch(0, 500), timeout=20)
        wait_for(lambda: _rows_on_disk(tmp_path) == 500, timeout=30, what="500 rows flushed to disk")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert b"stop requested" in out
    # Closed on the way out: final names only, every row there.
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}")) and not list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))
    assert _values(tmp_path) == list(range(500))
