"""Fixtures of the model manager tests: a manager with short limits and a counting loader."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from simbridge.config import ModelSettings
from simbridge.models import LoadContext, ModelManager


@dataclass
class CountingLoader:
    """A real loader (it builds a small object) that counts calls and can be held at a gate."""

    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    running: int = 0
    peak_running: int = 0
    devices: list[str] = field(default_factory=list)
    fail_with: BaseException | None = None
    cooperative: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, ctx: LoadContext) -> dict[str, Any]:
        with self.lock:
            self.calls += 1
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            self.devices.append(ctx.device)
        self.started.set()
        try:
            while not self.gate.wait(0.01):
                if self.cooperative:
                    ctx.raise_if_cancelled()
            if self.fail_with is not None:
                raise self.fail_with
            return {"name": ctx.name, "device": ctx.device, "weights": list(range(1000))}
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def loader() -> CountingLoader:
    return CountingLoader()


@pytest.fixture
def open_loader() -> CountingLoader:
    ready = CountingLoader()
    ready.gate.set()
    return ready


@pytest.fixture
def manager() -> Iterator[ModelManager]:
    settings = ModelSettings(
        max_concurrent=2,
        access_timeout_s=5.0,
        wait_timeout_s=10.0,
        load_timeout_s=10.0,
    )
    with ModelManager(settings=settings, cuda_available=lambda: False) as built:
        yield built


def wait_until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds, failing with ``what`` after ``timeout`` (a fail-safe)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def until() -> Any:
    return wait_until
