"""ModelManager: named model loaders, each loaded once per process and shared by bounded callers.

It owns the life of each model (load once, queue callers while loading, cap concurrent use, time
out, cancel, fall back to the CPU on a real out-of-memory error, unload when idle, shut down).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, TypeVar

from simbridge.config import ModelSettings, load_settings
from simbridge.logs import get_logger
from simbridge.models._access import AccessMixin
from simbridge.models._entry import (
    LONGEST_WAIT_S,
    Entry,
    Loader,
    ModelSpec,
    Unloader,
    check_seconds,
    check_spec,
)
from simbridge.models.batching import Batcher
from simbridge.models.devices import DeviceRequest, torch_cuda_available
from simbridge.models.errors import (
    InvalidModelOption,
    ModelAlreadyRegistered,
    ModelLoadCancelled,
    ModelLoadTimeout,
    UnknownModel,
)
from simbridge.models.metrics import ModelMetrics, ModelState, ModelStats

log = get_logger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

_HOUSEKEEPING_S = 0.25
_UNSET: Any = object()


class ModelManager(AccessMixin):
    """A registry of named model loaders; each model is loaded at most once at a time per process.

    ``register`` a loader, then ``with manager.use(name) as model:``. Limits and timeouts come from
    ``settings`` (the ``models`` config section) unless given per model. A manager is a context
    manager; leaving it calls :meth:`shutdown`.

    Every error it raises is a :class:`~simbridge.models.ModelError`. A loader's failure reaches
    callers as :class:`~simbridge.models.ModelLoadError` with the loader's error as ``__cause__``.
    Errors raised by the caller's own code inside a ``use()`` block (or by a batch function) pass
    through unchanged, except an accelerator out-of-memory error, which becomes
    :class:`~simbridge.models.ModelUseOutOfMemory` (from the original).
    """

    def __init__(
        self,
        *,
        settings: ModelSettings | None = None,
        registry: Any | None = None,
        cuda_available: Callable[[], bool] = torch_cuda_available,
    ) -> None:
        if settings is not None and not isinstance(settings, ModelSettings):
            raise InvalidModelOption(f"settings must be a ModelSettings (got {type(settings).__name__})")
        if not callable(cuda_available):
            raise InvalidModelOption(f"cuda_available must be callable (got {cuda_available!r})")
        self._settings = settings if settings is not None else load_settings().models
        self._cuda_available = cuda_available
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._stopped = False
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
        oom_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        """Register ``loader(ctx) -> model`` under ``name``; nothing is loaded until first use.

        ``device``: 'auto' (CUDA when available, the CPU after a real out-of-memory error of the
        loader), 'cpu', 'cuda' or 'cuda:N' (never falls back). ``idle_unload``: seconds unused
        before the model is unloaded (None: never); ``unloader(model)`` runs then, if given.
        ``oom_errors``: extra exception classes that mean "out of accelerator memory" besides
        torch's and cupy's ``OutOfMemoryError``. Only the exception the loader raised counts,
        never the one it was handling: a loader that wraps an OOM must raise one of these.
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
            oom_errors=oom_errors,
        )
        check_spec(spec)
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
            check_spec(spec)
            entry.spec = spec
            entry.cond.notify_all()
        self._wake.set()
        log.info("models.updated", model=name, **{k: str(v) for k, v in changes.items()})

    @property
    def closed(self) -> bool:
        """True once :meth:`shutdown` began."""
        return self._closed

    def names(self) -> list[str]:
        """The registered model names."""
        with self._lock:
            return list(self._entries)

    # -- use -----------------------------------------------------------------------------------

    def use(
        self,
        name: str,
        *,
        access_timeout: float | None = None,
        wait_timeout: float | None = None,
    ) -> AbstractContextManager[Any]:
        """Hold model ``name`` for the ``with`` block, loading it first if needed.

        Waits at most ``wait_timeout`` for a load and ``access_timeout`` for a free slot (the
        model's own limits by default); raises :class:`ModelBusy` at once when its line is full.

        An accelerator out-of-memory error raised in the block (e.g. by ``model.encode``) becomes
        :class:`ModelUseOutOfMemory` and never moves the model to the CPU: others may be using the
        GPU copy at that moment and a CPU copy would be a second one. The model stays loaded;
        retry with a smaller batch, or register it with ``device='cpu'``. Other errors of the
        block pass through unchanged.
        """
        entry = self._entry(name)
        access = None if access_timeout is None else check_seconds(access_timeout, "access_timeout")
        wait = None if wait_timeout is None else check_seconds(wait_timeout, "wait_timeout")
        return self._holding(entry, access, wait, internal=False)

    def load(self, name: str, *, timeout: float | None = None) -> str:
        """Load ``name`` now (or wait for the load under way); returns the device it is on."""
        entry = self._entry(name)
        wait = None if timeout is None else check_seconds(timeout, "timeout")
        self._acquire(entry, None, wait, take_slot=False)
        with entry.cond:
            return entry.device or "cpu"

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

    def _start_housekeeper(self) -> None:
        if self._housekeeper is None:
            self._housekeeper = threading.Thread(
                target=self._housekeep, name="simbridge-model-housekeeper", daemon=True
            )
            self._housekeeper.start()

    def _housekeep(self) -> None:
        # Idle unloading, and load deadlines that no waiter is around to enforce.
        while not self._stopped:
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
        # Built under the manager's lock, after the check: a batcher is either refused (and no
        # worker thread was started) or known to shutdown(), which closes it. Building one only
        # starts its threads, nothing slow.
        with self._lock:
            self._check_open()
            batcher: Batcher[Item, Result] = Batcher(
                name=name,
                # Internal: a batch may still run while shutdown() drains what was accepted.
                use=lambda: self._holding(entry, None, None, internal=True),
                fn=fn,
                max_batch_size=self._settings.batch_max_size if max_batch_size is None else max_batch_size,
                max_wait_ms=self._settings.batch_max_wait_ms if max_wait_ms is None else max_wait_ms,
                on_batch=lambda size: self._note_batch(entry, size),
                # A caller waits for a load, then for a slot, then for the batch itself.
                timeout=entry.spec.wait_timeout + entry.spec.access_timeout,
                workers=workers,
                on_close=self._forget_batcher,
            )
            self._batchers.append(batcher)
        return batcher

    def _forget_batcher(self, batcher: Batcher[Any, Any]) -> None:
        # A closed batcher is not kept (a service making one per request would grow forever).
        with self._lock:
            if batcher in self._batchers:
                self._batchers.remove(batcher)

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
        """Refuse new use, let batchers finish what they accepted, cancel loads, unload models.

        Within ``timeout`` seconds in all: ``use()`` refuses at once and callers waiting in it
        get :class:`ModelManagerClosed`; each batcher finishes the items it had already accepted
        (loading the model if it must); then loads under way are cancelled, items no batch
        started fail with :class:`ModelManagerClosed`, and each model is unloaded once idle. A
        model still held after the bound is unloaded when its last user lets go.
        """
        seconds = check_seconds(timeout, "timeout")
        with self._lock:
            if self._closed:
                return
            self._closed = True
            entries = list(self._entries.values())
            batchers = list(self._batchers)
        self._wake.set()
        deadline = time.monotonic() + min(seconds, LONGEST_WAIT_S)

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        # Outside callers waiting in use() wake to find the manager closed; batch workers keep
        # going (internal use) so that accepted items are finished, not failed.
        for entry in entries:
            with entry.cond:
                entry.cond.notify_all()
        for batcher in batchers:
            batcher.close(timeout=left())
        with self._lock:
            self._stopped = True
        self._wake.set()  # the housekeeper may have gone back to sleep since the first wake
        # Loads stop and every remaining waiter (a batch worker past the bound) wakes to find
        # the manager stopped.
        for entry in entries:
            with entry.cond:
                if entry.load is not None:
                    self._abandon(entry, entry.load, ModelLoadCancelled, "cancelled by shutdown", "cancelled")
                entry.cond.notify_all()
        for entry in entries:
            with entry.cond:
                while entry.active and left() > 0:
                    entry.cond.wait(left())
                busy = entry.active
            if busy:
                log.warning("models.shutdown_in_use", model=entry.spec.name, users=busy)
            else:
                self._unload(entry, reason="shutdown")
        if self._housekeeper is not None:
            self._housekeeper.join(left())
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
            entry = self._entries.get(name) if isinstance(name, str) else None
            known = ", ".join(sorted(self._entries)) or "none"
        if entry is None:
            raise UnknownModel(f"no model registered as {name!r} (registered: {known})")
        return entry


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
