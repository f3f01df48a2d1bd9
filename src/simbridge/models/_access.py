"""Access to a model for the ModelManager: the bounded wait for a load and for a slot, handed out
in arrival order, and the release; an out-of-memory error of a caller's call is typed here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from simbridge.models._entry import LONGEST_WAIT_S, Entry, Load
from simbridge.models._loading import LoadingMixin
from simbridge.models.devices import is_out_of_memory
from simbridge.models.errors import (
    ModelAccessTimeout,
    ModelBusy,
    ModelLoadTimeout,
    ModelManagerClosed,
    ModelUseOutOfMemory,
    ModelWaitTimeout,
)
from simbridge.models.metrics import ModelState


class AccessMixin(LoadingMixin):
    """The use half of :class:`~simbridge.models.ModelManager` (state lives in entries)."""

    # _closed: shutdown began, use() refuses; the batchers may still finish what they accepted.
    # _stopped: nothing may use a model any more and loads are cancelled.
    _closed: bool
    _stopped: bool

    @contextmanager
    def _holding(
        self, entry: Entry, access_timeout: float | None, wait_timeout: float | None, *, internal: bool
    ) -> Iterator[Any]:
        model = self._acquire(entry, access_timeout, wait_timeout, internal=internal)
        try:
            yield model
        except BaseException as exc:
            if not is_out_of_memory(exc, entry.spec.oom_errors):
                raise
            with entry.cond:
                entry.use_out_of_memory += 1
                device = entry.device
            raise ModelUseOutOfMemory(
                f"a call of model {entry.spec.name!r} on {device} ran out of accelerator memory "
                f"({type(exc).__name__}: {exc}); the model stays loaded there: retry with a "
                "smaller batch, or register it with device='cpu'"
            ) from exc
        finally:
            self._release(entry)

    def _acquire(
        self,
        entry: Entry,
        access_timeout: float | None,
        wait_timeout: float | None,
        *,
        take_slot: bool = True,
        internal: bool = False,
    ) -> Any:
        spec = entry.spec
        started = time.monotonic()
        wait_deadline = started + (spec.wait_timeout if wait_timeout is None else wait_timeout)
        access_limit = spec.access_timeout if access_timeout is None else access_timeout
        access_deadline: float | None = None
        awaited: Load | None = None
        with entry.cond:
            self._check_open(internal)
            entry.next_ticket += 1
            ticket = entry.next_ticket
            ready = entry.state is ModelState.LOADED and (
                not take_slot or entry.active < entry.spec.max_concurrent
            )
            if not ready and entry.waiting >= entry.spec.max_waiting:
                entry.busy_rejections += 1
                self._count(entry, "busy", None)
                raise ModelBusy(
                    f"{entry.waiting} callers already wait for model {spec.name!r} "
                    f"(max_waiting={entry.spec.max_waiting}); try again later or raise the limit"
                )
            entry.waiting += 1
            self._publish(entry)
            try:
                while True:
                    now = time.monotonic()
                    if awaited is not None and awaited.error is not None:
                        self._count(entry, "error", None)
                        raise awaited.error.build()
                    self._check_open(internal)
                    if entry.state is ModelState.LOADED:
                        awaited = None
                        if not take_slot:
                            return entry.model
                        first = not entry.slot_line or entry.slot_line[0] == ticket
                        if entry.active < entry.spec.max_concurrent and first:
                            if entry.slot_line and entry.slot_line[0] == ticket:
                                entry.slot_line.popleft()
                                entry.cond.notify_all()  # the next in line may fit as well
                            break
                        if access_deadline is None:
                            # Slots are handed out in arrival order: no caller starves.
                            access_deadline = now + access_limit
                            entry.slot_line.append(ticket)
                        if now >= access_deadline:
                            entry.access_timeouts += 1
                            self._count(entry, "access_timeout", None)
                            raise ModelAccessTimeout(
                                f"all {entry.spec.max_concurrent} slots of model {spec.name!r} "
                                f"stayed busy for {access_limit:g} s; raise max_concurrent or "
                                "the access timeout"
                            )
                        entry.cond.wait(min(access_deadline - now, LONGEST_WAIT_S))
                        continue
                    if entry.state is ModelState.UNLOADED:
                        self._start_load(entry)
                    load = entry.load
                    if load is not None:
                        awaited = load
                        if now >= load.deadline:
                            self._abandon(entry, load, ModelLoadTimeout, "timed out", "timeout")
                            continue
                    if now >= wait_deadline:
                        entry.wait_timeouts += 1
                        self._count(entry, "wait_timeout", None)
                        raise ModelWaitTimeout(
                            f"model {spec.name!r} was still {entry.state.value} after "
                            f"{wait_deadline - started:g} s of waiting; raise the wait timeout"
                        )
                    until = wait_deadline if load is None else min(wait_deadline, load.deadline)
                    entry.cond.wait(min(until - now, LONGEST_WAIT_S))
            finally:
                entry.waiting -= 1
                if access_deadline is not None and ticket in entry.slot_line:
                    entry.slot_line.remove(ticket)  # gave up (timeout, error): let the next go
                    entry.cond.notify_all()
                self._publish(entry)
            entry.active += 1
            entry.peak_active = max(entry.peak_active, entry.active)
            waited = time.monotonic() - started
            entry.wait_seconds_total += waited
            entry.max_wait_seconds = max(entry.max_wait_seconds, waited)
            self._count(entry, "ok", waited)
            self._publish(entry)
            return entry.model

    def _release(self, entry: Entry) -> None:
        with entry.cond:
            entry.active -= 1
            entry.last_used = time.monotonic()
            self._publish(entry)
            entry.cond.notify_all()
            unload_now = self._stopped and entry.active == 0 and entry.waiting == 0
        if unload_now:
            self._unload(entry, reason="shutdown")

    def _check_open(self, internal: bool = False) -> None:
        # A batcher's own use (internal) is allowed until shutdown stops everything.
        if self._stopped or (self._closed and not internal):
            raise ModelManagerClosed("the model manager was shut down; build a new one")

    def _count(self, entry: Entry, outcome: str, waited: float | None) -> None:
        entry.requests += 1
        self.metrics.observe_request(entry.spec.name, outcome, waited)
