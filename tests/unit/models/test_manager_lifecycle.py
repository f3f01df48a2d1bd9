"""ModelManager beyond the original: CPU fallback only on a real OOM, idle unload and reload,
shutdown, and the Prometheus metrics."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from simbridge.config import ModelSettings
from simbridge.errors import SimbridgeError
from simbridge.models import (
    LoadContext,
    ModelLoadError,
    ModelManager,
    ModelManagerClosed,
    ModelOutOfMemory,
    ModelState,
    ModelUseOutOfMemory,
    is_out_of_memory,
)


class FakeGpuLoader:
    """A FAKE GPU (there is none here): on a 'cuda' device it fails as torch does when the board is
    full, raising torch's real OutOfMemoryError; on the CPU it builds the model for real."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error or torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.30 GiB")
        self.devices: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, ctx: LoadContext) -> torch.nn.Module:
        with self.lock:
            self.devices.append(ctx.device)
        if ctx.device.startswith("cuda"):
            raise self.error
        return torch.nn.Linear(8, 4)


def _manager(**settings: Any) -> ModelManager:
    # cuda_available is the fake GPU's other half: 'auto' resolves to CUDA as on a GPU machine.
    return ModelManager(settings=ModelSettings(**settings), cuda_available=lambda: True)


def test_auto_device_falls_back_to_cpu_on_a_real_oom_once() -> None:
    fake = FakeGpuLoader()
    with _manager() as manager:
        manager.register("emb", fake, device="auto")
        start = threading.Barrier(16, timeout=20)

        def user() -> int:
            start.wait()
            with manager.use("emb") as model:
                return id(model)

        threads_ids: list[int] = []
        threads = [threading.Thread(target=lambda: threads_ids.append(user())) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        stats = manager.stats()["emb"]
    assert fake.devices == ["cuda", "cpu"]  # one GPU try, one CPU load: never a second copy
    assert len(set(threads_ids)) == 1 and len(threads_ids) == 16
    assert stats.device == "cpu"
    assert (stats.loads, stats.loader_calls, stats.cpu_fallbacks) == (1, 2, 1)


def test_explicit_cuda_never_falls_back() -> None:
    fake = FakeGpuLoader()
    with _manager() as manager:
        manager.register("emb", fake, device="cuda:0")
        with pytest.raises(ModelOutOfMemory, match="CUDA was asked for") as caught:
            manager.load("emb")
    assert fake.devices == ["cuda:0"]
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert isinstance(caught.value, MemoryError) and isinstance(caught.value, ModelLoadError)


def test_fallback_can_be_switched_off() -> None:
    fake = FakeGpuLoader()
    with _manager(cpu_fallback=False) as manager:
        manager.register("emb", fake)
        with pytest.raises(ModelOutOfMemory, match="cpu_fallback is off"):
            manager.load("emb")
    assert fake.devices == ["cuda"]


def test_other_errors_on_the_gpu_do_not_fall_back() -> None:
    fake = FakeGpuLoader(error=RuntimeError("CUDA error: an illegal memory access was encountered"))
    with _manager() as manager:
        manager.register("emb", fake)
        with pytest.raises(ModelLoadError, match="illegal memory access"):
            manager.load("emb")
        assert manager.stats()["emb"].cpu_fallbacks == 0
    assert fake.devices == ["cuda"]


def test_out_of_memory_recognition() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    # Only the exception itself counts: neither what it was raised from nor what it was handling.
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise ValueError("while loading layer 3") from inner
    except ValueError as wrapped:
        assert not is_out_of_memory(wrapped)
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise KeyError("a bug in the OOM handler") from None
    except KeyError as unrelated:
        assert unrelated.__context__ is not None
        assert not is_out_of_memory(unrelated)
    # A wrapper quoting an OOM in its own message is not one either.
    assert not is_out_of_memory(ValueError("CUDA out of memory"))
    assert not is_out_of_memory(RuntimeError("layer 3: CUDA out of memory"))
    assert not is_out_of_memory(MemoryError())  # host RAM: the CPU is no way out of that
    assert not is_out_of_memory(RuntimeError("shape mismatch"))

    class BoardFull(Exception):
        pass

    assert is_out_of_memory(BoardFull(), (BoardFull,))
    assert not is_out_of_memory(BoardFull())


def test_idle_model_is_unloaded_and_reloaded_on_next_use(until: Any) -> None:
    unloaded: list[Any] = []
    loads: list[str] = []

    def loader(ctx: LoadContext) -> dict[str, int]:
        loads.append(ctx.device)
        return {"generation": len(loads)}

    with ModelManager(settings=ModelSettings(idle_unload_s=0.2)) as manager:
        manager.register("m", loader, device="cpu", unloader=unloaded.append)
        with manager.use("m") as first:
            assert first == {"generation": 1}
        until(lambda: manager.stats()["m"].state is ModelState.UNLOADED, "the idle unload")
        assert unloaded == [{"generation": 1}]
        with manager.use("m") as second:
            assert second == {"generation": 2}
        stats = manager.stats()["m"]
    assert (stats.loads, stats.unloads) == (2, 1)


def test_never_unloaded_while_in_use(until: Any) -> None:
    unloaded: list[Any] = []
    with ModelManager(settings=ModelSettings(idle_unload_s=0.1)) as manager:
        manager.register("m", lambda ctx: object(), device="cpu", unloader=unloaded.append)
        # A witness model, used after "m" was taken, shows idle passes of the housekeeper: once
        # it was unloaded twice, "m" has been idle-eligible (but held) for at least one pass.
        witness_gone = threading.Semaphore(0)
        manager.register(
            "witness", lambda ctx: object(), device="cpu", unloader=lambda _: witness_gone.release()
        )
        with manager.use("m"):
            for _ in range(2):
                manager.load("witness")
                assert witness_gone.acquire(timeout=20), "the housekeeper never unloaded the witness"
            assert manager.stats()["m"].state is ModelState.LOADED
            assert unloaded == []
        until(lambda: len(unloaded) == 1, "the unload after the last user left")


def test_shutdown_unloads_refuses_and_cancels(loader: Any, open_loader: Any) -> None:
    unloaded: list[Any] = []
    manager = ModelManager(settings=ModelSettings())
    manager.register("ready", open_loader, device="cpu", unloader=unloaded.append)
    manager.register("slow", loader, device="cpu")
    manager.load("ready")
    outcome: list[BaseException] = []

    def wait_for_slow() -> None:
        try:
            manager.load("slow")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait_for_slow)
    thread.start()
    loader.started.wait(10)
    manager.shutdown(timeout=5)
    thread.join(timeout=30)
    assert len(unloaded) == 1
    assert manager.stats()["ready"].state is ModelState.UNLOADED
    assert outcome and "cancelled by shutdown" in str(outcome[0])
    with pytest.raises(ModelManagerClosed), manager.use("ready"):
        pass
    manager.shutdown()  # idempotent


def test_shutdown_waits_for_users_then_unloads(open_loader: Any, until: Any) -> None:
    unloaded: list[Any] = []
    manager = ModelManager(settings=ModelSettings())
    manager.register("m", open_loader, device="cpu", unloader=unloaded.append)
    release = threading.Event()

    def user() -> None:
        with manager.use("m"):
            release.wait(20)

    thread = threading.Thread(target=user)
    thread.start()
    until(lambda: manager.stats()["m"].active_users == 1, "the user to hold the model")
    manager.shutdown(timeout=0.1)  # the user still holds it: not unloaded under its feet
    assert unloaded == []
    release.set()
    thread.join(timeout=30)
    until(lambda: len(unloaded) == 1, "the unload when the last user left")


def test_prometheus_metrics(loader: Any, until: Any) -> None:
    with ModelManager(settings=ModelSettings()) as manager:
        manager.register("emb", loader, device="cpu")
        threads = [threading.Thread(target=manager.load, args=("emb",)) for _ in range(3)]
        for thread in threads:
            thread.start()
        until(lambda: manager.stats()["emb"].waiting == 3, "three queued callers")
        text = manager.metrics.exposition().decode()
        assert 'simbridge_model_queue_length{model="emb"} 3.0' in text
        loader.gate.set()
        for thread in threads:
            thread.join(timeout=30)
        with manager.use("emb"):
            text = manager.metrics.exposition().decode()
            assert 'simbridge_model_active_users{model="emb"} 1.0' in text
        text = manager.metrics.exposition().decode()
    assert 'simbridge_model_load_seconds_count{model="emb",outcome="ok"} 1.0' in text
    assert 'simbridge_model_requests_total{model="emb",outcome="ok"} 1.0' in text
    assert 'simbridge_model_wait_seconds_count{model="emb"} 1.0' in text
    assert 'simbridge_model_loaded{model="emb"} 1.0' in text
    assert 'simbridge_model_queue_length{model="emb"} 0.0' in text


def test_default_manager_is_one_per_process_until_shut_down() -> None:
    from simbridge.models import default_manager

    first = default_manager()
    assert default_manager() is first
    first.shutdown()
    assert first.closed
    second = default_manager()
    assert second is not first and not second.closed
    second.shutdown()


def test_an_error_raised_while_handling_an_oom_does_not_fall_back() -> None:
    class HandlerBug(FakeGpuLoader):
        def __call__(self, ctx: LoadContext) -> torch.nn.Module:
            try:
                return super().__call__(ctx)
            except torch.OutOfMemoryError:
                # A bug in the loader's own OOM handling: unrelated, but its __context__ is the OOM.
                raise KeyError("layer_3.weight") from None

    fake = HandlerBug()
    with _manager() as manager:
        manager.register("emb", fake)
        with pytest.raises(ModelLoadError, match=r"layer_3\.weight") as caught:
            manager.load("emb")
        assert manager.stats()["emb"].cpu_fallbacks == 0
    assert fake.devices == ["cuda"]  # before the fix: ["cuda", "cpu"], the bug hidden by a fallback
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_configured_oom_class_falls_back() -> None:
    class BoardFull(Exception):
        """What a non-torch framework raises when the GPU is full."""

    fake = FakeGpuLoader(error=BoardFull("no room on the board"))
    with _manager() as manager:
        manager.register("emb", fake, oom_errors=(BoardFull,))
        assert manager.load("emb") == "cpu"
    assert fake.devices == ["cuda", "cpu"]


def test_an_oom_in_use_is_typed_and_leaves_the_model_where_it_is() -> None:
    """Decision: an OOM in a call of a shared model never moves it (others may be mid-call on the
    GPU copy, and a CPU copy would be a second one): the caller gets ModelUseOutOfMemory."""

    def loader(ctx: LoadContext) -> torch.nn.Module:
        return torch.nn.Linear(8, 4)  # a FAKE GPU model: built on the CPU, reported as on 'cuda'

    with _manager() as manager:
        manager.register("emb", loader)
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        with pytest.raises(ModelUseOutOfMemory, match="stays loaded") as caught, manager.use("emb"):
            raise oom
        assert caught.value.__cause__ is oom
        assert isinstance(caught.value, MemoryError) and isinstance(caught.value, SimbridgeError)
        stats = manager.stats()["emb"]
        assert (stats.state, stats.device, stats.cpu_fallbacks) == (ModelState.LOADED, "cuda", 0)
        assert (stats.use_out_of_memory, stats.active_users) == (1, 0)
        # Other errors of the caller's own block pass through unchanged.
        with pytest.raises(ZeroDivisionError), manager.use("emb"):
            raise ZeroDivisionError
        with manager.use("emb") as model:
            assert model(torch.zeros(1, 8)).shape == (1, 4)


def test_an_oom_in_a_batch_reaches_each_caller_typed() -> None:
    def encode(model: Any, items: list[int]) -> list[int]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with _manager() as manager:
        manager.register("emb", lambda ctx: object())
        with manager.batched("emb", encode, 4, 1) as batcher:
            futures = [batcher.future(n) for n in range(3)]
            for future in futures:
                error = future.exception(timeout=20)
                assert isinstance(error, ModelUseOutOfMemory)
                assert isinstance(error.__cause__, torch.OutOfMemoryError)
