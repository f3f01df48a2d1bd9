"""Loading and disposing of models for the ModelManager: the one loader thread per load, the
builder slot that keeps two copies from ever being built at once, the CPU fallback on a real
out-of-memory error, abandoning (cancel, timeout), and handing memory back.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from simbridge.logs import get_logger
from simbridge.models._entry import LONGEST_WAIT_S, Entry, Load, LoadContext, ModelSpec, SharedError
from simbridge.models.devices import is_out_of_memory, release_accelerator_memory
from simbridge.models.errors import (
    ModelError,
    ModelLoadCancelled,
    ModelLoadError,
    ModelLoaderStillRunning,
    ModelLoadTimeout,
    ModelOutOfMemory,
)
from simbridge.models.metrics import ModelMetrics, ModelState

log = get_logger(__name__)


class LoadingMixin:
    """The load/unload half of :class:`~simbridge.models.ModelManager` (state lives in entries)."""

    metrics: ModelMetrics
    _cuda_available: Callable[[], bool]

    def _start_load(self, entry: Entry) -> None:
        # Called under entry.cond with state UNLOADED: the one place where a load begins. Nothing
        # slow happens here: resolving 'auto' may import torch and probe the driver (seconds), so
        # the load's own thread does it, never a holder of entry.cond (callers with timeouts and
        # cancel_loading need that lock).
        spec = entry.spec
        load = Load(name=spec.name, deadline=time.monotonic() + spec.load_timeout)
        entry.load = load
        entry.state = ModelState.LOADING
        load.thread = threading.Thread(
            target=self._run_load,
            args=(entry, spec, load),
            name=f"simbridge-load-{spec.name}",
            daemon=True,  # a loader stuck in C code must not keep the process alive
        )
        load.thread.start()

    def _run_load(self, entry: Entry, spec: ModelSpec, load: Load) -> None:
        try:
            device = self._resolve_device(spec)
            log.info("models.loading", model=spec.name, device=device)
            if not self._enter_builder_slot(entry, load):
                return
            try:
                self._build(entry, spec, load, device)
            finally:
                # Only now (a thrown-away result disposed of) may the next load call the loader.
                with entry.cond:
                    if entry.building is load:
                        entry.building = None
                    entry.cond.notify_all()
        except BaseException as exc:  # a fault of ours: the waiters must hear of it, not hang
            message = f"loading model {spec.name!r} failed: {type(exc).__name__}: {exc}"
            self._finish(entry, load, error=SharedError(ModelLoadError, message, exc))

    def _resolve_device(self, spec: ModelSpec) -> str:
        if spec.device.name != "auto":
            return spec.device.name
        try:
            return "cuda" if self._cuda_available() else "cpu"
        except Exception as exc:  # a broken CUDA/torch install: 'auto' degrades to the CPU
            log.warning("models.cuda_probe_failed", model=spec.name, error=repr(exc))
            return "cpu"

    def _enter_builder_slot(self, entry: Entry, load: Load) -> bool:
        # True when this load may call the loader. An abandoned loader that has not returned
        # still holds the slot (Python cannot stop a thread), so this load waits for it, at most
        # until its own deadline, and is abandoned with ModelLoaderStillRunning after that.
        with entry.cond:
            while not load.cancelled.is_set():
                if entry.building is None:
                    entry.building = load
                    load.queued_behind = False
                    return True
                remaining = load.deadline - time.monotonic()
                if remaining <= 0:
                    if not load.abandoned:
                        self._abandon(entry, load, ModelLoadTimeout, "timed out", "timeout")
                    break
                load.queued_behind = True
                entry.cond.wait(min(remaining, LONGEST_WAIT_S))
            return False  # abandoned: its waiters have been told already

    def _build(self, entry: Entry, spec: ModelSpec, load: Load, device: str) -> None:
        context = LoadContext(name=spec.name, device=device, cancelled=load.cancelled)
        error: SharedError
        try:
            model, used = self._call_loader(entry, spec, context)
        except ModelLoadCancelled as exc:
            error = SharedError(ModelLoadCancelled, str(exc), exc)
        except ModelOutOfMemory as exc:
            error = SharedError(ModelOutOfMemory, str(exc), exc.__cause__)
        except BaseException as exc:  # the loader's failure belongs to its waiters
            message = f"loading model {spec.name!r} failed: {type(exc).__name__}: {exc}"
            error = SharedError(ModelLoadError, message, exc)
        else:
            self._finish(entry, load, model=model, device=used)
            return
        self._finish(entry, load, error=error)

    def _call_loader(self, entry: Entry, spec: ModelSpec, context: LoadContext) -> tuple[Any, str]:
        with entry.cond:
            entry.loader_calls += 1
        try:
            return spec.loader(context), context.device
        except BaseException as exc:
            # The exception itself decides (never its __context__): an unrelated bug raised
            # while a loader handled an OOM must not send the model to the CPU.
            if not (context.device.startswith("cuda") and is_out_of_memory(exc, spec.oom_errors)):
                raise
            if spec.device.explicit_cuda or not spec.cpu_fallback:
                why = "CUDA was asked for" if spec.device.explicit_cuda else "cpu_fallback is off"
                raise ModelOutOfMemory(
                    f"model {spec.name!r} ran out of GPU memory on {context.device} and {why}; "
                    "free GPU memory or register it with device='auto'"
                ) from exc
            log.warning("models.cpu_fallback", model=spec.name, device=context.device, error=str(exc))
        # The failed GPU attempt is gone before the CPU copy is built: never two copies at once.
        self._release_memory(spec.name)
        context.raise_if_cancelled()
        cpu = dataclasses.replace(context, device="cpu")
        with entry.cond:
            entry.loader_calls += 1
            entry.cpu_fallbacks += 1
        self.metrics.count_fallback(spec.name)
        return spec.loader(cpu), "cpu"

    def _finish(
        self,
        entry: Entry,
        load: Load,
        *,
        model: Any = None,
        device: str | None = None,
        error: SharedError | None = None,
    ) -> None:
        seconds = time.monotonic() - load.started
        discard = None
        outcome = "discarded"
        with entry.cond:
            if load.abandoned:
                discard = model  # cancelled or timed out: its waiters have been told already
            elif error is not None:
                load.error = error
                load.abandoned = True  # finished: nothing may act on it again
                entry.load = None
                entry.state = ModelState.UNLOADED
                entry.load_failures += 1
                self.metrics.observe_load(entry.spec.name, "error", seconds)
                outcome = "failed"
            else:
                entry.model, entry.device = model, device
                entry.load = None
                entry.state = ModelState.LOADED
                entry.loads += 1
                entry.last_load_seconds = seconds
                entry.last_used = time.monotonic()
                self.metrics.observe_load(entry.spec.name, "ok", seconds)
                outcome = "loaded"
            if discard is None and entry.building is load:
                # Nothing left to throw away: the slot is free in the same step the result lands,
                # so stats() never shows a loaded model with a loader still running.
                entry.building = None
            self._publish(entry)
            entry.cond.notify_all()
        # Logged after the lock is let go: a slow log handler must not hold up waiters.
        if outcome == "failed" and error is not None:
            log.warning("models.load_failed", model=entry.spec.name, error=error.message)
        elif outcome == "loaded":
            log.info("models.loaded", model=entry.spec.name, device=device, seconds=seconds)
        if discard is not None:
            self._dispose(entry.spec, discard, device)

    def _abandon(self, entry: Entry, load: Load, kind: type[ModelError], verb: str, outcome: str) -> None:
        # Under entry.cond. Python cannot stop a thread: the loader is told through its cancel
        # flag, its waiters fail now, and whatever it returns later is thrown away. Its thread
        # keeps the builder slot until it returns, so no later load builds a second copy.
        load.abandoned = True
        load.cancelled.set()
        seconds = time.monotonic() - load.started
        message = f"loading model {entry.spec.name!r} {verb} after {seconds:.3g} s"
        if load.queued_behind:
            message += (
                " while waiting for an earlier, abandoned loader of it that has not returned "
                "(it ignores ctx.cancelled); a second copy is never built at once"
            )
            if kind is ModelLoadTimeout:
                kind = ModelLoaderStillRunning
        load.error = SharedError(kind, message, None)
        if entry.load is load:
            entry.load = None
            entry.state = ModelState.UNLOADED
        entry.load_failures += 1
        self.metrics.observe_load(entry.spec.name, outcome, seconds)
        log.warning("models.load_abandoned", model=entry.spec.name, why=verb, seconds=seconds)
        self._publish(entry)
        entry.cond.notify_all()

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

    def _dispose(self, spec: ModelSpec, model: Any, device: str | None) -> None:
        if spec.unloader is not None:
            try:
                spec.unloader(model)
            except Exception as exc:  # an unloader's failure must not wedge the manager
                log.error("models.unloader_failed", model=spec.name, error=repr(exc))
        del model
        if device is not None and device.startswith("cuda"):
            self._release_memory(spec.name)

    def _release_memory(self, name: str) -> None:
        # Best effort: a CUDA error while emptying the cache must not fail an unload, a user's
        # release or a shutdown; the memory is the driver's to reclaim at exit anyway.
        try:
            release_accelerator_memory()
        except Exception as exc:
            log.warning("models.release_memory_failed", model=name, error=repr(exc))

    def _publish(self, entry: Entry) -> None:
        self.metrics.set_occupancy(
            entry.spec.name,
            waiting=entry.waiting,
            active=entry.active,
            loaded=entry.state is ModelState.LOADED,
        )
