"""Dynamic batching: concurrent single items coalesced into model calls, results routed back."""

from __future__ import annotations

import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from simbridge.models import (
    BatchError,
    InvalidModelOption,
    ModelLoadCancelled,
    ModelManager,
    ModelManagerClosed,
    ModelState,
    ModelWaitTimeout,
)


class Doubler:
    """A tiny real model: doubles numbers, and remembers the size of every call it served."""

    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.lock = threading.Lock()

    def run(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batch_sizes.append(len(items))
        return [2 * item for item in items]


def test_concurrent_items_are_coalesced_and_routed_back(manager: ModelManager) -> None:
    model = Doubler()
    manager.register("double", lambda ctx: model)
    batcher = manager.batched("double", lambda m, items: m.run(items), max_batch_size=16, max_wait_ms=20)
    start = threading.Barrier(48, timeout=20)

    def caller(n: int) -> list[tuple[int, int]]:
        start.wait()
        return [(n * 100 + k, batcher(n * 100 + k)) for k in range(20)]

    with ThreadPoolExecutor(48) as pool:
        answers = [pair for pairs in pool.map(caller, range(48)) for pair in pairs]
    assert all(result == 2 * item for item, result in answers)
    assert len(answers) == 48 * 20
    assert sum(model.batch_sizes) == 48 * 20
    assert max(model.batch_sizes) <= 16
    assert len(model.batch_sizes) < 48 * 20 / 2, "items were not coalesced"
    stats = manager.stats()["double"]
    assert stats.batched_items == 48 * 20
    assert stats.batches == len(model.batch_sizes)


def test_a_batch_of_one_goes_out_after_max_wait(manager: ModelManager) -> None:
    model = Doubler()
    manager.register("double", lambda ctx: model)
    with manager.batched("double", lambda m, items: m.run(items), 64, 1) as batcher:
        assert batcher.submit(21, timeout=20) == 42
    assert model.batch_sizes == [1]


def test_a_failing_batch_fails_each_of_its_callers(manager: ModelManager) -> None:
    def broken(model: Any, items: list[int]) -> list[int]:
        raise ZeroDivisionError("model blew up")

    manager.register("m", lambda ctx: object())
    with manager.batched("m", broken, 8, 5) as batcher:
        futures = [batcher.future(n) for n in range(5)]
        for future in futures:
            with pytest.raises(ZeroDivisionError, match="blew up"):
                future.result(timeout=20)
        # The batcher survives a failed batch.
        assert manager.stats()["m"].active_users == 0


def test_wrong_number_of_results_is_a_batch_error(manager: ModelManager) -> None:
    manager.register("m", lambda ctx: object())
    with manager.batched("m", lambda model, items: items[:-1], 8, 5) as batcher:
        futures = [batcher.future(n) for n in range(3)]
        for future in futures:
            error = future.exception(timeout=20)
            assert isinstance(error, BatchError)
            assert "one per item" in str(error)


def test_closed_batcher_refuses_and_bad_options(manager: ModelManager) -> None:
    manager.register("m", lambda ctx: Doubler())
    batcher = manager.batched("m", lambda m, items: m.run(items), 4, 1)
    assert batcher(1) == 2
    batcher.close()
    batcher.close()
    with pytest.raises(ModelManagerClosed):
        batcher(1)
    with pytest.raises(InvalidModelOption):
        manager.batched("m", lambda m, items: items, 0, 1)


def test_shutdown_closes_batchers(open_loader: Any) -> None:
    manager = ModelManager(cuda_available=lambda: False)
    manager.register("m", lambda ctx: Doubler(), device="cpu")
    batcher = manager.batched("m", lambda m, items: m.run(items))
    assert batcher(5) == 10
    manager.shutdown()
    with pytest.raises(ModelManagerClosed):
        batcher(5)


def test_a_caller_never_waits_forever_for_its_batch(manager: ModelManager) -> None:
    gate = threading.Event()

    def slow(model: Any, items: list[int]) -> list[int]:
        gate.wait(20)
        return items

    manager.register("m", lambda ctx: object())
    with manager.batched("m", slow, 1, 0) as batcher:
        first = batcher.future(1)  # occupies the model call until the gate opens
        with pytest.raises(ModelWaitTimeout, match=r"within 0\.2 s"):
            batcher.submit(2, timeout=0.2)
        gate.set()
        assert first.result(timeout=20) == 1


def test_several_workers_route_every_result_to_its_caller(manager: ModelManager) -> None:
    model = Doubler()
    manager.register("double", lambda ctx: model, max_concurrent=4)
    with (
        manager.batched("double", lambda m, items: m.run(items), 8, 2, workers=3) as batcher,
        ThreadPoolExecutor(24) as pool,
    ):
        answers = list(pool.map(lambda n: (n, batcher(n)), range(600)))
    assert all(result == 2 * n for n, result in answers)
    assert sum(model.batch_sizes) == 600
    assert max(model.batch_sizes) <= 8
    assert manager.stats()["double"].peak_active_users <= 3


def test_shutdown_drains_a_batch_waiting_for_a_load_only_within_its_bound(loader: Any) -> None:
    manager = ModelManager(cuda_available=lambda: False)
    manager.register("slow", loader, device="cpu")
    batcher = manager.batched("slow", lambda m, items: items, 4, 1)
    pending = batcher.future(1)
    loader.started.wait(10)  # the batch worker now waits for the load
    manager.shutdown(timeout=0.3)  # the bound passes: the load is cancelled, the item fails
    error = pending.exception(timeout=20)
    assert isinstance(error, (ModelManagerClosed, ModelLoadCancelled))
    loader.gate.set()


def test_shutdown_finishes_the_items_a_batcher_had_accepted(manager: ModelManager, until: Any) -> None:
    inside, gate = threading.Event(), threading.Event()

    def slow_double(model: Any, items: list[int]) -> list[int]:
        inside.set()
        assert gate.wait(20)
        return [2 * item for item in items]

    manager.register("m", lambda ctx: object())
    batcher = manager.batched("m", slow_double, 1, 0)
    futures = [batcher.future(n) for n in range(4)]  # one in the model, three queued behind
    assert inside.wait(20)
    stopper = threading.Thread(target=manager.shutdown, kwargs={"timeout": 60})
    stopper.start()
    until(lambda: manager.closed, "shutdown to begin")
    with pytest.raises(ModelManagerClosed):
        batcher.future(99)  # nothing new is accepted
    gate.set()
    # Before the fix the three queued items failed with ModelManagerClosed.
    assert [future.result(timeout=20) for future in futures] == [0, 2, 4, 6]
    stopper.join(timeout=30)
    assert not stopper.is_alive()
    assert manager.stats()["m"].state is ModelState.UNLOADED


def test_close_fails_items_no_batch_started_once_its_bound_passes(manager: ModelManager) -> None:
    inside, gate = threading.Event(), threading.Event()

    def stuck(model: Any, items: list[int]) -> list[int]:
        inside.set()
        assert gate.wait(20)
        return items

    manager.register("m", lambda ctx: object())
    batcher = manager.batched("m", stuck, 1, 0)
    running = batcher.future(1)
    assert inside.wait(20)
    queued = [batcher.future(n) for n in range(2, 5)]
    batcher.close(timeout=0.1)  # the batch under way cannot finish within the bound
    for future in queued:
        # Before the fix these waited forever (until each caller's own timeout).
        assert isinstance(future.exception(timeout=20), ModelManagerClosed)
    gate.set()
    assert running.result(timeout=20) == 1
    batcher.close(timeout=20)
    assert not any(thread.is_alive() for thread in _batcher_threads("m"))


def test_batched_after_shutdown_starts_no_worker(open_loader: Any) -> None:
    manager = ModelManager(cuda_available=lambda: False)
    manager.register("late", open_loader, device="cpu")
    manager.shutdown()
    with pytest.raises(ModelManagerClosed):
        manager.batched("late", lambda m, items: items, 4, 1, workers=3)
    # Before the fix three workers were left blocked on an empty queue for good.
    assert _batcher_threads("late") == []


def test_a_closed_batcher_is_not_kept_by_its_manager(manager: ModelManager, until: Any) -> None:
    manager.register("m", lambda ctx: Doubler())
    batcher = manager.batched("m", lambda m, items: m.run(items), 4, 1)
    assert batcher(3) == 6
    batcher.close(timeout=20)
    gone = weakref.ref(batcher)
    del batcher
    gc.collect()
    assert gone() is None, "the manager still holds a closed batcher"
    with manager.batched("m", lambda m, items: m.run(items), 4, 1) as again:
        assert again(4) == 8


def _batcher_threads(name: str) -> list[threading.Thread]:
    prefix = f"simbridge-batcher-{name}-"
    return [
        thread for thread in threading.enumerate() if thread.name.startswith(prefix) and thread.is_alive()
    ]
