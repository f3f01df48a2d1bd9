"""ParquetRecorder: drains a stream (a Ring) into rotating, crash-safe Parquet files.

Fixed records (a numpy structured dtype) become one column per field; variable records become a
``type`` and a binary ``payload`` column. Every row carries ``exchange_ts_ns`` (the source's time, when
the record holds it) and ``receive_ts_ns`` (the local receive time). Files rotate by size or age and
are written under a temporary name (see :mod:`simbridge.shm.parquet_files` for the crash story).
pyarrow (the ``streams`` extra) is imported on first use only.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from simbridge.logs import get_logger
from simbridge.shm.errors import InvalidArgument, PeerGone, RecordingError, Timeout
from simbridge.shm.parquet_files import (
    Recovered,
    SegmentWriter,
    next_sequence,
    pyarrow_modules,
    recover,
)

log = get_logger("simbridge.shm.parquet")

EXCHANGE_TS = "exchange_ts_ns"
RECEIVE_TS = "receive_ts_ns"
_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,100}")

VariableBatch = list[tuple[int, bytes]]


@runtime_checkable
class StreamReader(Protocol):
    """What the recorder consumes. ``fixed_dtype`` is None for variable records.

    ``read`` returns what arrived within ``timeout`` (empty when nothing did): a structured array for
    fixed records, ``[(type, payload), ...]`` for variable ones; it raises :class:`PeerGone` once the
    producer is gone (closed or dead) and nothing is left to read.
    """

    fixed_dtype: np.dtype[Any] | None

    def read(self, max_records: int, timeout: float) -> NDArray[Any] | VariableBatch: ...


@dataclass
class RecordingSummary:
    """What one run of the recorder wrote."""

    rows: int = 0
    files: list[Path] = field(default_factory=list)
    recovered: list[Recovered] = field(default_factory=list)
    stopped_by: str = ""


class ParquetRecorder:
    """Record ``source`` (a Ring, or any :class:`StreamReader`) into ``directory``.

    Leftovers of a killed recorder in ``directory`` are finished first (``recovered``). Rows are
    flushed as one row group every ``flush_rows`` rows or ``flush_interval_s`` seconds; a file is
    closed and a new one begun past ``rotate_bytes`` or ``rotate_seconds``.
    """

    def __init__(
        self,
        source: Any,
        directory: str | os.PathLike[str],
        *,
        prefix: str = "stream",
        rotate_bytes: int | None = 64 * 2**20,
        rotate_seconds: float | None = 3600.0,
        compression: str = "zstd",
        compression_level: int | None = None,
        flush_rows: int = 65_536,
        flush_interval_s: float = 0.5,
        batch_records: int = 8192,
        exchange_ts_offset: int | None = None,
        receive_ts_offset: int | None = None,
        metadata: dict[str, str] | None = None,
        fsync: bool = True,
    ) -> None:
        self._pa, self._pq = pyarrow_modules()
        if not _PREFIX.fullmatch(prefix):
            raise InvalidArgument(f"prefix {prefix!r} must be 1-100 characters of [A-Za-z0-9._-]")
        for label, value in (("rotate_bytes", rotate_bytes), ("rotate_seconds", rotate_seconds)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"{label}={value} must be positive (or None for no limit)")
        if flush_rows < 1 or batch_records < 1 or flush_interval_s <= 0:
            raise InvalidArgument("flush_rows, batch_records and flush_interval_s must be positive")
        if compression not in ("zstd", "snappy", "gzip", "lz4", "brotli", "none"):
            raise InvalidArgument(
                f"compression {compression!r} is not one of zstd, snappy, gzip, lz4, brotli, none"
            )
        self.reader: StreamReader = as_reader(source)
        self.directory = Path(directory)
        self.prefix = prefix
        self.rotate_bytes, self.rotate_seconds = rotate_bytes, rotate_seconds
        self.compression, self.compression_level = compression, compression_level
        self.flush_rows, self.flush_interval_s, self.batch_records = (
            flush_rows,
            flush_interval_s,
            batch_records,
        )
        self._offsets = (exchange_ts_offset, receive_ts_offset)
        for offset in self._offsets:
            if offset is not None and offset < 0:
                raise InvalidArgument(f"a timestamp offset ({offset}) must be >= 0")
        self._fsync = fsync
        self.schema = self._schema(metadata or {})
        self.summary = RecordingSummary()
        self._columns: list[dict[str, Any]] = []
        self._pending = 0
        self._last_flush = time.monotonic()
        self._segment: SegmentWriter | None = None
        self._opened_at = 0.0
        self._closed = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".{prefix}.probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as exc:
            raise RecordingError(
                exc.errno or 0,
                f"cannot write into the record folder {self.directory}: {exc.strerror or exc}; "
                "choose a writable folder",
            ) from exc
        self.summary.recovered = recover(self.directory, fsync=fsync)
        self._sequence = next_sequence(self.directory, prefix)

    # ---- schema and conversion -------------------------------------------------------------------

    def _schema(self, metadata: dict[str, str]) -> Any:
        pa = self._pa
        dtype = self.reader.fixed_dtype
        meta = {"simbridge.recorder": "1", **metadata}
        if dtype is None:
            fields = [
                pa.field(RECEIVE_TS, pa.int64(), nullable=False),
                pa.field(EXCHANGE_TS, pa.int64()),
                pa.field("type", pa.uint32(), nullable=False),
                pa.field("payload", pa.binary(), nullable=False),
            ]
            return pa.schema(fields, metadata={**meta, "simbridge.records": "variable"})
        if dtype.names is None:
            raise InvalidArgument(
                f"fixed records must have a structured dtype with named fields, not {dtype}"
            )
        fields = []
        for name in dtype.names:
            sub = dtype.fields[name][0]  # type: ignore[index]
            if sub.shape or sub.names is not None:
                raise InvalidArgument(
                    f"field {name!r} ({sub}) is nested or an array; record flat fields only"
                )
            if sub.kind == "S":
                fields.append(pa.field(name, pa.binary(sub.itemsize), nullable=False))
            elif sub.kind in "biuf":
                fields.append(pa.field(name, pa.from_numpy_dtype(sub.newbyteorder("=")), nullable=False))
            else:
                raise InvalidArgument(f"field {name!r} has dtype {sub}; record numbers or bytes only")
        if RECEIVE_TS not in dtype.names:
            fields.append(pa.field(RECEIVE_TS, pa.int64(), nullable=False))
        if EXCHANGE_TS not in dtype.names:
            fields.append(pa.field(EXCHANGE_TS, pa.int64()))
        return pa.schema(
            fields, metadata={**meta, "simbridge.records": "fixed", "simbridge.dtype": str(dtype.descr)}
        )

    def _columns_of(self, batch: NDArray[Any] | VariableBatch, now_ns: int) -> dict[str, Any]:
        pa = self._pa
        count = len(batch)
        if isinstance(batch, np.ndarray):
            names = batch.dtype.names or ()
            columns: dict[str, Any] = {name: batch[name].copy() for name in names}
            if RECEIVE_TS not in names:
                columns[RECEIVE_TS] = np.full(count, now_ns, dtype=np.int64)
            if EXCHANGE_TS not in names:
                columns[EXCHANGE_TS] = pa.nulls(count, pa.int64())
            return columns
        exchange_at, receive_at = self._offsets
        return {
            RECEIVE_TS: [_int64_at(payload, receive_at, now_ns) for _, payload in batch],
            EXCHANGE_TS: [_int64_at(payload, exchange_at, None) for _, payload in batch],
            "type": [kind for kind, _ in batch],
            "payload": [payload for _, payload in batch],
        }

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self, *, stop: threading.Event | None = None, poll_s: float = 0.1) -> RecordingSummary:
        """Record until ``stop`` is set or the producer is gone; then flush and close the open file."""
        if self._closed:
            raise RecordingError(0, "this recorder was closed; make a new one")
        try:
            while stop is None or not stop.is_set():
                try:
                    batch = self.reader.read(min(self.batch_records, self.flush_rows - self._pending), poll_s)
                except PeerGone as exc:
                    self.summary.stopped_by = f"producer gone: {exc}"
                    break
                if len(batch):
                    self._columns.append(self._columns_of(batch, time.time_ns()))
                    self._pending += len(batch)
                self.maybe_flush()
            else:
                self.summary.stopped_by = "stop requested"
        finally:
            self.close()
        return self.summary

    def maybe_flush(self) -> None:
        """Flush the pending rows if there are enough or they waited long enough; rotate if due.

        A file past ``rotate_bytes`` is closed when the next rows come (so the last rows of a stream
        never leave a file closed early); one past ``rotate_seconds`` is closed even when idle.
        """
        now = time.monotonic()
        if self._pending and (
            self._pending >= self.flush_rows or now - self._last_flush >= self.flush_interval_s
        ):
            if self._segment is not None and self._size_due():
                self._close_segment()
            self.flush()
        if (
            self._segment is not None
            and self.rotate_seconds is not None
            and time.monotonic() - self._opened_at >= self.rotate_seconds  # the file may be new since `now`
        ):
            self._close_segment()

    def flush(self) -> None:
        """Write the pending rows as one row group (and journal batch) of the open file."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        pa = self._pa
        merged = {}
        for name in self.schema.names:
            parts = [cols[name] for cols in self._columns]
            merged[name] = _concat(pa, parts, self.schema.field(name).type)
        table = pa.table(merged, schema=self.schema)
        self._columns.clear()
        self._pending = 0
        if self._segment is None:
            self._open_segment()
        assert self._segment is not None
        self._segment.write(table)
        self.summary.rows += table.num_rows

    def _size_due(self) -> bool:
        assert self._segment is not None
        return self.rotate_bytes is not None and self._segment.bytes_written() >= self.rotate_bytes

    def _open_segment(self) -> None:
        final = self.directory / f"{self.prefix}-{self._sequence:06d}.parquet"
        self._sequence += 1
        self._segment = SegmentWriter(
            final=final,
            schema=self.schema,
            compression=self.compression,
            compression_level=self.compression_level,
            fsync=self._fsync,
        )
        self._opened_at = time.monotonic()

    def _close_segment(self) -> None:
        segment, self._segment = self._segment, None
        if segment is not None:
            path = segment.close()
            self.summary.files.append(path)
            log.info("parquet file closed", path=str(path), rows=segment.rows)

    def close(self) -> None:
        """Flush what is pending and close the open file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._close_segment()

    def __enter__(self) -> ParquetRecorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _concat(pa: Any, parts: list[Any], kind: Any) -> Any:
    if all(isinstance(p, np.ndarray) for p in parts):
        return pa.array(np.concatenate(parts), type=kind)
    arrays = [p if isinstance(p, pa.Array) else pa.array(p, type=kind) for p in parts]
    return pa.concat_arrays(arrays)


def _int64_at(payload: bytes, offset: int | None, default: int | None) -> int | None:
    if offset is None or offset + 8 > len(payload):
        return default
    return int.from_bytes(payload[offset : offset + 8], "little", signed=True)


def as_reader(source: Any) -> StreamReader:
    """``source`` if it reads like a :class:`StreamReader`, else a reader over a Ring."""
    if isinstance(source, StreamReader):
        return source
    return RingReader(source)


class RingReader:
    """Reads a :class:`simbridge.shm.Ring` in batches: ``pop_into`` one preallocated array for fixed
    records (no allocation per batch), ``pop_many(typed=True)`` for variable ones."""

    def __init__(self, ring: Any) -> None:
        self.ring = ring
        dtype = getattr(ring, "record_dtype", None)
        self.fixed_dtype: np.dtype[Any] | None = np.dtype(dtype) if getattr(ring, "fixed", False) else None
        self._out: NDArray[Any] | None = None

    def read(self, max_records: int, timeout: float) -> NDArray[Any] | VariableBatch:
        try:
            if self.fixed_dtype is None:
                return list(self.ring.pop_many(max_records, timeout=timeout, typed=True))
            if self._out is None or len(self._out) != max_records:
                self._out = np.empty(max_records, self.fixed_dtype)
            count = self.ring.pop_into(self._out, timeout=timeout)
            return self._out[:count]
        except Timeout:
            return []


def open_ring(name: str, *, timeout: float = 0.0) -> Any:
    """Open ring ``name`` as its consumer (the recorder's side); a context manager."""
    from simbridge.shm.ring import Ring

    return Ring.open(name, timeout=timeout)
