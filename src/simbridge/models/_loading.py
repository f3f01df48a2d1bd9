"""Loading and disposing of models for the ModelManager: the one loader thread per load, the CPU
fallback on a real out-of-memory error, abandoning (cancel, timeout), and handing memory back.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from simbridge.logs import get_logger
from simbridge.models._entry import Entry, Load, LoadContext, ModelSpec, SharedError
from simbridge.models.devices import is_out_of_memory, release_accelerator_memory
from simbridge.models.errors import (
    ModelError,
    ModelLoadCancelled,
    ModelLoadError,
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
        # Called under entry.cond with state UNLOADED: the one place where a load begins.
        spec = entry.spec
        device = spec.device.name
        if device == "auto":
            device = "cuda" if self._cuda_available() else "cpu"
        context = LoadContext(name=spec.name, device=device, cancelled=threading.Event())
        load = Load(context=context, deadline=time.monotonic() + spec.load_timeout)
        entry.load = load
        entry.state = ModelState.LOADING
        load.thread = threading.Thread(
            target=self._run_load,
            args=(entry, load, entry.zombie),
            name=f"simbridge-load-{spec.name}",
            daemon=True,  # a loader stuck in C code must not keep the process alive
        )
        load.thread.start()
        log.info("models.loading", model=spec.name, device=device)

    def _run_load(self, entry: Entry, load: Load, zombie: Load | None) -> None:
        spec = entry.spec
        if zombie is not None and zombie.thread is not None:
            zombie.thread.join(max(0.0, load.deadline - time.monotonic()))
            if zombie.thread.is_alive():
                self._finish(
                    entry,
                    load,
                    error=SharedError(
                        ModelLoadTimeout,
                        f"an abandoned earlier load of {spec.name!r} ignores cancellation and is "
                        "still running; a second copy is not started",
                        None,
                    ),
                )
                return
        if load.context.cancelled.is_set():
            # Abandoned while waiting for the earlier loader: never start the loader at all.
            self._finish(entry, load, error=SharedError(ModelLoadCancelled, "cancelled", None))
            return
        try:
            model, device = self._call_loader(entry, load)
        except ModelLoadCancelled as exc:
            self._finish(entry, load, error=SharedError(ModelLoadCancelled, str(exc), exc))
        except ModelOutOfMemory as exc:
            self._finish(entry, load, error=SharedError(ModelOutOfMemory, str(exc), exc.__cause__))
        except BaseException as exc:  # the loader's failure belongs to its waiters
            message = f"loading model {spec.name!r} failed: {type(exc).__name__}: {exc}"
            self._finish(entry, load, error=SharedError(ModelLoadError, message, exc))
        else:
            self._finish(entry, load, model=model, device=device)

    def _call_loader(self, entry: Entry, load: Load) -> tuple[Any, str]:
        spec, context = entry.spec, load.context
        with entry.cond:
            entry.loader_calls += 1
        try:
            return spec.loader(context), context.device
        except BaseException as exc:
            if not (context.device.startswith("cuda") and is_out_of_memory(exc)):
                raise
            if spec.device.explicit_cuda or not spec.cpu_fallback:
                why = "CUDA was asked for" if spec.device.explicit_cuda else "cpu_fallback is off"
                raise ModelOutOfMemory(
                    f"model {spec.name!r} ran out of GPU memory on {context.device} and {why}; "
                    "free GPU memory or register it with device='auto'"
                ) from exc
            log.warning("models.cpu_fallback", model=spec.name, device=context.device, error=str(exc))
        # The failed GPU attempt is gone before the CPU copy is built: never two copies at once.
        release_accelerator_memory()
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
        with entry.cond:
            load.done = True
            if entry.zombie is load:
                entry.zombie = None
            if load.abandoned:
                discard = model  # cancelled or timed out: its waiters have been told already
            elif error is not None:
                load.error = error
                entry.load = None
                entry.state = ModelState.UNLOADED
                entry.load_failures += 1
                self.metrics.observe_load(entry.spec.name, "error", seconds)
                log.warning("models.load_failed", model=entry.spec.name, error=error.message)
            else:
                entry.model, entry.device = model, device
                entry.load = None
                entry.state = ModelState.LOADED
                entry.loads += 1
                entry.last_load_seconds = seconds
                entry.last_used = time.monotonic()
                self.metrics.observe_load(entry.spec.name, "ok", seconds)
                log.info("models.loaded", model=entry.spec.name, device=device, seconds=seconds)
            self._publish(entry)
            entry.cond.notify_all()
        if discard is not None:
            self._dispose(entry.spec, discard, device)

    def _abandon(self, entry: Entry, load: Load, kind: type[ModelError], verb: str, outcome: str) -> None:
        # Under entry.cond. Python cannot stop a thread: the loader is told through its cancel
        # flag, its waiters fail now, and whatever it returns later is thrown away.
        load.abandoned = True
        load.context.cancelled.set()
        seconds = time.monotonic() - load.started
        load.error = SharedError(
            kind, f"loading model {entry.spec.name!r} {verb} after {seconds:.3g} s", None
        )
        entry.load = None
        entry.zombie = load
        entry.state = ModelState.UNLOADED
        entry.load_failures += 1
        self.metrics.observe_load(entry.spec.name, outcome, seconds)
        log.warning("models.load_abandoned", model=entry.spec.name, why=verb, seconds=seconds)
        self._publish(entry)
        entry.cond.notify_all()

    def _dispose(self, spec: ModelSpec, model: Any, device: str | None) -> None:
        if spec.unloader is not None:
            try:
                spec.unloader(model)
            except Exception as exc:  # an unloader's failure must not wedge the manager
                log.error("models.unloader_failed", model=spec.name, error=repr(exc))
        del model
        if device is not None and device.startswith("cuda"):
            release_accelerator_memory()

    def _publish(self, entry: Entry) -> None:
        self.metrics.set_occupancy(
            entry.spec.name,
            waiting=entry.waiting,
            active=entry.active,
            loaded=entry.state is ModelState.LOADED,
        )
