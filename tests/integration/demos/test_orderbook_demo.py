"""`simbridge demo orderbook --seconds 3` end to end: real processes, real rings, real WebSockets on
loopback; it ends by itself, exits 0, writes a PNG and Parquet files that read back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simbridge.demos.orderbook.wire import TOP_DTYPE

pytestmark = pytest.mark.integration


def test_demo_orderbook_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = "from simbridge.cli import app; app(prog_name='simbridge')"
    allowed = sorted(os.sched_getaffinity(0))  # every process pinned, to CPUs this test may use
    cpus = f"{allowed[0]},{allowed[-1]},{allowed[-1]}"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "demo",
            "orderbook",
            "--seconds",
            "3",
            "--output",
            str(out),
            "--rate",
            "500",
            "--cpus",
            cpus,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "recorded" in done.stdout and "orderbook.png" in done.stdout
    png = out / "orderbook.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = sorted((out / "parquet").glob("*.parquet"))
    # Files rotate every second (the demo's setting): a 3 s run closes at least two.
    assert len(files) >= 2 and not list((out / "parquet").glob("*.tmp"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    assert table.num_rows > 100
    assert set(TOP_DTYPE.names) <= set(table.column_names)
    # Both times on every row; the exchange's never after ours.
    exchange = table.column("exchange_ts_ns").to_numpy()
    receive = table.column("receive_ts_ns").to_numpy()
    assert (exchange > 0).all() and (receive >= exchange - 1_000_000).all()
    kinds = table.column("kind").to_numpy()
    # The replay server's bad checksum and dropped connection each brought a fresh snapshot.
    assert int((kinds == 1).sum()) >= 3
    bid, ask = table.column("best_bid").to_numpy(), table.column("best_ask").to_numpy()
    live = (bid > 0) & (ask > 0)
    assert (bid[live] < ask[live]).all()  # never a crossed book
    assert np.all(np.abs(table.column("obi").to_numpy()) <= 1)
