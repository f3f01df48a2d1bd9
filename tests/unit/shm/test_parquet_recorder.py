"""ParquetRecorder on a real Ring in this process: fixed records as columns, variable records as
type + payload, rotation, leftovers of a killed recorder recovered, and the `simbridge shm record` errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from simbridge.shm.cli import app
from simbridge.shm.errors import InvalidArgument, RecordingError
from simbridge.shm.parquet import ParquetRecorder
from simbridge.shm.parquet_files import JOURNAL_SUFFIX, TMP_SUFFIX, recover
from simbridge.shm.ring import Ring

DT = np.dtype([("exchange_ts_ns", "<i8"), ("value", "<i8"), ("price", "<i8"), ("obi", "<f8")])
runner = CliRunner()


def _records(start: int, count: int) -> np.ndarray:
    rows = np.zeros(count, DT)
    rows["value"] = np.arange(start, start + count)
    rows["exchange_ts_ns"] = rows["value"] * 1000
    rows["price"] = 3_000_096_000_000  # 30000.96 at 10**8: an int64 column, exact
    rows["obi"] = 0.25
    return rows


def _read_all(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_fixed_records_become_columns_and_files_rotate(block_name: str, tmp_path: Path) -> None:
    with (
        Ring.create(block_name, capacity=1024, record_dtype=DT) as producer,
        Ring.open(block_name, timeout=5) as consumer,
    ):
        recorder = ParquetRecorder(consumer, tmp_path, prefix="t", rotate_bytes=16_000, flush_rows=500)
        done = threading.Thread(target=recorder.run, kwargs={"poll_s": 0.05})
        done.start()
        for start in range(0, 20_000, 500):
            producer.push_many(_records(start, 500), timeout=10)
        producer.close()  # the recorder drains what is left, sees WriterClosed and closes its file
        done.join(30)
        assert not done.is_alive()
    summary = recorder.summary
    assert summary.rows == 20_000 and summary.stopped_by.startswith("producer gone")
    assert len(summary.files) >= 2 and all(f.suffix == ".parquet" for f in summary.files)
    assert not list(tmp_path.glob(f"*{TMP_SUFFIX}")) and not list(tmp_path.glob(f"*{JOURNAL_SUFFIX}"))
    table = _read_all(tmp_path)
    assert table.column("value").to_pylist() == list(range(20_000))  # in order, none lost, none twice
    assert table.schema.field("price").type == pa.int64()
    assert table.column("exchange_ts_ns").to_pylist()[:3] == [0, 1000, 2000]
    assert table.column("receive_ts_ns").null_count == 0
    assert pq.ParquetFile(summary.files[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_files_rotate_by_age(block_name: str, tmp_path: Path) -> None:
    with (
        Ring.create(block_name, capacity=1024, record_dtype=DT) as producer,
        Ring.open(block_name, timeout=5) as consumer,
    ):
        producer.push_many(_records(0, 300))
        producer.close()
        # Any file is older than a microsecond by its next check: one file per 100-row flush.
        recorder = ParquetRecorder(consumer, tmp_path, rotate_seconds=1e-6, rotate_bytes=None, flush_rows=100)
        summary = recorder.run(poll_s=0.05)
    assert summary.rows == 300 and len(summary.files) == 3
    assert [pq.ParquetFile(f).metadata.num_rows for f in summary.files] == [100, 100, 100]


def test_variable_records_become_type_and_payload(block_name: str, tmp_path: Path) -> None:
    with Ring.create(block_name, capacity=1 << 16) as producer, Ring.open(block_name, timeout=5) as consumer:
        recorder = ParquetRecorder(consumer, tmp_path, exchange_ts_offset=0)
        for n in range(300):
            producer.push(int(n * 7).to_bytes(8, "little") + b"x" * (n % 17), type=1 + n % 3)
        producer.close()
        recorder.run(poll_s=0.05)
    table = _read_all(tmp_path)
    assert table.num_rows == 300
    assert table.column("type").to_pylist()[:4] == [1, 2, 3, 1]
    assert table.column("exchange_ts_ns").to_pylist()[:3] == [0, 7, 14]
    assert table.column("payload").to_pylist()[5] == (35).to_bytes(8, "little") + b"xxxxx"


def test_stop_event_closes_the_open_file(block_name: str, tmp_path: Path) -> None:
    stop = threading.Event()
    with (
        Ring.create(block_name, capacity=1024, record_dtype=DT) as producer,
        Ring.open(block_name, timeout=5) as consumer,
    ):
        producer.push_many(_records(0, 100))
        recorder = ParquetRecorder(consumer, tmp_path)
        stop.set()
        summary = recorder.run(stop=stop)
    # Stopped before reading anything: nothing pending, no empty file left behind.
    assert summary.stopped_by == "stop requested" and summary.rows == 0
    assert list(tmp_path.iterdir()) == []


def test_leftovers_are_recovered_on_start(tmp_path: Path) -> None:
    schema = pa.schema([("value", pa.int64())])
    table = pa.table({"value": list(range(10))}, schema=schema)
    # 1. footer written, rename missing
    pq.write_table(table, tmp_path / f"s-000001{TMP_SUFFIX}")
    # 2. footerless .tmp and a journal with two complete batches and a torn third
    (tmp_path / f"s-000002{TMP_SUFFIX}").write_bytes(b"PAR1garbage")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table)
        writer.write_table(table)
    data = sink.getvalue().to_pybytes()
    (tmp_path / f"s-000002{JOURNAL_SUFFIX}").write_bytes(data + data[len(data) // 2 : len(data) // 2 + 40])
    # 3. neither readable
    (tmp_path / f"s-000003{TMP_SUFFIX}").write_bytes(b"PAR1" + b"\0" * 100)
    done = {r.path.name: r for r in recover(tmp_path, fsync=False)}
    assert done["s-000001.parquet"].action == "renamed" and done["s-000001.parquet"].rows == 10
    assert done["s-000002.parquet"].action == "rebuilt" and done["s-000002.parquet"].rows == 20
    assert done["s-000003.parquet.broken"].action == "unrecoverable"
    assert pq.read_table(tmp_path / "s-000002.parquet").column("value").to_pylist() == list(range(10)) * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s-000001.parquet",
        "s-000002.parquet",
        "s-000003.parquet.broken",
    ]


def test_bad_options_and_folders_are_typed_errors(block_name: str, tmp_path: Path) -> None:
    with Ring.create(block_name, capacity=64, record_dtype=DT), Ring.open(block_name, timeout=5) as consumer:
        with pytest.raises(InvalidArgument, match="prefix"):
            ParquetRecorder(consumer, tmp_path, prefix="../x")
        with pytest.raises(InvalidArgument, match="rotate_bytes"):
            ParquetRecorder(consumer, tmp_path, rotate_bytes=0)
        (tmp_path / "file").write_text("not a folder")
        with pytest.raises(RecordingError, match="choose a writable folder"):
            ParquetRecorder(consumer, tmp_path / "file" / "sub")


def test_record_cli_one_line_errors(block_name: str, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["record", f"{block_name}-missing", str(tmp_path)])
    assert missing.exit_code == 1
    assert (
        missing.output.count("\n") == 1
        and "error:" in missing.output
        and "did not become available" in missing.output
    )
    (tmp_path / "file").write_text("x")
    with Ring.create(block_name, capacity=64, record_dtype=DT):
        bad_dir = runner.invoke(app, ["record", block_name, str(tmp_path / "file" / "sub")])
    assert bad_dir.exit_code == 1
    assert bad_dir.output.count("\n") == 1 and "choose a writable folder" in bad_dir.output
    bad_size = runner.invoke(app, ["record", block_name, str(tmp_path), "--rotate-size", "lots"])
    assert bad_size.exit_code == 2
