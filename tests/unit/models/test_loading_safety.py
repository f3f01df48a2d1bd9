"""Never two copies of a model being built, whatever sequence of loads, cancels and timeouts came
before; and nothing slow (the device probe that imports torch) under a lock a caller needs."""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from simbridge.config import ModelSettings
from simbridge.models import (
    ModelLoadCancelled,
    ModelLoaderStillRunning,
    ModelLoadTimeout,
    ModelManager,
    ModelState,
    ModelWaitTimeout,
)

# A fail-safe against a hang, never a measurement: a correct run finishes each of these waits
# in milliseconds; only a regression (a caller stuck behind a lock or a loader) reaches it.
HANG_S = 20.0


def _load_in_thread(pool: ThreadPoolExecutor, manager: ModelManager, timeout: float = 60) -> Future[str]:
    return pool.submit(manager.load, "m", timeout=timeout)


def test_two_cancels_never_let_a_second_copy_be_built(manager: ModelManager, loader: Any, until: Any) -> None:
    # The loader ignores its cancel flag (e.g. a framework call that cannot be interrupted).
    loader.cooperative = False
    manager.register("m", loader, load_timeout=30)
    with ThreadPoolExecutor(4) as pool:
        first = _load_in_thread(pool, manager)
        assert loader.started.wait(HANG_S)
        assert manager.cancel_loading("m")
        assert isinstance(first.exception(timeout=HANG_S), ModelLoadCancelled)
        # A second load (short limit) queues behind the abandoned loader and is cancelled too,
        # while the first loader still runs.
        manager.update("m", load_timeout=0.3)
        second = _load_in_thread(pool, manager)
        until(lambda: manager.stats()["m"].state is ModelState.LOADING, "the second load")
        assert manager.cancel_loading("m")
        assert isinstance(second.exception(timeout=HANG_S), ModelLoadCancelled)
        # The third load must still wait for the FIRST loader, which has not returned. (Before
        # the fix it waited only for the second load's thread, gone 0.3 s after it started, and
        # then called the loader while the first was still building.)
        manager.update("m", load_timeout=1.0)
        third = _load_in_thread(pool, manager)
        error = third.exception(timeout=HANG_S)
        assert isinstance(error, ModelLoaderStillRunning), error
        assert isinstance(error, ModelLoadTimeout) and isinstance(error, TimeoutError)
        assert "earlier, abandoned loader" in str(error)
        assert loader.calls == 1
        assert manager.stats()["m"].loader_running
        # Once the first loader returns (its copy thrown away), a load goes through.
        manager.update("m", load_timeout=30)
        loader.gate.set()
        assert manager.load("m", timeout=HANG_S) == "cpu"
    assert loader.calls == 2
    assert loader.peak_running == 1
    stats = manager.stats()["m"]
    assert (stats.loads, stats.loader_running) == (1, False)


def test_a_new_load_waits_for_the_abandoned_loader_then_builds(
    manager: ModelManager, loader: Any, until: Any
) -> None:
    loader.cooperative = False
    manager.register("m", loader, load_timeout=60)
    with ThreadPoolExecutor(2) as pool:
        first = _load_in_thread(pool, manager)
        assert loader.started.wait(HANG_S)
        assert manager.cancel_loading("m")
        assert isinstance(first.exception(timeout=HANG_S), ModelLoadCancelled)
        second = _load_in_thread(pool, manager)
        until(
            lambda: manager.stats()["m"].loader_running and manager.stats()["m"].state is ModelState.LOADING,
            "the second load",
        )
        loader.gate.set()  # the abandoned loader returns; only then does the second one start
        assert second.result(timeout=HANG_S) == "cpu"
    assert loader.calls == 2 and loader.peak_running == 1


def test_a_slow_device_probe_holds_up_no_other_caller(open_loader: Any) -> None:
    """The probe stands in for the first ``import torch`` plus driver probing (1-2 s for real):
    it blocks on an event the test controls, and every other caller must get its answer while
    it is still blocked, decided by event order, not by a clock."""
    probe_entered, probe_release = threading.Event(), threading.Event()

    def slow_probe() -> bool:
        probe_entered.set()
        probe_release.wait(60)
        return False

    settings = ModelSettings(wait_timeout_s=60, load_timeout_s=60)
    with ModelManager(settings=settings, cuda_available=slow_probe) as manager, ThreadPoolExecutor(4) as pool:
        manager.register("m", open_loader, device="auto")
        first = _load_in_thread(pool, manager)
        assert probe_entered.wait(HANG_S)
        waiter = pool.submit(_use_once, manager, 0.3)
        # Before the fix the probe ran under the model's lock: this waiter could not even
        # start waiting until the probe returned, and its 0.3 s became the probe's duration.
        assert isinstance(waiter.exception(timeout=HANG_S), ModelWaitTimeout)
        stats = pool.submit(manager.stats).result(timeout=HANG_S)["m"]
        assert stats.state is ModelState.LOADING
        assert pool.submit(manager.cancel_loading, "m").result(timeout=HANG_S) is True
        assert not probe_release.is_set(), "the callers above were answered while the probe ran"
        probe_release.set()
        assert isinstance(first.exception(timeout=HANG_S), ModelLoadCancelled)
        assert open_loader.calls == 0  # cancelled while probing: the loader never ran
        assert manager.load("m", timeout=HANG_S) == "cpu"


def test_a_failing_device_probe_degrades_auto_to_the_cpu(open_loader: Any) -> None:
    def broken_probe() -> bool:
        raise OSError("libcuda.so.1: cannot open shared object file")

    with ModelManager(settings=ModelSettings(), cuda_available=broken_probe) as manager:
        manager.register("m", open_loader, device="auto")
        assert manager.load("m", timeout=HANG_S) == "cpu"
    assert open_loader.devices == ["cpu"]


def _use_once(manager: ModelManager, wait_timeout: float) -> Any:
    with manager.use("m", wait_timeout=wait_timeout) as model:
        return model


@pytest.mark.parametrize("cooperative", [True, False])
def test_timeouts_of_loads_queued_behind_a_hung_loader_are_bounded(
    manager: ModelManager, loader: Any, cooperative: bool
) -> None:
    loader.cooperative = cooperative
    manager.register("m", loader, load_timeout=0.2, wait_timeout=30)
    with ThreadPoolExecutor(4) as pool:
        outcomes = [_load_in_thread(pool, manager).exception(timeout=HANG_S) for _ in range(3)]
    assert all(isinstance(error, ModelLoadTimeout) for error in outcomes), outcomes
    loader.gate.set()
    assert loader.peak_running == 1
