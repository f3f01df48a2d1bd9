"""ModelManager: named model loaders, each loaded once per process and shared by bounded callers.

It owns the life of each model (load once, queue callers while loading, cap concurrent use, time
out, cancel, fall back to the CPU on a real out-of-memory error, unload when idle, shut down).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

from simbridge.config import ModelSettings, load_settings
from simbridge.logs import get_logger
from simbridge.models._entry import Entry, Load, Loader, ModelSpec, Unloader
from simbridge.models._loading import LoadingMixin
from simbridge.models.batching import Batcher
from simbridge.models.devices import DeviceRequest, torch_cuda_available
from simbridge.models.errors import (
    InvalidModelOption,
    ModelAccessTimeout,
    ModelAlreadyRegistered,
    ModelBusy,
    ModelLoadCancelled,
    ModelLoadTimeout,
    ModelManagerClosed,
    ModelWaitTimeout,
    UnknownModel,
)
from simbridge.models.metrics import ModelMetrics, ModelState, ModelStats

log = get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

_HOUSEKEEPING_S = 0.25
# Condition.wait cannot take math.inf; "no limit" is many waits of this length.
_LONGEST_WAIT_S = 3600.0
_UNSET: Any = object()


class ModelManager(LoadingMixin):
    """A registry of named model loaders; each model is loaded at most once at a time per process.

    ``register`` a loader, then ``with manager.use(name) as model:``. Limits and timeouts come from
    ``settings`` (the ``models`` config section) unless given per model. A manager is a context
    manager; leaving it calls :meth:`shutdown`.
    """

    def __init__(
        self,
        *,
        settings: ModelSettings | None = None,
        registry: Any | None = None,
        cuda_available: Callable[[], bool] = torch_cuda_available,
    ) -> None:
        self._settings = settings if settings is not None else load_settings().models
        self._cuda_available = cuda_available
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._batchers: list[Batcher[Any, Any]] = []
        self._wake = threading.Event()
        self._housekeeper: threading.Thread | None = None
        self.metrics = ModelMetrics(registry)

    # -- registration ------------------------------------------------------------------------

    def register(
        self,
        name: str,
        loader: Loader,
        *,
        device: str = "auto",
        unloader: Unloader | None = None,
        max_concurrent: int | None = None,
        max_waiting: int | None = None,
        access_timeout: float | None = None,
        wait_timeout: float | None = None,
        load_timeout: float | None = None,
        idle_unload: float | None = _UNSET,
        cpu_fallback: bool | None = None,
    ) -> None:
        """Register ``loader(ctx) -> model`` under ``name``; nothing is loaded until first use.

        ``device``: 'auto' (CUDA when available, the CPU after a real out-of-memory error),
        'cpu', 'cuda' or 'cuda:N' (never falls back). ``idle_unload``: seconds unused before the
        model is unloaded (None: never); ``unloader(model)`` runs then, if given.
        """
        s = self._settings
        spec = ModelSpec(
            name=name,
            loader=loader,
            device=DeviceRequest(device),
            unloader=unloader,
            max_concurrent=s.max_concurrent if max_concurrent is None else max_concurrent,
            max_waiting=s.max_waiting if max_waiting is None else max_waiting,
            access_timeout=s.access_timeout_s if access_timeout is None else access_timeout,
            wait_timeout=s.wait_timeout_s if wait_timeout is None else wait_timeout,
            load_timeout=s.load_timeout_s if load_timeout is None else load_timeout,
            idle_unload=s.idle_unload_s if idle_unload is _UNSET else idle_unload,
            cpu_fallback=s.cpu_fallback if cpu_fallback is None else cpu_fallback,
        )
        _check_spec(spec)
        with self._lock:
            self._check_open()
            if name in self._entries:
                raise ModelAlreadyRegistered(f"a loader is already registered as {name!r}")
            self._entries[name] = Entry(spec=spec)
            self._start_housekeeper()

    def update(self, name: str, **changes: Any) -> None:
        """Change a registered model's limits at run time (e.g. ``max_concurrent=20``).

        Accepts the keyword options of :meth:`register` except the loader; waiters see new limits
        at once. A new ``device`` or ``unloader`` applies from the next load.
        """
        entry = self._entry(name)
        if "device" in changes:
            changes["device"] = DeviceRequest(str(changes["device"]))
        unknown = set(changes) - {f.name for f in dataclasses.fields(ModelSpec)} | (
            set(changes) & {"name", "loader"}
        )
        if unknown:
            raise InvalidModelOption(f"cannot update {sorted(unknown)} of model {name!r}")
        with entry.cond:
            spec = dataclasses.replace(entry.spec, **changes)
            _check_spec(spec)
            entry.spec = spec
            entry.cond.notify_all()
        self._wake.set()
        log.info("models.updated", model=name, **{k: str(v) for k, v in changes.items()})

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` ran."""
        return self._closed

    def names(self) -> list[str]:
        """The registered model names."""
        with self._lock:
            return list(self._entries)

    # -- use -----------------------------------------------------------------------------------

    @contextmanager
    def use(
        self,
        name: str,
        *,
        access_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> Iterator[Any]:
        """Hold model ``name`` for the ``with`` block, loading it first if needed.

        Waits at most ``wait_timeout`` for a load and ``access_timeout`` for a free slot (the
        model's own limits by default); raises :class:`ModelBusy` at once when its line is full.
        """
        entry = self._entry(name)
        model = self._acquire(entry, access_timeout, wait_timeout)
        try:
            yield model
        finally:
            self._release(entry)

    def load(self, name: str, *, timeout: float | None = None) -> str:
        """Load ``name`` now (or wait for the load under way); returns the device it is on."""
        entry = self._entry(name)
        self._acquire(entry, None, timeout, take_slot=False)
        with entry.cond:
            return entry.device or "cpu"

    def _acquire(
        self,
        entry: Entry,
        access_timeout: float | None,
        wait_timeout: float | None,
        *,
        take_slot: bool = True,
    ) -> Any:
        spec = entry.spec
        started = time.monotonic()
        wait_deadline = started + (spec.wait_timeout if wait_timeout is None else wait_timeout)
        access_limit = spec.access_timeout if access_timeout is None else access_timeout
        access_deadline: float | None = None
        awaited: Load | None = None
        with entry.cond:
            self._check_open()
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
                    self._check_open()
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
                        entry.cond.wait(min(access_deadline - now, _LONGEST_WAIT_S))
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
                    entry.cond.wait(min(until - now, _LONGEST_WAIT_S))
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
            unload_now = self._closed and entry.active == 0 and entry.waiting == 0
        if unload_now:
            self._unload(entry, reason="shutdown")

    def cancel_loading(self, name: str) -> bool:
        """Cancel the load of ``name`` under way: its waiters get :class:`ModelLoadCancelled`.

        Returns False when nothing was loading. The loader is told through
        ``ctx.cancelled``; the next use starts a fresh load once the old loader has returned.
        """
        entry = self._entry(name)
        with entry.cond:
            load = entry.load
            if entry.state is not ModelState.LOADING or load is None:
                return False
            self._abandon(entry, load, ModelLoadCancelled, "was cancelled", "cancelled")
            return True

    # -- unloading -----------------------------------------------------------------------------

    def unload(self, name: str) -> bool:
        """Unload ``name`` now if it is loaded and nobody uses or waits for it; else False."""
        return self._unload(self._entry(name), reason="asked")

    def _unload(self, entry: Entry, *, reason: str, idle_for: float | None = None) -> bool:
        with entry.cond:
            if entry.state is not ModelState.LOADED or entry.active or entry.waiting:
                return False
            if idle_for is not None and time.monotonic() - entry.last_used < idle_for:
                return False
            model, device = entry.model, entry.device
            entry.model = None
            entry.state = ModelState.UNLOADING
            self._publish(entry)
        try:
            self._dispose(entry.spec, model, device)
        finally:
            with entry.cond:
                entry.state = ModelState.UNLOADED
                entry.device = None
                entry.unloads += 1
                self._publish(entry)
                entry.cond.notify_all()
        log.info("models.unloaded", model=entry.spec.name, reason=reason)
        return True

    def _start_housekeeper(self) -> None:
        if self._housekeeper is None:
            self._housekeeper = threading.Thread(
                target=self._housekeep, name="simbridge-model-housekeeper", daemon=True
            )
            self._housekeeper.start()

    def _housekeep(self) -> None:
        # Idle unloading, and load deadlines that no waiter is around to enforce.
        while not self._closed:
            self._wake.wait(_HOUSEKEEPING_S)
            self._wake.clear()
            with self._lock:
                entries = list(self._entries.values())
            for entry in entries:
                with entry.cond:
                    load = entry.load
                    if load is not None and time.monotonic() >= load.deadline:
                        self._abandon(entry, load, ModelLoadTimeout, "timed out", "timeout")
                    idle = entry.spec.idle_unload
                if idle is not None:
                    self._unload(entry, reason="idle", idle_for=idle)

    # -- batching, stats, shutdown ----------------------------------------------------------

    def batched(
        self,
        name: str,
        fn: Callable[[Any, list[Item]], Sequence[Result]],
        max_batch_size: int | None = None,
        max_wait_ms: float | None = None,
        *,
        workers: int = 1,
    ) -> Batcher[Item, Result]:
        """A :class:`Batcher` coalescing single items from many callers into ``fn(model, items)``.

        ``fn`` must return one result per item, in order. Each batch holds the model as one user.
        """
        entry = self._entry(name)
        batcher: Batcher[Item, Result] = Batcher(
            name=name,
            use=lambda: self.use(name),
            fn=fn,
            max_batch_size=self._settings.batch_max_size if max_batch_size is None else max_batch_size,
            max_wait_ms=self._settings.batch_max_wait_ms if max_wait_ms is None else max_wait_ms,
            on_batch=lambda size: self._note_batch(entry, size),
            # A caller waits for a load, then for a slot, then for the batch itself.
            timeout=entry.spec.wait_timeout + entry.spec.access_timeout,
            workers=workers,
        )
        with self._lock:
            self._check_open()
            self._batchers.append(batcher)
        return batcher

    def _note_batch(self, entry: Entry, size: int) -> None:
        with entry.cond:
            entry.batches += 1
            entry.batched_items += size
        self.metrics.observe_batch(entry.spec.name, size)

    def stats(self) -> dict[str, ModelStats]:
        """Each model's counters now (state, loads, users, queue, timeouts, wait times)."""
        with self._lock:
            entries = list(self._entries.values())
        result = {}
        for entry in entries:
            with entry.cond:
                result[entry.spec.name] = entry.snapshot()
        return result

    def shutdown(self, *, timeout: float = 30.0) -> None:
        """Refuse new use, cancel loads, stop batchers, and unload every model once it is idle.

        Waits up to ``timeout`` for callers holding a model; one still in use after that is
        unloaded when its last user lets go.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = list(self._entries.values())
            batchers = list(self._batchers)
        self._wake.set()
        deadline = time.monotonic() + timeout
        # Loads stop and every waiter (batch workers among them) wakes to find the manager
        # closed, before the batchers are joined: a worker waiting for a load must not hold
        # up the shutdown.
        for entry in entries:
            with entry.cond:
                if entry.load is not None:
                    self._abandon(entry, entry.load, ModelLoadCancelled, "cancelled by shutdown", "cancelled")
                entry.cond.notify_all()
        for batcher in batchers:
            batcher.close(timeout=max(0.0, deadline - time.monotonic()))
        for entry in entries:
            with entry.cond:
                while entry.active and time.monotonic() < deadline:
                    entry.cond.wait(deadline - time.monotonic())
                busy = entry.active
            if busy:
                log.warning("models.shutdown_in_use", model=entry.spec.name, users=busy)
            else:
                self._unload(entry, reason="shutdown")
        log.info("models.shutdown", models=len(entries))

    def __enter__(self) -> ModelManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    # -- helpers ---------------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownModel(f"no model registered as {name!r} (registered: {known})")
        return entry

    def _check_open(self) -> None:
        if self._closed:
            raise ModelManagerClosed("the model manager was shut down; build a new one")

    def _count(self, entry: Entry, outcome: str, waited: float | None) -> None:
        entry.requests += 1
        self.metrics.observe_request(entry.spec.name, outcome, waited)


# One slot, not a global rebinding: the process-wide manager lives in _default[0].
_default: list[ModelManager] = []
_default_lock = threading.Lock()


def default_manager() -> ModelManager:
    """The process-wide manager, built from the configuration on first call.

    Code that shares models across a process (a service, its workers) registers and uses them
    here, so that each model is loaded once per process. After its ``shutdown()`` the next call
    builds a fresh one.
    """
    with _default_lock:
        if not _default or _default[0].closed:
            _default[:] = [ModelManager()]
        return _default[0]


def _check_spec(spec: ModelSpec) -> None:
    problems = []
    if spec.max_concurrent < 1:
        problems.append(f"max_concurrent must be >= 1 (got {spec.max_concurrent})")
    if spec.max_waiting < 0:
        problems.append(f"max_waiting must be >= 0 (got {spec.max_waiting})")
    for key in ("access_timeout", "wait_timeout", "load_timeout"):
        if not getattr(spec, key) >= 0:
            problems.append(f"{key} must be >= 0 seconds (got {getattr(spec, key)})")
    if spec.idle_unload is not None and not spec.idle_unload > 0:
        problems.append(f"idle_unload must be > 0 seconds or None (got {spec.idle_unload})")
    if problems:
        raise InvalidModelOption(f"model {spec.name!r}: " + "; ".join(problems))
