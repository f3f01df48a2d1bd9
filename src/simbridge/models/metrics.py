"""Model manager statistics: the ``stats()`` snapshot and its Prometheus metrics.

Prometheus (prometheus-client, the ``models`` extra) is optional: without it the counters in
``stats()`` still work and the metrics are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from simbridge.models.errors import InvalidModelOption


class ModelState(Enum):
    """Where a model is in its life; none is terminal (an unloaded model reloads on next use)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model's counters at the moment ``stats()`` was called; times in seconds."""

    name: str
    state: ModelState
    device: str | None
    loads: int
    loader_calls: int
    load_failures: int
    cpu_fallbacks: int
    unloads: int
    last_load_seconds: float | None
    active_users: int
    peak_active_users: int
    waiting: int
    max_concurrent: int
    requests: int
    access_timeouts: int
    wait_timeouts: int
    busy_rejections: int
    wait_seconds_total: float
    max_wait_seconds: float
    batches: int
    batched_items: int
    # True while a loader runs, including an abandoned one that has not returned yet.
    loader_running: bool = False
    use_out_of_memory: int = 0


_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
_WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ModelMetrics:
    """Prometheus metrics of one manager, in ``registry`` (a private one unless given)."""

    def __init__(self, registry: Any | None = None) -> None:
        try:
            import prometheus_client as prom
        except ImportError:  # pragma: no cover - the models extra brings it
            self.registry: Any | None = None
            self.enabled = False
            return
        self.enabled = True
        # A private registry by default, so that two managers in one process do not collide.
        self.registry = registry if registry is not None else prom.CollectorRegistry()
        try:
            self._build(prom, self.registry)
        except (ValueError, TypeError, AttributeError) as exc:
            # ValueError: "Duplicated timeseries" (a registry shared by two managers); the others:
            # something that is not a prometheus_client CollectorRegistry.
            raise InvalidModelOption(
                f"cannot register the model manager's metrics in {registry!r} ({exc}); give each "
                "ModelManager its own prometheus_client.CollectorRegistry (the default)"
            ) from exc

    def _build(self, prom: Any, reg: Any) -> None:
        self.load_seconds = prom.Histogram(
            "simbridge_model_load_seconds",
            "Time to load a model, by outcome (ok, error, timeout, cancelled).",
            ["model", "outcome"],
            buckets=_LOAD_BUCKETS,
            registry=reg,
        )
        self.wait_seconds = prom.Histogram(
            "simbridge_model_wait_seconds",
            "Time from use() to holding the model (load wait plus slot wait).",
            ["model"],
            buckets=_WAIT_BUCKETS,
            registry=reg,
        )
        self.queue_length = prom.Gauge(
            "simbridge_model_queue_length",
            "Callers waiting for a model (loading or all slots busy).",
            ["model"],
            registry=reg,
        )
        self.active_users = prom.Gauge(
            "simbridge_model_active_users", "Callers holding a model now.", ["model"], registry=reg
        )
        self.loaded = prom.Gauge(
            "simbridge_model_loaded", "1 while a model is loaded, else 0.", ["model"], registry=reg
        )
        self.requests = prom.Counter(
            "simbridge_model_requests",
            "use() calls, by outcome (ok, access_timeout, wait_timeout, busy, error).",
            ["model", "outcome"],
            registry=reg,
        )
        self.cpu_fallbacks = prom.Counter(
            "simbridge_model_cpu_fallbacks",
            "Loads that ran out of GPU memory and were loaded on the CPU instead.",
            ["model"],
            registry=reg,
        )
        self.batch_size = prom.Histogram(
            "simbridge_model_batch_size",
            "Items per model call made by dynamic batching.",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        )

    def observe_load(self, model: str, outcome: str, seconds: float) -> None:
        if self.enabled:
            self.load_seconds.labels(model, outcome).observe(seconds)

    def observe_request(self, model: str, outcome: str, waited: float | None) -> None:
        if self.enabled:
            self.requests.labels(model, outcome).inc()
            if waited is not None:
                self.wait_seconds.labels(model).observe(waited)

    def set_occupancy(self, model: str, *, waiting: int, active: int, loaded: bool) -> None:
        if self.enabled:
            self.queue_length.labels(model).set(waiting)
            self.active_users.labels(model).set(active)
            self.loaded.labels(model).set(1 if loaded else 0)

    def count_fallback(self, model: str) -> None:
        if self.enabled:
            self.cpu_fallbacks.labels(model).inc()

    def observe_batch(self, model: str, size: int) -> None:
        if self.enabled:
            self.batch_size.labels(model).observe(size)

    def exposition(self) -> bytes:
        """The metrics in Prometheus text format (empty without prometheus-client)."""
        if not self.enabled or self.registry is None:
            return b""
        import prometheus_client as prom

        return prom.generate_latest(self.registry)
