"""GPU discovery: what GPUs this machine has, read through NVML (nvidia-ml-py).

Where NVML, its driver or a GPU is absent, the configured number of slots stands in, so the pool
works the same on a laptop, in CI and on an 8-GPU workstation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from simbridge.config import GpuSettings, Settings, load_settings
from simbridge.gpus.errors import NoSuchGpu, NvmlUnavailable
from simbridge.logs import get_logger

log = get_logger(__name__)

SourceKind = Literal["nvml", "slots", "fake"]


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU (or slot) as last read: memory in bytes, utilisation in percent; None = unknown."""

    index: int
    name: str
    uuid: str | None = None
    memory_total: int | None = None
    memory_free: int | None = None
    utilization: int | None = None
    source: SourceKind = "slots"


@runtime_checkable
class GpuSource(Protocol):
    """Where GPU facts come from: NVML, configured slots, or (in tests) a fake."""

    kind: SourceKind
    note: str

    def count(self) -> int:
        """How many GPUs (or slots) there are."""
        ...

    def read(self, index: int) -> GpuInfo:
        """Current facts of GPU ``index`` (memory and utilisation are read now)."""
        ...

    def close(self) -> None:
        """Let go of the library handle, if any."""
        ...


class SlotSource:
    """Configured slots standing in for GPUs: indices only, no memory or utilisation readings."""

    kind: SourceKind = "slots"

    def __init__(self, *, slots: int, note: str = "configured slots") -> None:
        if slots < 1:
            raise NoSuchGpu(f"a slot pool needs at least 1 slot, got {slots}; set gpus.slots >= 1")
        self._slots = slots
        self.note = note

    def count(self) -> int:
        return self._slots

    def read(self, index: int) -> GpuInfo:
        if not 0 <= index < self._slots:
            raise NoSuchGpu(f"slot {index} does not exist; the pool has slots 0..{self._slots - 1}")
        return GpuInfo(index=index, name=f"slot {index}", source="slots")

    def close(self) -> None:
        return None


class NvmlSource:
    """NVIDIA GPUs through NVML; raises NvmlUnavailable when library, driver or GPU is absent."""

    kind: SourceKind = "nvml"

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(
                "NVML bindings are not installed; pip install 'simbridge[gpus]' (nvidia-ml-py)"
            ) from exc
        self._nvml: Any = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML did not start ({exc}); is an NVIDIA driver installed and a GPU present?"
            ) from exc
        try:
            self._count = int(pynvml.nvmlDeviceGetCount())
            driver = pynvml.nvmlSystemGetDriverVersion()
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML started but could not count GPUs ({exc})") from exc
        if self._count == 0:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable("NVML started but sees no GPU")
        self.note = f"NVML, driver {_text(driver)}"
        self._closed = False

    def count(self) -> int:
        return self._count

    def read(self, index: int) -> GpuInfo:
        if not 0 <= index < self._count:
            raise NoSuchGpu(f"GPU {index} does not exist; NVML sees GPUs 0..{self._count - 1}")
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _text(nvml.nvmlDeviceGetName(handle))
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML could not read GPU {index} ({exc})") from exc
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            # Some boards (and MIG slices) do not report utilisation; unknown is not an error.
            utilization = None
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            memory_total=int(memory.total),
            memory_free=int(memory.free),
            utilization=utilization,
            source="nvml",
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:  # pragma: no cover - driver went away under us
                log.warning("gpus.nvml_shutdown_failed")

    def __enter__(self) -> NvmlSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _text(value: bytes | str) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else str(value)


def open_source(settings: GpuSettings | None = None) -> GpuSource:
    """The GPU source that ``settings.discovery`` asks for ('auto' falls back to slots, logged)."""
    gpus = settings if settings is not None else load_settings().gpus
    if gpus.discovery == "slots":
        return SlotSource(slots=gpus.slots, note="configured slots (discovery='slots')")
    try:
        return NvmlSource()
    except NvmlUnavailable as exc:
        if gpus.discovery == "nvml":
            raise
        log.info("gpus.nvml_absent", reason=str(exc), slots=gpus.slots)
        return SlotSource(slots=gpus.slots, note=f"configured slots; NVML absent: {exc}")


def discover_gpus(settings: Settings | GpuSettings | None = None) -> list[GpuInfo]:
    """Every GPU as read now, through NVML, or the configured slots where NVML is absent."""
    section = settings.gpus if isinstance(settings, Settings) else settings
    source = open_source(section)
    try:
        return read_all(source)
    finally:
        source.close()


def read_all(source: GpuSource, indices: Sequence[int] | None = None) -> list[GpuInfo]:
    """Facts of the given GPUs (all by default) from ``source``."""
    wanted = range(source.count()) if indices is None else indices
    return [source.read(index) for index in wanted]


def visible_indices(source: GpuSource) -> list[int] | None:
    """The NVML indices this process may use: all, or those its own CUDA_VISIBLE_DEVICES names.

    Under Slurm (or any parent that already chose GPUs for us) the pool must stay inside that
    set; children then get physical indices with CUDA_DEVICE_ORDER=PCI_BUS_ID, which is exact.
    """
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if source.kind != "nvml" or named is None:
        return None
    wanted = [part.strip() for part in named.split(",") if part.strip()]
    if not wanted:
        raise NoSuchGpu("CUDA_VISIBLE_DEVICES is set but empty: this process may use no GPU")
    gpus = read_all(source)
    indices = []
    for part in wanted:
        if part.isdigit():
            matches = [g.index for g in gpus if g.index == int(part)]
        else:
            matches = [g.index for g in gpus if g.uuid is not None and g.uuid.startswith(part)]
        if len(matches) != 1:
            raise NoSuchGpu(
                f"CUDA_VISIBLE_DEVICES={named!r}: {part!r} names no single GPU "
                f"(NVML sees {[g.uuid or g.index for g in gpus]})"
            )
        indices.append(matches[0])
    return sorted(set(indices))
