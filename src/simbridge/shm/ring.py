"""Ring: a single-producer single-consumer stream of records in POSIX shared memory.

Every record pushed arrives once, in order. The layout and protocol live in ``include/simbridge/shm.h``
(RING); this module adds the Python API: argument checks, record dtypes, timeouts and peer deaths
worded as typed errors, lifecycle (the producer unlinks at close), and consumption from asyncio.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, Final, Literal, overload

import numpy as np
from numpy.typing import DTypeLike, NDArray

from simbridge.config import load_settings
from simbridge.logs import get_logger
from simbridge.shm import _core
from simbridge.shm.checks import seconds
from simbridge.shm.errors import (
    BlockNotFound,
    InvalidArgument,
    LayoutMismatch,
    OutOfRange,
    ShmError,
    WriterClosed,
)
from simbridge.shm.layout import check_mode, segment_path, validate_name
from simbridge.shm.namelock import name_lock
from simbridge.shm.registry import create_ring_segment
from simbridge.shm.ringspec import (
    ErrorContext,
    check_capacity,
    dtype_descr,
    dtype_from_descr,
    record_dtype_of,
)

log = get_logger("simbridge.shm")

Overflow = Literal["block", "fail"]
# How long an asyncio consumer's helper thread waits per call: a cancelled wait frees it this soon.
ASYNC_WAIT_SLICE_S: Final = 0.1
DEFAULT_BATCH: Final = 1024


class Ring:
    """One side of an SPSC ring: :meth:`create` makes the producer, :meth:`open` the consumer."""

    def __init__(self, handle: _core.RingHandle, *, name: str, record_dtype: np.dtype[Any] | None) -> None:
        settings = load_settings().shm
        self._h = handle
        self.name = name
        self.is_producer: bool = handle.producer
        self.fixed: bool = handle.fixed
        self.capacity: int = handle.capacity
        self.max_payload: int = handle.max_payload
        self.record_dtype = record_dtype
        self.producer_pid: int = handle.producer_pid
        self._timeout = seconds(settings.read_timeout_s, "shm.read_timeout_s")
        handle.set_waits(int(settings.spin_us * 1000), max(1, int(settings.peer_check_ms * 1e6)))
        self._context = ErrorContext(
            name,
            handle.producer,
            handle.producer_pid,
            self.capacity,
            self.fixed,
            self.max_payload,
            self._timeout,
        )
        handle.set_api(self._context.error, float(self._timeout))
        if not self.fixed:
            # The per-message calls go straight to C (one call instead of a Python frame around one):
            # the same signatures and errors as the methods below, about twice the calls per second.
            setattr(self, "push", handle.push_api)  # noqa: B010
            setattr(self, "pop", handle.pop_api)  # noqa: B010
        self._executor: ThreadPoolExecutor | None = None
        self._finalizer = weakref.finalize(self, _release_producer if self.is_producer else _release, handle)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        name: str,
        *,
        capacity: int,
        record_dtype: DTypeLike | None = None,
        overflow: Overflow = "block",
        mode: int | None = None,
        replace_stale: bool = True,
    ) -> Ring:
        """Create ring ``name`` and become its one producer.

        Without ``record_dtype`` records are variable-length bytes and ``capacity`` counts bytes (a power
        of two >= 64; a record holds at most capacity/2 - 8 bytes). With it (a numpy dtype, usually
        structured) every record is one item of that dtype and ``capacity`` counts records (a power of
        two >= 2). ``overflow="block"`` makes a push wait for room; ``"fail"`` raises :class:`Full`.
        ``mode`` is the segment's permission bits (default ``shm.mode``); a stale ring of the same name
        (dead producer) is replaced when ``replace_stale``, a live one raises :class:`BlockExists`.
        """
        validate_name(name)
        settings = load_settings().shm
        dtype = None if record_dtype is None else record_dtype_of(record_dtype)
        cap = check_capacity(capacity, dtype is not None)
        if overflow not in ("block", "fail"):
            raise InvalidArgument(f"overflow is 'block' or 'fail', got {overflow!r}")
        perm = check_mode(settings.mode if mode is None else mode)
        descr = b"" if dtype is None else dtype_descr(dtype)
        spin_ns = int(settings.spin_us * 1000)

        def make() -> _core.RingHandle:
            return _core.ring_create(
                name,
                _core.RING_MODE_FIXED if dtype is not None else _core.RING_MODE_VARIABLE,
                cap,
                0 if dtype is None else dtype.itemsize,
                perm,
                overflow == "fail",
                descr,
                spin_ns,
            )

        with name_lock(name):
            handle = create_ring_segment(
                name, make, replace_stale=replace_stale, size=cap * (dtype.itemsize if dtype else 1)
            )
            try:
                ring = cls(handle, name=name, record_dtype=dtype)
            except BaseException:
                _release_producer(handle)
                raise
        log.debug("ring created", name=name, capacity=cap, fixed=dtype is not None, overflow=overflow)
        return ring

    @classmethod
    def open(cls, name: str, *, timeout: float | None = None, record_dtype: DTypeLike | None = None) -> Ring:
        """Attach as the ring's one consumer, waiting up to ``timeout`` s for it to appear.

        ``timeout=None`` uses ``shm.open_timeout_s``; ``0`` tries once. A ring already read by a live
        consumer raises :class:`RingBusy` (a dead consumer's place is taken over: it resumes after the
        last record that consumer popped). ``record_dtype`` states what a fixed-record ring must hold
        (:class:`LayoutMismatch` otherwise); a ring made by a C producer carries no dtype, so give it.
        """
        validate_name(name)
        settings = load_settings().shm
        limit = seconds(settings.open_timeout_s if timeout is None else timeout, "Ring.open timeout")
        want = None if record_dtype is None else record_dtype_of(record_dtype)
        deadline = time.monotonic() + limit
        delay = 0.0005
        while True:
            try:
                handle = _core.ring_open(name, int(settings.spin_us * 1000))
            except BlockNotFound:
                handle = None
            if handle is not None:
                try:
                    dtype = cls._agree(handle, want, name)
                except BaseException:
                    handle.close()
                    raise
                return cls(handle, name=name, record_dtype=dtype)
            left = deadline - time.monotonic()
            if left <= 0:
                what = "to be initialised by its creator" if segment_path(name).exists() else "to appear"
                raise BlockNotFound(
                    f"ring {name!r} did not become available within {limit:g} s (waited for it {what}); "
                    "is the producer running?"
                )
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.02)

    @staticmethod
    def _agree(handle: _core.RingHandle, want: np.dtype[Any] | None, name: str) -> np.dtype[Any] | None:
        if not handle.fixed:
            if want is not None:
                raise LayoutMismatch(f"ring {name!r} carries variable-length records, not {want}")
            return None
        size = handle.record_size
        found = dtype_from_descr(handle.descr, size, name)
        if want is not None and (want.itemsize != size or (found is not None and found != want)):
            raise LayoutMismatch(f"ring {name!r} holds {found or f'{size}-byte records'}, expected {want}")
        return want or found or np.dtype((np.void, size))

    # ------------------------------------------------------------------ producing

    def push(self, data: Any, *, type: int = 0, timeout: float | None = None) -> None:
        """Append one record and wake the consumer if it sleeps.

        Variable mode: ``data`` is bytes-like and ``type`` a tag 0..2**32-2 the consumer gets back
        (:meth:`pop_typed`). Fixed mode: one item of the record dtype (a numpy record, a tuple or
        ``itemsize`` bytes). A full ring waits up to ``timeout`` s (None: ``shm.read_timeout_s``) or,
        with ``overflow="fail"``, raises :class:`Full`. :class:`PeerGone` if the consumer died.
        """
        if self.fixed and data.__class__ is not bytes:
            data = self._one_record(data)
        rc = self._h.push(data, type, self._timeout if timeout is None else timeout)
        if rc:
            raise self._error(rc, "room for a record", timeout, pushed=0)

    def push_many(
        self, records: Sequence[Any] | NDArray[Any], *, type: int = 0, timeout: float | None = None
    ) -> int:
        """Append many records with one copy each and one wake-up check per batch; returns how many.

        Variable mode: a list or tuple of bytes-like records, all tagged ``type``. Fixed mode: a numpy
        array of the record dtype. Waiting and errors as :meth:`push`; :class:`Full` and
        :class:`Timeout` carry how many records of the batch went in (``exc.pushed`` for Full).
        """
        if self.fixed:
            records = self._record_array(records)
        rc, pushed = self._h.push_many(records, type, self._timeout if timeout is None else timeout)
        if rc:
            raise self._error(rc, "room for a batch", timeout, pushed=pushed)
        return int(pushed)

    def _one_record(self, data: Any) -> Any:
        array = np.asarray(data, dtype=self.record_dtype)
        if array.size != 1:
            raise LayoutMismatch(
                f"ring {self.name!r}: push takes one record, got {array.size}; use push_many"
            )
        return np.ascontiguousarray(array)

    def _record_array(self, records: Any) -> NDArray[Any]:
        if not isinstance(records, np.ndarray) or records.dtype != self.record_dtype:
            got = records.dtype if isinstance(records, np.ndarray) else type(records).__name__
            raise LayoutMismatch(f"ring {self.name!r} takes numpy arrays of {self.record_dtype}, got {got}")
        return np.ascontiguousarray(records)

    # ------------------------------------------------------------------ consuming

    def pop(self, *, timeout: float | None = None) -> Any:
        """The next record (bytes; in fixed mode a numpy record), waiting up to ``timeout`` s.

        Raises :class:`Timeout`, :class:`WriterClosed` (the producer closed the ring and every record
        was read), :class:`PeerGone` (the producer died; records it completed were all delivered
        first) or :class:`Corrupted` (indexes or a record header that no correct producer writes).
        """
        got = self._h.pop(self._timeout if timeout is None else timeout, False)
        if got.__class__ is int:
            raise self._error(got, "a record", timeout)
        return self._as_record(got) if self.fixed else got

    def pop_typed(self, *, timeout: float | None = None) -> tuple[int, bytes]:
        """The next variable record with its type tag, as ``(type, payload)``; like :meth:`pop`."""
        got = self._h.pop(self._timeout if timeout is None else timeout, True)
        if got.__class__ is int:
            raise self._error(got, "a record", timeout)
        if self.fixed:
            return 0, got
        return got  # type: ignore[no-any-return]

    def peek(self, *, timeout: float | None = None) -> Any:
        """The next record without consuming it (a copy); waits like :meth:`pop`."""
        got = self._h.peek(self._timeout if timeout is None else timeout, False)
        if got.__class__ is int:
            raise self._error(got, "a record", timeout)
        return self._as_record(got) if self.fixed else got

    @overload
    def pop_many(self, out: NDArray[Any], *, timeout: float | None = None, typed: bool = False) -> int: ...
    @overload
    def pop_many(
        self, out: int = DEFAULT_BATCH, *, timeout: float | None = None, typed: bool = False
    ) -> Any: ...

    def pop_many(self, out: Any = DEFAULT_BATCH, *, timeout: float | None = None, typed: bool = False) -> Any:
        """Wait up to ``timeout`` s for the first record, then take every published one up to a limit.

        ``out`` a preallocated numpy array of the record dtype (fixed mode): fills ``out[:n]`` and
        returns n (no allocation). ``out`` an int (the most to take): a list of bytes in variable mode
        (of ``(type, payload)`` with ``typed``), a new array of records in fixed mode.
        """
        limit = self._timeout if timeout is None else timeout
        if isinstance(out, np.ndarray):
            return self.pop_into(out, timeout=timeout)
        if out.__class__ is not int or out < 1:
            raise OutOfRange(f"pop_many takes a numpy array or a count >= 1, got {out!r}")
        if self.fixed:
            array = np.empty(out, self.record_dtype)
            n = self.pop_into(array, timeout=timeout)
            return array[:n]
        got = self._h.pop_many(out, limit, typed)
        if got.__class__ is int:
            raise self._error(got, "a record", timeout)
        return got

    def pop_into(self, out: NDArray[Any], *, timeout: float | None = None) -> int:
        """Fixed mode: copy up to ``len(out)`` records into ``out`` (C-contiguous, the record dtype)."""
        if not self.fixed:
            raise LayoutMismatch(f"ring {self.name!r} carries variable-length records; use pop_many(count)")
        if out.dtype != self.record_dtype or not out.flags.c_contiguous:
            raise LayoutMismatch(
                f"ring {self.name!r}: out must be a C-contiguous array of {self.record_dtype}, "
                f"got {out.dtype}"
            )
        n = self._h.pop_into(out, self._timeout if timeout is None else timeout)
        if n < 0:
            raise self._error(n, "a record", timeout)
        return int(n)

    def _as_record(self, raw: bytes) -> Any:
        return np.frombuffer(raw, self.record_dtype)[0]

    def __iter__(self) -> Iterator[Any]:
        """Records until the producer closes the ring (then the iteration ends) or dies (PeerGone)."""
        while True:
            try:
                batch = self.pop_many(DEFAULT_BATCH, timeout=math.inf)
            except WriterClosed:
                return
            yield from batch

    # ------------------------------------------------------------------ asyncio

    async def pop_many_async(self, max_count: int = DEFAULT_BATCH, *, timeout: float | None = None) -> Any:
        """:meth:`pop_many` for asyncio: never blocks the event loop.

        Records already published are popped on the loop's thread at once. Only an empty ring is
        waited for in a helper thread (the futex wait releases the GIL), in slices of 0.1 s; the thread
        never pops, so cancelling the await loses no record. Why a thread and not an fd the loop
        watches: a futex cannot be polled, and an eventfd would cost the producer a system call per
        batch and an fd passed between the processes, where the thread costs nothing while data flows.
        """
        limit = seconds(self._timeout if timeout is None else timeout, "timeout")
        deadline = time.monotonic() + limit
        loop = asyncio.get_running_loop()
        while True:
            got = self._h.pop_many(max_count, 0.0, False) if not self.fixed else None
            if self.fixed:
                array = np.empty(max_count, self.record_dtype)
                n = self._h.pop_into(array, 0.0)
                got = array[:n] if n > 0 else n
            if got.__class__ is not int:
                return got
            if got != _core.ETIMEDOUT:
                raise self._error(got, "a record", timeout)
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._error(_core.ETIMEDOUT, "a record", limit)
            status = await loop.run_in_executor(
                self._helper(), self._h.wait_data, min(left, ASYNC_WAIT_SLICE_S)
            )
            if status not in (_core.OK, _core.ETIMEDOUT):
                raise self._error(status, "a record", timeout)

    async def pop_async(self, *, timeout: float | None = None) -> Any:
        """One record for asyncio (see :meth:`pop_many_async`)."""
        batch = await self.pop_many_async(1, timeout=timeout)
        return batch[0]

    async def __aiter__(self) -> AsyncIterator[Any]:
        """``async for record in ring``: records until the producer closes the ring."""
        while True:
            try:
                batch = await self.pop_many_async(DEFAULT_BATCH, timeout=math.inf)
            except WriterClosed:
                return
            for record in batch:
                yield record

    def _helper(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ring-{self.name}")
        return self._executor

    # ------------------------------------------------------------------ errors, inspection, lifecycle

    def _error(self, rc: int, waited_for: str, timeout: float | None, *, pushed: int = 0) -> ShmError:
        return self._context.error(rc, waited_for, timeout, pushed, self._h.consumer_pid)

    def header(self) -> dict[str, Any]:
        """Every header field and counter (pushed, popped, full_waits, empty_waits, wakes)."""
        return self._h.header()

    def counters(self) -> dict[str, int]:
        """pushed, popped, full_waits, empty_waits, producer_wakes, consumer_wakes."""
        h = self._h.header()
        keys = ("pushed", "popped", "full_waits", "empty_waits", "producer_wakes", "consumer_wakes")
        return {k: int(h[k]) for k in keys}

    def producer_alive(self) -> bool:
        return bool(self._h.producer_alive())

    def consumer_alive(self) -> bool:
        """Whether the attached consumer runs (True before any consumer attached)."""
        return bool(self._h.consumer_alive())

    @property
    def closed(self) -> bool:
        return bool(self._h.closed)

    def close(self) -> None:
        """Detach. The producer publishes, marks the ring closed (the consumer drains the rest and then
        gets :class:`WriterClosed`) and unlinks the name; the consumer frees its place for a successor."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._finalizer()

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = f"records of {self.record_dtype}" if self.fixed else "variable records"
        role = "producer" if self.is_producer else "consumer"
        return f"Ring({self.name!r}, capacity={self.capacity}, {kind}, {role})"


def inspect_ring(name: str) -> dict[str, Any]:
    """Every header field and counter of ring ``name``, read without attaching (read-only mapping)."""
    validate_name(name)
    header = _core.ring_inspect(name)
    if header is None:
        raise BlockNotFound(f"ring {name!r} exists but its creator has not initialised it yet")
    return header


def _release(handle: _core.RingHandle) -> None:
    handle.close()


def _release_producer(handle: _core.RingHandle) -> None:
    # Unlink before close: the name must only go while our fd can still prove it is ours.
    try:
        handle.unlink()
    finally:
        handle.close()
