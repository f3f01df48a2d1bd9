"""The original ModelManager scenarios: limits, queueing while loading, timeouts, stats, cancel,
stress, config update and the one-load-per-process singleton under concurrency."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from tests.unit.models.conftest import wait_until

from simbridge.errors import SimbridgeError
from simbridge.models import (
    InvalidModelOption,
    ModelAccessTimeout,
    ModelAlreadyRegistered,
    ModelBusy,
    ModelError,
    ModelLoadCancelled,
    ModelLoadError,
    ModelLoadTimeout,
    ModelManager,
    ModelState,
    ModelWaitTimeout,
    UnknownModel,
)


def test_within_limit_callers_use_the_model_together(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=3)
    inside = threading.Barrier(3, timeout=20)
    seen = []

    def user() -> None:
        with manager.use("m") as model:
            seen.append(model)
            inside.wait()  # all three are inside at once, or this breaks

    threads = [threading.Thread(target=user) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(seen) == 3 and all(model is seen[0] for model in seen)
    stats = manager.stats()["m"]
    assert stats.peak_active_users == 3
    assert stats.active_users == 0
    assert stats.loads == 1


def test_over_limit_caller_times_out_or_is_refused(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=1, max_waiting=1)
    with manager.use("m"):
        with pytest.raises(ModelAccessTimeout, match="1 slots"), manager.use("m", access_timeout=0):
            pass
        # One caller waits; with the line full the next is refused at once.
        waiter_in_line = threading.Event()

        def patient() -> None:
            waiter_in_line.set()
            with manager.use("m", access_timeout=20):
                pass

        thread = threading.Thread(target=patient)
        thread.start()
        waiter_in_line.wait(10)
        _wait_for_waiting(manager, "m", 1)
        with pytest.raises(ModelBusy, match="max_waiting=1"), manager.use("m"):
            pass
    thread.join(timeout=30)
    stats = manager.stats()["m"]
    assert stats.busy_rejections == 1
    assert stats.access_timeouts == 1


def test_callers_queue_while_loading_and_share_one_copy(manager: ModelManager, loader: Any) -> None:
    manager.register("m", loader, max_concurrent=20)
    results: list[Any] = []
    with ThreadPoolExecutor(10) as pool:
        futures = [pool.submit(_use_once, manager, "m") for _ in range(10)]
        loader.started.wait(10)
        _wait_for_waiting(manager, "m", 10)
        assert manager.stats()["m"].state is ModelState.LOADING
        loader.gate.set()
        results = [f.result(timeout=30) for f in futures]
    assert loader.calls == 1
    assert all(r is results[0] for r in results)


def test_access_timeout(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=1, access_timeout=0.2)
    with manager.use("m"), pytest.raises(ModelAccessTimeout) as caught, manager.use("m"):
        pass
    assert isinstance(caught.value, TimeoutError)
    assert "0.2 s" in str(caught.value)
    assert manager.stats()["m"].access_timeouts == 1


def test_loading_timeout_abandons_the_load_and_the_next_use_reloads(
    manager: ModelManager, loader: Any
) -> None:
    manager.register("m", loader, load_timeout=0.2)
    with pytest.raises(ModelLoadTimeout, match="timed out"), manager.use("m"):
        pass
    # The loader was told (it polls ctx.cancelled) and is not called twice at once.
    loader.gate.set()
    with manager.use("m") as model:
        assert model["name"] == "m"
    assert loader.peak_running == 1
    stats = manager.stats()["m"]
    assert stats.loads == 1
    assert stats.load_failures == 1


def test_wait_timeout_leaves_the_load_running(manager: ModelManager, loader: Any) -> None:
    manager.register("m", loader, wait_timeout=0.1)
    with pytest.raises(ModelWaitTimeout, match="still loading"), manager.use("m"):
        pass
    loader.gate.set()
    assert manager.load("m", timeout=20) == "cpu"
    assert loader.calls == 1
    assert manager.stats()["m"].wait_timeouts == 1


def test_stats_count_what_happened(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader)
    for _ in range(5):
        with manager.use("m"):
            pass
    stats = manager.stats()["m"]
    assert stats.state is ModelState.LOADED
    assert stats.device == "cpu"
    assert (stats.loads, stats.loader_calls, stats.requests) == (1, 1, 5)
    assert stats.active_users == 0 and stats.waiting == 0
    assert stats.last_load_seconds is not None and stats.last_load_seconds >= 0
    assert stats.wait_seconds_total >= stats.max_wait_seconds >= 0
    assert stats.max_concurrent == 2


def test_cancel_loading_fails_its_waiters_and_a_fresh_load_follows(
    manager: ModelManager, loader: Any
) -> None:
    manager.register("m", loader)
    assert manager.cancel_loading("m") is False  # nothing loading yet
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_use_once, manager, "m") for _ in range(4)]
        loader.started.wait(10)
        _wait_for_waiting(manager, "m", 4)
        assert manager.cancel_loading("m") is True
        for future in futures:
            with pytest.raises(ModelLoadCancelled):
                future.result(timeout=30)
    assert manager.stats()["m"].state is ModelState.UNLOADED
    loader.gate.set()
    with manager.use("m") as model:
        assert model["name"] == "m"
    assert loader.calls == 2
    assert loader.peak_running == 1


def test_stress_many_threads_never_exceed_the_limit(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=4, access_timeout=60)
    lock = threading.Lock()
    inside = 0
    peak = 0

    def work(_: int) -> None:
        nonlocal inside, peak
        for _ in range(50):
            with manager.use("m"):
                with lock:
                    inside += 1
                    peak = max(peak, inside)
                with lock:
                    inside -= 1

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(work, range(32)))
    stats = manager.stats()["m"]
    assert peak <= 4
    assert stats.peak_active_users <= 4
    assert stats.requests == 32 * 50
    assert stats.loads == 1 and open_loader.calls == 1
    assert stats.active_users == 0 and stats.waiting == 0


def test_config_update_takes_effect_for_waiters(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=1, access_timeout=30)
    entered = threading.Event()

    def second() -> None:
        with manager.use("m"):
            entered.set()

    with manager.use("m"):
        thread = threading.Thread(target=second)
        thread.start()
        _wait_for_waiting(manager, "m", 1)
        assert not entered.is_set()
        manager.update("m", max_concurrent=2)
        assert entered.wait(20), "raising max_concurrent did not let the waiter in"
    thread.join(timeout=30)
    assert manager.stats()["m"].max_concurrent == 2
    with pytest.raises(InvalidModelOption, match="max_concurrent"):
        manager.update("m", max_concurrent=0)
    with pytest.raises(InvalidModelOption, match="loader"):
        manager.update("m", loader=open_loader)


def test_singleton_under_concurrency(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=64)
    start = threading.Barrier(64, timeout=20)

    def racer(_: int) -> int:
        start.wait()
        with manager.use("m") as model:
            return id(model)

    with ThreadPoolExecutor(64) as pool:
        ids = set(pool.map(racer, range(64)))
    assert open_loader.calls == 1
    assert len(ids) == 1
    assert manager.stats()["m"].loads == 1


def test_waiters_share_the_load_error_and_the_next_use_retries(manager: ModelManager, loader: Any) -> None:
    cause = ValueError("weights file is corrupt")
    loader.fail_with = cause
    manager.register("m", loader)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_use_once, manager, "m") for _ in range(8)]
        loader.started.wait(10)
        _wait_for_waiting(manager, "m", 8)
        loader.gate.set()
        errors = [f.exception(timeout=30) for f in futures]
    assert loader.calls == 1
    for error in errors:
        assert isinstance(error, ModelLoadError)
        assert "weights file is corrupt" in str(error)
        assert error.__cause__ is cause
    assert len({id(e) for e in errors}) == 8  # one fresh exception per waiter
    loader.fail_with = None
    with manager.use("m") as model:
        assert model["name"] == "m"
    assert loader.calls == 2


def test_registration_errors(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader)
    with pytest.raises(ModelAlreadyRegistered):
        manager.register("m", open_loader)
    with pytest.raises(UnknownModel, match="registered: m") as caught, manager.use("nope"):
        pass
    assert isinstance(caught.value, LookupError)
    assert isinstance(caught.value, ModelError) and isinstance(caught.value, SimbridgeError)
    with pytest.raises(InvalidModelOption, match="device"):
        manager.register("x", open_loader, device="tpu")
    with pytest.raises(InvalidModelOption, match="idle_unload"):
        manager.register("y", open_loader, idle_unload=0)
    assert manager.names() == ["m"]


def _use_once(manager: ModelManager, name: str) -> Any:
    with manager.use(name) as model:
        return model


def _wait_for_waiting(manager: ModelManager, name: str, count: int) -> None:
    # Polls with a named deadline: the manager has no event for "a caller joined the line".
    wait_until(lambda: manager.stats()[name].waiting >= count, f"{count} waiters queued for {name}")


def test_a_loader_ignoring_cancel_is_never_run_twice_at_once(manager: ModelManager, loader: Any) -> None:
    loader.cooperative = False  # e.g. a framework call that cannot be interrupted
    manager.register("m", loader, wait_timeout=30)
    first = ThreadPoolExecutor(1).submit(manager.load, "m")
    loader.started.wait(10)
    assert manager.cancel_loading("m")
    assert isinstance(first.exception(timeout=30), ModelLoadCancelled)
    # A new request starts a new load, which first waits for the abandoned loader to return.
    second = ThreadPoolExecutor(1).submit(_use_once, manager, "m")
    _wait_for_waiting(manager, "m", 1)
    assert loader.calls == 1
    # Cancelling the waiting load means its loader is never called at all.
    assert manager.cancel_loading("m")
    with pytest.raises(ModelLoadCancelled):
        second.result(timeout=30)
    third = ThreadPoolExecutor(1).submit(_use_once, manager, "m")
    _wait_for_waiting(manager, "m", 1)
    loader.gate.set()
    assert third.result(timeout=30)["name"] == "m"
    assert loader.calls == 2  # the abandoned one (result thrown away) and the one in use
    assert loader.peak_running == 1
    assert manager.stats()["m"].loads == 1


def test_infinite_timeouts_are_accepted(manager: ModelManager, loader: Any) -> None:
    manager.register("m", loader, max_concurrent=1)
    waiter = ThreadPoolExecutor(1).submit(
        lambda: _use_with(manager, "m", access_timeout=math.inf, wait_timeout=math.inf)
    )
    _wait_for_waiting(manager, "m", 1)
    loader.gate.set()
    assert waiter.result(timeout=30)["name"] == "m"


def _use_with(manager: ModelManager, name: str, **timeouts: float) -> Any:
    with manager.use(name, **timeouts) as model:
        return model


def test_slots_are_handed_out_in_arrival_order(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=1, access_timeout=60)
    order: list[int] = []
    threads = []
    with manager.use("m"):
        for n in range(6):
            thread = threading.Thread(target=_use_and_note, args=(manager, n, order))
            thread.start()
            threads.append(thread)
            _wait_for_waiting(manager, "m", n + 1)
    for thread in threads:
        thread.join(timeout=30)
    assert order == [0, 1, 2, 3, 4, 5]


def test_a_caller_giving_up_does_not_block_the_line(manager: ModelManager, open_loader: Any) -> None:
    manager.register("m", open_loader, max_concurrent=1, access_timeout=60)
    order: list[int] = []
    with manager.use("m"):
        quitter = ThreadPoolExecutor(1).submit(_use_with, manager, "m", access_timeout=0.2)
        _wait_for_waiting(manager, "m", 1)
        patient = threading.Thread(target=_use_and_note, args=(manager, 1, order))
        patient.start()
        assert isinstance(quitter.exception(timeout=30), ModelAccessTimeout)
    patient.join(timeout=30)
    assert order == [1]


def _use_and_note(manager: ModelManager, tag: int, order: list[int]) -> None:
    with manager.use("m"):
        order.append(tag)
