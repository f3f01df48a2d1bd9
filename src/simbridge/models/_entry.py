"""The per-model bookkeeping of a ModelManager: its registration, one in-flight load, counters.

Every field of an entry is guarded by the entry's own condition variable; the manager holds it
only for bookkeeping, never while a loader, an unloader or a caller's work runs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from simbridge.models.devices import DeviceRequest
from simbridge.models.errors import ModelError, ModelLoadCancelled
from simbridge.models.metrics import ModelState, ModelStats


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a loader is told: the model's name, the device to load on, and a cancel flag to poll."""

    name: str
    device: str
    cancelled: threading.Event

    def raise_if_cancelled(self) -> None:
        """Raise :class:`ModelLoadCancelled` if the load was cancelled (call it between steps)."""
        if self.cancelled.is_set():
            raise ModelLoadCancelled(f"loading {self.name!r} was cancelled")


Loader = Callable[[LoadContext], Any]
Unloader = Callable[[Any], None]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A registration: how to load (and unload) a model, and its limits (seconds, counts)."""

    name: str
    loader: Loader
    device: DeviceRequest
    unloader: Unloader | None
    max_concurrent: int
    max_waiting: int
    access_timeout: float
    wait_timeout: float
    load_timeout: float
    idle_unload: float | None
    cpu_fallback: bool


@dataclass(slots=True)
class SharedError:
    """A load's failure, re-raised as a fresh exception in each waiter (tracebacks never shared)."""

    kind: type[ModelError]
    message: str
    cause: BaseException | None

    def build(self) -> ModelError:
        error = self.kind(self.message)
        error.__cause__ = self.cause
        return error


@dataclass(slots=True)
class Load:
    """One load in flight (or finished): its thread, deadline, and result or shared error."""

    context: LoadContext
    deadline: float
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    done: bool = False
    abandoned: bool = False
    error: SharedError | None = None


@dataclass(slots=True)
class Entry:
    """A registered model: spec, state, the loaded object, occupancy and counters."""

    spec: ModelSpec
    cond: threading.Condition = field(default_factory=threading.Condition)
    state: ModelState = ModelState.UNLOADED
    model: Any = None
    device: str | None = None
    load: Load | None = None
    # An abandoned load whose loader has not returned yet; the next load waits for it, so that
    # two copies of a model are never being built at once.
    zombie: Load | None = None
    active: int = 0
    waiting: int = 0
    # Tickets of callers waiting for a free slot, in arrival order.
    slot_line: deque[int] = field(default_factory=deque)
    next_ticket: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loads: int = 0
    loader_calls: int = 0
    load_failures: int = 0
    cpu_fallbacks: int = 0
    unloads: int = 0
    last_load_seconds: float | None = None
    peak_active: int = 0
    requests: int = 0
    access_timeouts: int = 0
    wait_timeouts: int = 0
    busy_rejections: int = 0
    wait_seconds_total: float = 0.0
    max_wait_seconds: float = 0.0
    batches: int = 0
    batched_items: int = 0

    def snapshot(self) -> ModelStats:
        """The entry's counters as a frozen :class:`ModelStats` (call under ``cond``)."""
        return ModelStats(
            name=self.spec.name,
            state=self.state,
            device=self.device,
            loads=self.loads,
            loader_calls=self.loader_calls,
            load_failures=self.load_failures,
            cpu_fallbacks=self.cpu_fallbacks,
            unloads=self.unloads,
            last_load_seconds=self.last_load_seconds,
            active_users=self.active,
            peak_active_users=self.peak_active,
            waiting=self.waiting,
            max_concurrent=self.spec.max_concurrent,
            requests=self.requests,
            access_timeouts=self.access_timeouts,
            wait_timeouts=self.wait_timeouts,
            busy_rejections=self.busy_rejections,
            wait_seconds_total=self.wait_seconds_total,
            max_wait_seconds=self.max_wait_seconds,
            batches=self.batches,
            batched_items=self.batched_items,
        )
