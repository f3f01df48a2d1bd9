"""Every error a caller of simbridge.models can get is a SimbridgeError (with the nearest builtin
as a second base): bad options of every kind, foreign errors translated at the boundary."""

from __future__ import annotations

import inspect
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import prometheus_client
import pytest

from simbridge.config import ModelSettings
from simbridge.errors import SimbridgeError
from simbridge.models import (
    BatchError,
    InvalidModelOption,
    ModelLoadError,
    ModelManager,
    UnknownModel,
)
from simbridge.models import errors as model_errors

HANG_S = 20.0  # a fail-safe against a hang, never a measurement


def test_every_model_error_has_a_builtin_second_base() -> None:
    for name, cls in inspect.getmembers(model_errors, inspect.isclass):
        if not issubclass(cls, model_errors.ModelError) or cls is model_errors.ModelError:
            continue
        builtins = [base for base in cls.__mro__ if base.__module__ == "builtins" and base is not object]
        assert set(builtins) - {Exception, BaseException}, f"{name} has no builtin besides Exception"
        assert cls.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"max_concurrent": "3"}, "max_concurrent"),
        ({"max_concurrent": 2.5}, "max_concurrent"),
        ({"max_waiting": True}, "max_waiting"),
        ({"wait_timeout": "ten"}, "wait_timeout"),
        ({"access_timeout": math.nan}, "access_timeout"),
        ({"load_timeout": -1}, "load_timeout"),
        ({"idle_unload": "soon"}, "idle_unload"),
        ({"cpu_fallback": "yes"}, "cpu_fallback"),
        ({"oom_errors": (int,)}, "oom_errors"),
        ({"device": 0}, "device"),
        ({"unloader": "close"}, "unloader"),
    ],
)
def test_bad_registration_options_are_typed(options: dict[str, Any], says: str) -> None:
    with ModelManager(settings=ModelSettings()) as manager:
        # Before the fix a string count or timeout raised TypeError from a comparison.
        with pytest.raises(InvalidModelOption, match=says) as caught:
            manager.register("m", lambda ctx: object(), **options)
        assert isinstance(caught.value, ValueError)
        manager.register("ok", lambda ctx: object())
        with pytest.raises(InvalidModelOption, match=says):
            manager.update("ok", **options)


def test_bad_loader_and_name_are_typed() -> None:
    with ModelManager(settings=ModelSettings()) as manager:
        with pytest.raises(InvalidModelOption, match="callable"):
            manager.register("m", "not a loader")  # type: ignore[arg-type]
        with pytest.raises(InvalidModelOption, match="name"):
            manager.register("", lambda ctx: object())
        with pytest.raises(UnknownModel), manager.use(["m"]):  # type: ignore[arg-type]
            pass  # before the fix: TypeError, unhashable list


@pytest.mark.parametrize("bad", [math.nan, -1, "1"])
def test_bad_call_timeouts_are_typed(bad: Any) -> None:
    with ModelManager(settings=ModelSettings()) as manager:
        manager.register("m", lambda ctx: object(), device="cpu")
        manager.load("m")
        with pytest.raises(InvalidModelOption), manager.use("m", wait_timeout=bad):
            pass
        with pytest.raises(InvalidModelOption), manager.use("m", access_timeout=bad):
            pass
        with pytest.raises(InvalidModelOption):
            manager.load("m", timeout=bad)
        with pytest.raises(InvalidModelOption):
            manager.shutdown(timeout=bad)


def test_a_nan_batch_timeout_is_refused_not_waited_forever() -> None:
    gate = threading.Event()
    with ModelManager(settings=ModelSettings()) as manager, ThreadPoolExecutor(1) as pool:
        manager.register("m", lambda ctx: object(), device="cpu")
        with manager.batched("m", lambda m, items: [gate.wait(HANG_S) for _ in items], 1, 0) as batcher:
            # Before the fix NaN meant "no limit": this caller waited for the gate, for ever.
            outcome = pool.submit(batcher.submit, 1, timeout=math.nan)
            assert isinstance(outcome.exception(timeout=HANG_S), InvalidModelOption)
            with pytest.raises(InvalidModelOption):
                manager.batched("m", lambda m, items: items, "8", 1)  # type: ignore[arg-type]
            gate.set()


def test_a_batch_function_returning_no_sequence_is_a_batch_error() -> None:
    with ModelManager(settings=ModelSettings()) as manager:
        manager.register("m", lambda ctx: object(), device="cpu")
        with manager.batched("m", lambda m, items: (2 * n for n in items), 4, 1) as batcher:
            # Before the fix: TypeError from len() of a generator.
            error = batcher.future(1).exception(timeout=HANG_S)
    assert isinstance(error, BatchError)
    assert "generator" in str(error)


def test_a_shared_metrics_registry_is_a_typed_error() -> None:
    registry = prometheus_client.CollectorRegistry()
    first = ModelManager(settings=ModelSettings(), registry=registry)
    # Before the fix: ValueError("Duplicated timeseries in CollectorRegistry").
    with pytest.raises(InvalidModelOption, match=r"own prometheus_client\.CollectorRegistry"):
        ModelManager(settings=ModelSettings(), registry=registry)
    first.shutdown()


def test_a_loaders_error_crosses_as_a_model_load_error_with_its_cause() -> None:
    cause = KeyboardInterrupt()  # even a BaseException of the loader's thread is the waiters'

    def loader(ctx: Any) -> object:
        raise cause

    with ModelManager(settings=ModelSettings()) as manager:
        manager.register("m", loader, device="cpu")
        with pytest.raises(ModelLoadError) as caught:
            manager.load("m", timeout=HANG_S)
    assert caught.value.__cause__ is cause
    assert isinstance(caught.value, SimbridgeError) and isinstance(caught.value, RuntimeError)
