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
from simbridge.models.errors import InvalidModelOption, ModelError, ModelLoadCancelled
from simbridge.models.metrics import ModelState, ModelStats

# Condition.wait cannot take math.inf; "no limit" is many waits of this length.
LONGEST_WAIT_S = 3600.0


def check_seconds(value: object, what: str) -> float:
    """``value`` as a number of seconds >= 0 (inf allowed), or :class:`InvalidModelOption`.

    NaN and negative values are refused: NaN compares false with every deadline and would wait
    forever, and a caller's typo must not silently mean "do not wait".
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise InvalidModelOption(f"{what} must be a number of seconds >= 0 (got {value!r})")
    return float(value)


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
    # Extra exception classes that mean "out of accelerator memory" for this model's loader.
    oom_errors: tuple[type[BaseException], ...] = ()


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
    """One load in flight (or finished): its thread, deadline, cancel flag, and shared error."""

    name: str
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    # True while its thread waits for an earlier (abandoned) loader of the model to return.
    queued_behind: bool = False
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
    # The load whose loader is running now, abandoned or not, until its result is kept or thrown
    # away. Only the holder of this slot may call the loader: two copies are never built at once,
    # whatever sequence of cancels and timeouts came before.
    building: Load | None = None
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
    use_out_of_memory: int = 0

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
            loader_running=self.building is not None,
            use_out_of_memory=self.use_out_of_memory,
        )


def check_spec(spec: ModelSpec) -> None:
    """Raise :class:`InvalidModelOption` naming every bad option of ``spec`` (types included)."""
    problems = []
    if not isinstance(spec.name, str) or not spec.name:
        problems.append(f"the name must be a non-empty string (got {spec.name!r})")
    if not callable(spec.loader):
        problems.append(f"the loader must be callable (got {spec.loader!r})")
    if spec.unloader is not None and not callable(spec.unloader):
        problems.append(f"the unloader must be callable or None (got {spec.unloader!r})")
    for key, least in (("max_concurrent", 1), ("max_waiting", 0)):
        value = getattr(spec, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            problems.append(f"{key} must be an integer >= {least} (got {value!r})")
    for key in ("access_timeout", "wait_timeout", "load_timeout"):
        try:
            check_seconds(getattr(spec, key), key)
        except InvalidModelOption as exc:
            problems.append(str(exc))
    idle = spec.idle_unload
    if idle is not None and (isinstance(idle, bool) or not isinstance(idle, int | float) or not idle > 0):
        problems.append(f"idle_unload must be > 0 seconds or None (got {idle!r})")
    if not isinstance(spec.cpu_fallback, bool):
        problems.append(f"cpu_fallback must be True or False (got {spec.cpu_fallback!r})")
    classes = spec.oom_errors
    if not isinstance(classes, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in classes
    ):
        problems.append(f"oom_errors must be a tuple of exception classes (got {classes!r})")
    if problems:
        raise InvalidModelOption(f"model {spec.name!r}: " + "; ".join(problems))
