"""Block: a named, versioned numpy array in POSIX shared memory, one writer and many readers.

The layout and the torn-read-proof protocol live in ``include/simbridge/shm.h``; this module adds the
Python API: dtype/shape checks, timeouts that say what they waited for, dead-writer detection,
lifecycle (the owner unlinks at close and at exit) and the optional recorder.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from simbridge.config import ShmSettings, load_settings
from simbridge.logs import get_logger
from simbridge.shm import _core
from simbridge.shm.checks import MAX_ITERATION, PLAIN_NUMBERS, after_id, iteration_id, seconds
from simbridge.shm.errors import (
    BlockNotFound,
    ChecksumRequired,
    InvalidLayout,
    LayoutMismatch,
    NonFinite,
    PeerGone,
    Timeout,
    WriterClosed,
)
from simbridge.shm.layout import (
    DTYPE_BY_CODE,
    check_create_args,
    check_shape,
    dtype_code,
    segment_path,
    validate_name,
)
from simbridge.shm.namelock import name_lock
from simbridge.shm.recorder import Recorder
from simbridge.shm.registry import create_segment
from simbridge.shm.snapshot import Snapshot

log = get_logger("simbridge.shm")


class Block:
    """A named array in shared memory. Make one with :meth:`create` (the writer) or :meth:`open`."""

    def __init__(
        self, segment: _core.Segment, *, name: str, settings: ShmSettings, record: Path | None
    ) -> None:
        header = segment.header()
        self._seg = segment
        self.name = name
        self.dtype: np.dtype[Any] = DTYPE_BY_CODE[header["dtype"]]
        self.shape: tuple[int, ...] = tuple(header["shape"])
        self.nbytes: int = header["payload_bytes"]
        self.slots: int = header["slot_count"]
        self.checksum: bool = header["checksum"]
        self.writer_pid: int = header["owner_pid"]
        self.is_owner: bool = segment.owner
        self._size = int(np.prod(self.shape, dtype=np.int64))
        self._spin_ns = int(settings.spin_us * 1000)
        self._peer_check_s = settings.peer_check_ms / 1000
        self._progress_s = settings.progress_every_s
        self._read_timeout = settings.read_timeout_s
        self._last_iteration: int = header["last_iteration"] if header["commit"] else 0
        self._views: list[NDArray[Any] | None] = [None] * self.slots
        self.recorder = Recorder(record) if record is not None else None
        # The owner unlinks at close, at garbage collection or at interpreter exit, whichever is first.
        release = _release_owned if self.is_owner else _release_reader
        self._finalizer = weakref.finalize(self, release, segment)
        if self.is_owner:
            _OWNED.add(self)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls,
        name: str,
        shape: int | tuple[int, ...],
        dtype: DTypeLike,
        *,
        slots: int = 2,
        mode: int | None = None,
        checksum: bool = True,
        record: str | os.PathLike[str] | None = None,
        replace_stale: bool = True,
    ) -> Block:
        """Create ``/dev/shm/simbridge.<name>`` and become its one writer.

        A segment of that name left by a dead owner (or a previous boot) is replaced when
        ``replace_stale``; one held by a live process raises :class:`BlockExists`. Arguments out of
        range raise :class:`InvalidArgument` (shape and dtype: :class:`InvalidLayout`) saying the rule.
        """
        validate_name(name)
        settings = load_settings().shm
        args = check_create_args(
            shape,
            dtype,
            slots=slots,
            mode=settings.mode if mode is None else mode,
            checksum=checksum,
            replace_stale=replace_stale,
        )
        # The record folder is made before the segment: a bad path then leaves nothing behind.
        record_dir = cls._record_dir(record, settings)
        # Under the name's lock no other simbridge process creates, replaces or removes this name.
        with name_lock(name):
            segment = create_segment(name, args)
            try:
                block = cls(segment, name=name, settings=settings, record=record_dir)
                log.debug(
                    "block created", name=name, shape=args.shape, dtype=str(args.dtype), slots=args.slots
                )
            except BaseException:
                # Nothing may outlive a failed create: a leaked name would refuse the retry as ours.
                _release_owned(segment)
                raise
        return block

    @classmethod
    def open(
        cls,
        name: str,
        *,
        timeout: float | None = None,
        shape: int | tuple[int, ...] | None = None,
        dtype: DTypeLike | None = None,
        record: str | os.PathLike[str] | None = None,
        require_checksum: bool = False,
    ) -> Block:
        """Attach as a reader, waiting up to ``timeout`` seconds for the block to appear.

        ``timeout=None`` uses ``shm.open_timeout_s`` from the configuration; ``0`` tries once.
        Give ``shape`` and/or ``dtype`` to have a peer built with other sizes refused with
        :class:`LayoutMismatch` instead of read as garbage. ``require_checksum`` refuses a writer
        that publishes without CRC32C (a C peer may leave ``SB_FLAG_CHECKSUM`` off) with
        :class:`ChecksumRequired`. Without write permission on the segment (another user's block
        of mode 0o644) the reader attaches read-only and notices publishes by polling every 1 ms.
        """
        validate_name(name)
        settings = load_settings().shm
        limit = seconds(settings.open_timeout_s if timeout is None else timeout, "Block.open timeout")
        start = time.monotonic()
        delay = 0.0005
        while True:
            try:
                segment = _core.open(name)
            except BlockNotFound:
                segment = None
            except LayoutMismatch as exc:
                raise LayoutMismatch(f"block {name!r}: {exc}") from exc
            if segment is not None:
                block = cls(segment, name=name, settings=settings, record=cls._record_dir(record, settings))
                block._expect(shape, dtype)
                if require_checksum and not block.checksum:
                    block.close()
                    raise ChecksumRequired(
                        f"block {name!r}: its writer (pid {block.writer_pid}) publishes without CRC32C "
                        "checksums, so torn or damaged payloads could not be detected; create it with "
                        "checksums (C: SB_FLAG_CHECKSUM) or open it with require_checksum=False"
                    )
                return block
            waited = time.monotonic() - start
            if waited >= limit:
                exists = segment_path(name).exists()
                what = "to be initialised by its creator" if exists else "to appear"
                raise BlockNotFound(
                    f"block {name!r} did not become available within {limit:g} s "
                    f"(waited for it {what}); is the writer running?"
                )
            time.sleep(min(delay, limit - waited))
            delay = min(delay * 2, 0.02)

    @staticmethod
    def _record_dir(record: str | os.PathLike[str] | None, settings: ShmSettings) -> Path | None:
        directory = Path(record) if record is not None else settings.record
        if directory is not None:
            Recorder(directory)  # makes the folder now, so that a bad path fails before any segment
        return directory

    def _expect(self, shape: int | tuple[int, ...] | None, dtype: DTypeLike | None) -> None:
        try:
            # The same rules as create: an expectation no block could meet is the caller's mistake.
            want_dtype = None if dtype is None else DTYPE_BY_CODE[dtype_code(dtype)]
            want_shape = None if shape is None else check_shape(shape, self.dtype.itemsize)
        except InvalidLayout:
            self.close()
            raise
        if (want_shape is not None and want_shape != self.shape) or (
            want_dtype is not None and want_dtype != self.dtype
        ):
            found = f"{self.shape} {self.dtype}"
            self.close()
            raise LayoutMismatch(
                f"block {self.name!r} holds {found}, expected "
                f"{want_shape if want_shape is not None else 'any shape'} "
                f"{want_dtype if want_dtype is not None else 'of any dtype'}; "
                "the peer was built with other sizes"
            )

    # ------------------------------------------------------------------ writing

    def publish(self, array: ArrayLike, *, iteration: int | None = None, check_finite: bool = False) -> int:
        """Copy ``array`` into the next slot, checksum it, commit it and wake readers.

        ``iteration`` defaults to the previous one plus one (the first is 1) and must increase
        (:class:`IterationOrder`); ids are integers 0..2**64-2 (:class:`OutOfRange`). Returns the
        iteration id readers will see. A forked child of the writer gets :class:`NotWriter`.
        """
        arr = array if array.__class__ is np.ndarray else np.asarray(array)
        if (arr.dtype is not self.dtype and arr.dtype != self.dtype) or arr.shape != self.shape:
            raise LayoutMismatch(
                f"block {self.name!r} holds {self.shape} {self.dtype}; got {arr.shape} {arr.dtype}"
            )
        if check_finite:
            self._check_finite(arr, "publish")
        it = self._last_iteration + 1 if iteration is None else iteration
        try:
            commit = self._seg.publish(arr, it)
        except ValueError:
            if arr.flags.c_contiguous:
                raise
            arr = np.ascontiguousarray(arr)  # the rare strided input pays for its copy here
            commit = self._seg.publish(arr, it)
        self._last_iteration = it
        if self.recorder is not None:
            self.recorder.record(self.name, "publish", arr, iteration=it, commit=commit)
        return it

    @contextmanager
    def loan(self, iteration: int | None = None) -> Iterator[NDArray[Any]]:
        """Lend a writable view of the next slot for zero-copy writes; commits when the block exits.

        An exception inside the block aborts the write and readers never see it. Do not keep the
        view after the ``with`` block: the slot is the writer's again.
        """
        # Checked before the slot is taken: a refused id must not leave a begun write behind.
        it = iteration_id(self._last_iteration + 1 if iteration is None else iteration)
        slot, _offset = self._seg.begin_write()
        try:
            yield self._view(slot, writable=True)
        except BaseException:
            self._seg.abort_write(slot)
            raise
        commit = self._seg.commit_write(slot, it)
        self._last_iteration = it
        if self.recorder is not None:
            self.recorder.record(
                self.name, "publish", self._view(slot, writable=False), iteration=it, commit=commit
            )

    # ------------------------------------------------------------------ reading

    def read(
        self,
        *,
        after: int | None = None,
        timeout: float | None = None,
        copy: bool = True,
        check_finite: bool = False,
        out: NDArray[Any] | None = None,
    ) -> Snapshot:
        """Wait for an iteration greater than ``after`` (any, if None) and return it; never torn.

        ``timeout=None`` uses ``shm.read_timeout_s`` (300 s by default; ``math.inf`` waits forever).
        ``out`` receives the copy (no allocation). ``copy=False`` returns a read-only view, see
        :class:`Snapshot`. Raises :class:`Timeout`, :class:`PeerGone`, :class:`WriterClosed`,
        :class:`Corrupted` (a bad checksum, or a header a peer overwrote), :class:`NonFinite`,
        :class:`OutOfRange` (``after`` or ``timeout``) or :class:`BlockClosed`.
        """
        # Plain ints and floats in range take the cheap checks; anything else gets the full ones.
        if after is None:
            min_iteration = 0
        elif after.__class__ is int and -1 <= after < MAX_ITERATION:
            min_iteration = after + 1
        else:
            min_iteration = after_id(after) + 1
        if timeout is not None and not (timeout.__class__ in PLAIN_NUMBERS and timeout >= 0):
            seconds(timeout, "Block.read timeout")
        dst: NDArray[Any] | None
        if not copy:
            dst = None
        elif out is None:
            dst = np.empty(self.shape, self.dtype)
        elif (
            not isinstance(out, np.ndarray)
            or (out.dtype is not self.dtype and out.dtype != self.dtype)
            or out.shape != self.shape
        ):
            raise self._out_mismatch(out)
        else:
            dst = out
        try:
            raw = self._seg.read(dst, min_iteration, self._spin_ns, 0, self.checksum)
        except ValueError:
            if dst is not None and not dst.flags.c_contiguous:
                raise self._out_mismatch(dst) from None
            raise
        if raw.__class__ is not tuple:
            raw = self._wait(dst, min_iteration, after, timeout, raw)
        array = dst if dst is not None else self._view(raw[4], writable=False)
        if check_finite:
            self._check_finite(array, f"read of iteration {raw[1]}")
        snap = Snapshot(array, raw, self.writer_pid, None if copy else self._seg)
        if self.recorder is not None:
            self.recorder.record(
                self.name,
                "read",
                array,
                iteration=snap.iteration,
                commit=snap.commit,
                header_crc=snap.checksum if self.checksum else None,
                writer_pid=self.writer_pid,
            )
        return snap

    def _wait(
        self,
        dst: NDArray[Any] | None,
        min_iteration: int,
        after: int | None,
        timeout: float | None,
        status: Any,
    ) -> tuple[int, int, int, int, int, int]:
        limit = seconds(self._read_timeout if timeout is None else timeout, "Block.read timeout")
        start = time.monotonic()
        deadline = start + limit if math.isfinite(limit) else math.inf
        next_progress = start + self._progress_s
        waited_for = "any iteration" if after is None else f"an iteration after {after}"
        # Liveness costs two /proc reads, so it is checked only once a parked slice came back empty:
        # a dead writer is still noticed within one peer-check interval.
        slices = 0
        while True:
            if status == _core.ECLOSED:
                raise WriterClosed(
                    f"block {self.name!r}: the writer (pid {self.writer_pid}) closed it "
                    f"while we waited for {waited_for}",
                    name=self.name,
                    pid=self.writer_pid,
                )
            now = time.monotonic()
            if now >= deadline:
                raise Timeout(
                    f"block {self.name!r}: waited {limit:g} s for {waited_for}, none came "
                    f"(latest iteration {self.latest_iteration}, writer pid {self.writer_pid})",
                    name=self.name,
                    waited_for=waited_for,
                    timeout=limit,
                )
            if slices and not self._seg.writer_alive():
                raise PeerGone(
                    f"block {self.name!r}: writer pid {self.writer_pid} is gone while we waited "
                    f"for {waited_for} (latest iteration {self.latest_iteration})",
                    name=self.name,
                    pid=self.writer_pid,
                )
            if now >= next_progress:
                log.info(
                    "still waiting",
                    block=self.name,
                    waiting_for=waited_for,
                    waited_s=round(now - start, 1),
                    timeout_s=limit,
                    latest_iteration=self.latest_iteration,
                    writer_pid=self.writer_pid,
                )
                next_progress = now + self._progress_s
            park = min(self._peer_check_s, deadline - now, next_progress - now)
            slices += 1
            status = self._seg.read(dst, min_iteration, 0, max(1, int(park * 1e9)), self.checksum)
            if isinstance(status, tuple):
                return status

    # ------------------------------------------------------------------ helpers

    def _view(self, slot: int, *, writable: bool) -> NDArray[Any]:
        if writable:
            offset = self._seg.payload_offset(slot)
            return np.frombuffer(memoryview(self._seg), self.dtype, self._size, offset).reshape(self.shape)
        view = self._views[slot]
        if view is None:
            offset = self._seg.payload_offset(slot)
            view = np.frombuffer(memoryview(self._seg), self.dtype, self._size, offset).reshape(self.shape)
            view.flags.writeable = False
            self._views[slot] = view
        return view

    def _out_mismatch(self, out: object) -> LayoutMismatch:
        got = f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else type(out).__name__
        return LayoutMismatch(f"out must be a C-contiguous {self.shape} {self.dtype} array; got {got}")

    def _check_finite(self, arr: NDArray[Any], what: str) -> None:
        if arr.dtype.kind not in "fc":
            return
        finite = np.isfinite(arr)
        if finite.all():
            return
        bad = int(finite.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), arr.shape))
        raise NonFinite(
            f"block {self.name!r}: {what} has {bad} NaN/Inf value(s), first at index {first}",
            count=bad,
            first_index=first,
        )

    @property
    def latest_iteration(self) -> int | None:
        """The iteration of the latest commit, or None before the first publish."""
        header = self._seg.header()
        return header["last_iteration"] if header["commit"] else None

    def writer_alive(self) -> bool:
        """Whether the writer process still runs (pid, start time and boot id all match)."""
        return bool(self._seg.writer_alive())

    def header(self) -> dict[str, Any]:
        """Every header field as shm.h defines it, for inspection and debugging."""
        return self._seg.header()

    @property
    def closed(self) -> bool:
        return bool(self._seg.closed)

    def close(self) -> None:
        """Detach. The owner also marks the block closed (waking readers) and unlinks its name.

        Read-only views handed out with ``copy=False`` stay valid after close: the mapping goes away
        with the last of them. Safe to call while other threads are inside ``read``, ``publish`` or
        ``loan`` on this Block: those calls end with :class:`BlockClosed` (a wait within one
        ``shm.peer_check_ms`` slice) and the mapping is unmapped once the last of them is back.
        """
        self._views = [None] * self.slots
        self._finalizer()

    def __enter__(self) -> Block:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "owner" if self.is_owner else "reader"
        return f"Block({self.name!r}, shape={self.shape}, dtype={self.dtype}, slots={self.slots}, {role})"


# Owned blocks of this process, so that a forked child can be told it is not their writer.
_OWNED: weakref.WeakSet[Block] = weakref.WeakSet()


def _disown_after_fork() -> None:
    # The child must not unlink the parent's segments at its exit (the C core also refuses to mark
    # them closed or to publish into them from the child).
    for block in list(_OWNED):
        block._finalizer.detach()
    _OWNED.clear()


os.register_at_fork(after_in_child=_disown_after_fork)


def _release_reader(segment: _core.Segment) -> None:
    segment.close()


def _release_owned(segment: _core.Segment) -> None:
    # Unlink before close: the name must only go while our fd can still prove it is ours.
    try:
        segment.unlink()
    finally:
        segment.close()
