"""A FAKE NVML library (this machine has no GPU and no driver), for the NVML code path's tests.

The fake stands in for the driver only: it answers the nvml* calls NvmlSource makes, with boards
described as dicts, and raises nvidia-ml-py's real NVMLError classes. Everything above it
(NvmlSource, discovery, the pool, the CLI) is the real code that runs on a GPU machine. It also
models what a real driver can do to us: MIG instances, a board that cannot be read ("lost"), a
memory read that fails ("fail_memory"), and a per-process view (a container or cgroup that shows
only some boards, renumbered from 0). Subprocesses import it by path (see ``install``).
"""

from __future__ import annotations

import sys
import types
from typing import Any

import pynvml

GIB = 2**30


def board(
    uuid: str | bytes, *, total: int = 80 * GIB, free: int | None = None, util: int | None = 3, **more: Any
) -> dict[str, Any]:
    """One FAKE board: name, uuid, total/free bytes, utilisation (None: not supported)."""
    return {
        "name": "NVIDIA A100-SXM4-80GB",
        "uuid": uuid,
        "total": total,
        "free": total if free is None else free,
        "util": util,
        **more,  # name=..., lost=True, fail_memory=True, migs=[...]
    }


def mig(uuid: str, *, total: int = 10 * GIB, free: int | None = None, slot: int = 0) -> dict[str, Any]:
    """One FAKE MIG instance, at MIG slot ``slot`` of its board (others are empty: NOT_FOUND)."""
    return {
        "name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        "uuid": uuid,
        "total": total,
        "free": total if free is None else free,
        "util": None,
        "slot": slot,
    }


def fake_nvml(boards: list[dict[str, Any]], *, init_error: type[Exception] | None = None) -> types.ModuleType:
    """A FAKE pynvml module over ``boards``; a board with a "migs" list is in MIG mode."""
    fake = types.ModuleType("pynvml")
    fake.NVMLError = pynvml.NVMLError  # type: ignore[attr-defined]
    for constant in ("NVML_DEVICE_MIG_ENABLE", "NVML_DEVICE_MIG_DISABLE", "NVML_ERROR_NOT_FOUND"):
        setattr(fake, constant, getattr(pynvml, constant))
    state = {"inits": 0, "shutdowns": 0}
    fake.state = state  # type: ignore[attr-defined]
    fake.boards = boards  # type: ignore[attr-defined]

    def error(code: int) -> Exception:
        return pynvml.NVMLError(code)

    def init() -> None:
        if init_error is not None:
            raise init_error(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        state["inits"] += 1

    def shutdown() -> None:
        state["shutdowns"] += 1

    def handle(index: int) -> dict[str, Any]:
        if not 0 <= index < len(boards):
            raise error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if boards[index].get("lost"):
            raise error(pynvml.NVML_ERROR_GPU_IS_LOST)
        return boards[index]

    def uuid(device: dict[str, Any]) -> Any:
        return device["uuid"]

    def memory(device: dict[str, Any]) -> Any:
        if device.get("fail_memory"):
            raise error(pynvml.NVML_ERROR_UNKNOWN)
        return types.SimpleNamespace(
            total=device["total"], free=device["free"], used=device["total"] - device["free"]
        )

    def utilization(device: dict[str, Any]) -> Any:
        if device["util"] is None:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return types.SimpleNamespace(gpu=device["util"], memory=0)

    def mig_mode(device: dict[str, Any]) -> list[int]:
        if "migs" not in device:
            raise error(pynvml.NVML_ERROR_NOT_SUPPORTED)  # not MIG-capable
        return [pynvml.NVML_DEVICE_MIG_ENABLE] * 2

    def mig_handle(device: dict[str, Any], slot: int) -> dict[str, Any]:
        for instance in device.get("migs", []):
            if instance["slot"] == slot:
                return instance
        raise error(pynvml.NVML_ERROR_NOT_FOUND)

    fake.nvmlInit = init  # type: ignore[attr-defined]
    fake.nvmlShutdown = shutdown  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: len(boards)  # type: ignore[attr-defined]
    fake.nvmlSystemGetDriverVersion = lambda: b"550.54.15"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = handle  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda d: d["name"]  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUUID = uuid  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = memory  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = utilization  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMigMode = mig_mode  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMaxMigDeviceCount = lambda d: 7  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle  # type: ignore[attr-defined]
    return fake


def install(boards: list[dict[str, Any]]) -> types.ModuleType:
    """Put a FAKE NVML over ``boards`` in place of pynvml for this whole process (subprocess tests)."""
    fake = fake_nvml(boards)
    sys.modules["pynvml"] = fake
    return fake
