"""Dynamic batching: single requests from many threads coalesced into one model call.

A collector thread takes what is queued (up to ``max_batch_size``), waits at most ``max_wait_ms``
after the first item for more, calls ``fn(model, items)`` once and routes each result back.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Generic, TypeVar

from simbridge.logs import get_logger
from simbridge.models._entry import LONGEST_WAIT_S, check_seconds
from simbridge.models.errors import BatchError, InvalidModelOption, ModelManagerClosed, ModelWaitTimeout

log = get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

_STOP: Any = object()


class Batcher(Generic[Item, Result]):
    """Coalesces concurrent single items into batched ``fn(model, items)`` calls.

    Call it (or :meth:`submit`) from any number of threads: each call blocks until its own
    result is back. :meth:`future` returns a ``concurrent.futures.Future`` instead (wrap it with
    ``asyncio.wrap_future`` in async code). Built by ``ModelManager.batched``.

    A caller gets what ``fn`` raised, unchanged (it is the caller's own function), except an
    accelerator out-of-memory error (:class:`~simbridge.models.ModelUseOutOfMemory`); errors of
    the batcher itself (closed, timeout, a wrong number of results) are ``ModelError``.
    """

    def __init__(
        self,
        *,
        name: str,
        use: Callable[[], AbstractContextManager[Any]],
        fn: Callable[[Any, list[Item]], Sequence[Result]],
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
        timeout: float = 300.0,
        workers: int = 1,
        on_close: Callable[[Batcher[Any, Any]], None] | None = None,
    ) -> None:
        counts = (max_batch_size, workers)
        if not callable(fn):
            raise InvalidModelOption(f"batching {name!r}: the batch function must be callable (got {fn!r})")
        if (
            any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in counts)
            or isinstance(max_wait_ms, bool)
            or not isinstance(max_wait_ms, int | float)
            or not 0 <= max_wait_ms < math.inf
        ):
            raise InvalidModelOption(
                f"batching {name!r}: max_batch_size and workers must be integers >= 1 and "
                f"max_wait_ms a finite number >= 0 (got {max_batch_size!r}, {workers!r}, {max_wait_ms!r})"
            )
        timeout = check_seconds(timeout, "the batcher's timeout")
        self.name = name
        self._use = use
        self._fn = fn
        self._max = max_batch_size
        self._wait_s = max_wait_ms / 1000
        self._on_batch = on_batch
        self._timeout = timeout
        # queue.Queue, not SimpleQueue: with several workers, SimpleQueue.get(timeout=...) was
        # seen to overrun its timeout by seconds (CPython 3.11), stranding a half-built batch.
        self._queue: queue.Queue[tuple[Item, Future[Result]] | Any] = queue.Queue()
        self._on_close = on_close
        self._closed = False
        self._close_lock = threading.Lock()
        # More than one worker lets one batch be prepared (tokenised, in Python) while another
        # runs in the model's native code; each worker holds the model as one user.
        self._threads = [
            threading.Thread(target=self._collect, name=f"simbridge-batcher-{name}-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def future(self, item: Item) -> Future[Result]:
        """Queue ``item``; the future resolves to its result (or the batch's error)."""
        future: Future[Result] = Future()
        with self._close_lock:
            # Checked under the lock so that no item slips in behind the stop marker.
            if self._closed:
                raise ModelManagerClosed(f"the batcher of {self.name!r} is closed")
            self._queue.put((item, future))
        return future

    def submit(self, item: Item, *, timeout: float | None = None) -> Result:
        """Queue ``item`` and wait for its result, at most ``timeout`` seconds (None: the default).

        Raises :class:`ModelWaitTimeout` when no result came in time (the item is dropped if its
        batch has not started yet).
        """
        limit = self._timeout if timeout is None else check_seconds(timeout, "timeout")
        future = self.future(item)
        try:
            # Condition.wait cannot take math.inf: no limit is None there.
            return future.result(timeout=limit if math.isfinite(limit) else None)
        except FutureTimeout:
            future.cancel()
            raise ModelWaitTimeout(
                f"no result from the batcher of {self.name!r} within {limit:g} s; "
                "the model is slow or overloaded (raise the timeout or max_batch_size)"
            ) from None

    __call__ = submit

    def close(self, *, timeout: float | None = None) -> None:
        """Finish the items already accepted, then stop the workers (idempotent).

        Waits up to ``timeout`` seconds (None: the batcher's own timeout, the longest a caller
        waits for a result; ``math.inf``: as long as the batches take) for the workers. Items
        that no batch had started when the bound passed fail with :class:`ModelManagerClosed`
        (a batch under way cannot be interrupted; it finishes on its own).
        """
        limit = self._timeout if timeout is None else check_seconds(timeout, "timeout")
        with self._close_lock:
            first = not self._closed
            self._closed = True
            if first:
                # Behind every accepted item: workers stop only once the queue before them is done.
                for _ in self._threads:
                    self._queue.put(_STOP)
        deadline = time.monotonic() + min(limit, LONGEST_WAIT_S)
        for thread in self._threads:
            if thread is threading.current_thread():
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        if any(thread.is_alive() for thread in self._threads):
            self._fail_unstarted()
        if first and self._on_close is not None:
            self._on_close(self)

    def _fail_unstarted(self) -> None:
        # The bound passed with workers still busy: what no batch took yet fails now rather than
        # waiting for its caller's own timeout. The stop markers go back for the workers.
        stops = 0
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is _STOP:
                stops += 1
                continue
            _, future = entry
            if future.set_running_or_notify_cancel():
                future.set_exception(
                    ModelManagerClosed(
                        f"the batcher of {self.name!r} was closed before this item's batch started"
                    )
                )
        for _ in range(stops):
            self._queue.put(_STOP)
        log.warning("models.batcher_still_running", model=self.name)

    def __enter__(self) -> Batcher[Item, Result]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _collect(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.monotonic() + self._wait_s
            while len(batch) < self._max:
                try:
                    # Take what is already queued without waiting; only then wait for stragglers.
                    item = self._queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        items = [item for item, _ in live]
        try:
            with self._use() as model:
                results = self._fn(model, items)
            try:
                count: int | None = len(results)
            except TypeError:  # a generator or a scalar: not one result per item
                count = None
            if count != len(items):
                got = f"{count} results" if count is not None else f"a {type(results).__name__}"
                raise BatchError(
                    f"batch function of {self.name!r} returned {got} for {len(items)} items; "
                    "it must return one per item, in order, as a sequence"
                )
        except BaseException as exc:
            log.warning("models.batch_failed", model=self.name, size=len(items), error=repr(exc))
            for _, fut in live:
                fut.set_exception(exc)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(len(items))
            except Exception as exc:  # counting must never strand the batch's callers
                log.warning("models.batch_count_failed", model=self.name, error=repr(exc))
        for (_, fut), result in zip(live, results, strict=True):
            fut.set_result(result)
