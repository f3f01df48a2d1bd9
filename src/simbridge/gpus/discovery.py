"""GPU discovery: what GPUs this machine has, read through NVML (nvidia-ml-py).

Where NVML, its driver or a GPU is absent, the configured number of slots stands in, so the pool
works the same on a laptop, in CI and on an 8-GPU workstation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, runtime_checkable

from simbridge.config import GpuSettings, Settings, load_settings
from simbridge.gpus.errors import NoSuchGpu, NvmlUnavailable
from simbridge.logs import get_logger

log = get_logger(__name__)

SourceKind = Literal["nvml", "slots", "fake"]
# The config's bound on gpus.slots: a pool reads and probes every slot, so this is a loop bound.
MAX_SLOTS = 1024


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
    # NVML only: the board's NVML index, and for a MIG instance the UUID of its board.
    nvml_index: int | None = None
    parent_uuid: str | None = None


@runtime_checkable
class GpuSource(Protocol):
    """Where GPU facts come from: NVML, configured slots, or (in tests) a fake.

    A source may also have ``skip_unreadable = True``: pools then leave out (and log) a GPU
    whose read raises NvmlUnavailable instead of failing.
    """

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
        if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise NoSuchGpu(f"a slot pool needs 1..{MAX_SLOTS} slots, got {slots!r}; set gpus.slots")
        self._slots = slots
        self.note = note

    def count(self) -> int:
        return self._slots

    def read(self, index: int) -> GpuInfo:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self._slots:
            raise NoSuchGpu(f"slot {index} does not exist; the pool has slots 0..{self._slots - 1}")
        return GpuInfo(index=index, name=f"slot {index}", source="slots")

    def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class NvmlDevice:
    """One leasable NVML device: a whole GPU, or one MIG instance of a GPU in MIG mode.

    ``uuid`` is None (and ``error`` says why) when NVML could not read it: such a device is
    never leased, but it still has a place, so that the other devices keep their indices.
    """

    nvml_index: int
    mig_index: int | None = None
    uuid: str | None = None
    parent_uuid: str | None = None
    error: str | None = None


# Bounds on what NVML reports, checked before they become loop bounds (a broken driver or
# library shim could answer anything): NVML itself supports far fewer of each.
_MAX_BOARDS = 1024
_MAX_MIG_PER_BOARD = 64
_UUID_MAX = 96


class NvmlSource:
    """NVIDIA GPUs (and MIG instances) through NVML; NvmlUnavailable when library, driver or GPU is absent.

    ``skip_unreadable``: a device NVML cannot read is left out of pools (logged) instead of
    failing them; ``discovery='auto'`` asks for that, an explicit ``NvmlSource()`` does not.
    """

    kind: SourceKind = "nvml"

    def __init__(self, *, skip_unreadable: bool = False) -> None:
        try:
            import pynvml
        except ImportError as exc:
            raise NvmlUnavailable(
                "NVML bindings are not installed; pip install 'simbridge[gpus]' (nvidia-ml-py)"
            ) from exc
        self._nvml: Any = pynvml
        self.skip_unreadable = skip_unreadable
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(
                f"NVML did not start ({exc}); is an NVIDIA driver installed and a GPU present?"
            ) from exc
        self._closed = False
        try:
            boards = pynvml.nvmlDeviceGetCount()
            driver = pynvml.nvmlSystemGetDriverVersion()
            if isinstance(boards, bool) or not isinstance(boards, int) or not 0 <= boards <= _MAX_BOARDS:
                raise NvmlUnavailable(f"NVML reported {boards!r} GPUs, which cannot be right")
            if boards == 0:
                raise NvmlUnavailable("NVML started but sees no GPU")
            self._devices = self._enumerate(boards)
            if not any(d.uuid is not None for d in self._devices):
                raise NvmlUnavailable(
                    f"NVML started but could read none of its {boards} GPU(s): "
                    + "; ".join(f"{d.nvml_index}: {d.error}" for d in self._devices)
                )
        except pynvml.NVMLError as exc:
            self.close()
            raise NvmlUnavailable(f"NVML started but could not count GPUs ({exc})") from exc
        except NvmlUnavailable:
            self.close()
            raise
        self.note = f"NVML, driver {_text(driver)}"

    def _enumerate(self, boards: int) -> list[NvmlDevice]:
        nvml = self._nvml
        devices: list[NvmlDevice] = []
        for index in range(boards):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _uuid(nvml.nvmlDeviceGetUUID(handle))
            except (nvml.NVMLError, NvmlUnavailable) as exc:
                log.warning("gpus.nvml_gpu_unreadable", index=index, reason=str(exc))
                devices.append(NvmlDevice(nvml_index=index, error=str(exc)))
                continue
            migs = self._mig_devices(handle, index, uuid)
            devices.extend(migs if migs is not None else [NvmlDevice(nvml_index=index, uuid=uuid)])
        return devices

    def _mig_devices(self, handle: object, index: int, uuid: str) -> list[NvmlDevice] | None:
        """The MIG instances of a board in MIG mode (the board itself is then not leasable); None if not."""
        nvml = self._nvml
        try:
            current = nvml.nvmlDeviceGetMigMode(handle)[0]
        except (nvml.NVMLError, TypeError, IndexError):
            return None  # not MIG-capable (or an old driver): a whole GPU
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        try:
            slots = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
            if isinstance(slots, bool) or not isinstance(slots, int) or not 0 <= slots <= _MAX_MIG_PER_BOARD:
                raise ValueError(f"NVML reported {slots!r} MIG slots")
        except (nvml.NVMLError, ValueError) as exc:
            log.warning("gpus.nvml_mig_unreadable", index=index, reason=str(exc))
            return [NvmlDevice(nvml_index=index, parent_uuid=uuid, error=str(exc))]
        found: list[NvmlDevice] = []
        for mig_index in range(slots):
            try:
                mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
                mig_uuid = _uuid(nvml.nvmlDeviceGetUUID(mig))
            except (nvml.NVMLError, NvmlUnavailable) as exc:
                if getattr(exc, "value", None) == nvml.NVML_ERROR_NOT_FOUND:
                    continue  # an empty MIG slot
                log.warning("gpus.nvml_mig_unreadable", index=index, mig=mig_index, reason=str(exc))
                found.append(
                    NvmlDevice(nvml_index=index, mig_index=mig_index, parent_uuid=uuid, error=str(exc))
                )
                continue
            found.append(NvmlDevice(nvml_index=index, mig_index=mig_index, uuid=mig_uuid, parent_uuid=uuid))
        if not found:
            log.info("gpus.nvml_mig_without_instances", index=index, uuid=uuid)
        return found

    def devices(self) -> list[NvmlDevice]:
        """Every device as enumerated when the source was opened; position = pool index."""
        return list(self._devices)

    def count(self) -> int:
        return len(self._devices)

    def read(self, index: int) -> GpuInfo:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._devices):
            raise NoSuchGpu(f"GPU {index} does not exist; NVML sees devices 0..{len(self._devices) - 1}")
        device = self._devices[index]
        if device.uuid is None:
            raise NvmlUnavailable(f"NVML could not read GPU {device.nvml_index} ({device.error})")
        nvml = self._nvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(device.nvml_index)
            if device.mig_index is not None:
                handle = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, device.mig_index)
            uuid = _uuid(nvml.nvmlDeviceGetUUID(handle))
            name = _text(nvml.nvmlDeviceGetName(handle))
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            total, free = _bytes(memory.total), _bytes(memory.free)
        except (nvml.NVMLError, AttributeError) as exc:
            raise NvmlUnavailable(f"NVML could not read {_where(device)} ({exc})") from exc
        if uuid != device.uuid:
            # Reconfigured (MIG) or re-enumerated since we opened NVML: the lock key would be wrong.
            raise NvmlUnavailable(f"{_where(device)} is now {uuid}, not {device.uuid}; open the pool again")
        try:
            utilization: int | None = _percent(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except (nvml.NVMLError, AttributeError):
            # Some boards (and MIG slices) do not report utilisation; unknown is not an error.
            utilization = None
        return GpuInfo(
            index=index,
            name=name,
            uuid=uuid,
            memory_total=total,
            memory_free=free,
            utilization=utilization,
            source="nvml",
            nvml_index=device.nvml_index,
            parent_uuid=device.parent_uuid,
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


def _where(device: NvmlDevice) -> str:
    if device.mig_index is None:
        return f"GPU {device.nvml_index}"
    return f"MIG instance {device.mig_index} of GPU {device.nvml_index}"


def _uuid(value: object) -> str:
    text = _text(value) if isinstance(value, bytes | str) else ""
    if not 0 < len(text) <= _UUID_MAX or not text.isprintable() or not text.isascii():
        raise NvmlUnavailable(f"NVML gave an unusable UUID {value!r}")
    return text


def _bytes(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise NvmlUnavailable(f"NVML gave an impossible memory size {value!r}")
    return value


def _percent(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
        return None
    return value


def _text(value: bytes | str) -> str:
    # Older nvidia-ml-py releases return bytes, newer ones str; a driver's bytes are not
    # necessarily UTF-8, and a name is never worth failing for (a UUID is checked after).
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def open_source(settings: GpuSettings | None = None) -> GpuSource:
    """The GPU source that ``settings.discovery`` asks for ('auto' falls back to slots, logged).

    Under 'auto' an unreadable GPU is skipped (logged) rather than failing every pool.
    """
    gpus = settings if settings is not None else load_settings().gpus
    if gpus.discovery == "slots":
        return SlotSource(slots=gpus.slots, note="configured slots (discovery='slots')")
    try:
        return NvmlSource(skip_unreadable=gpus.discovery == "auto")
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
        return read_usable(source, range(source.count()))
    finally:
        source.close()


def read_all(source: GpuSource, indices: Sequence[int] | None = None) -> list[GpuInfo]:
    """Facts of the given GPUs (all by default) from ``source``; any unreadable one raises."""
    wanted = range(source.count()) if indices is None else indices
    return [source.read(index) for index in wanted]


def read_usable(source: GpuSource, indices: Iterable[int]) -> list[GpuInfo]:
    """Facts of the given GPUs; an unreadable one is skipped (logged) where the source allows."""
    skip = bool(getattr(source, "skip_unreadable", False))
    found = []
    for index in indices:
        try:
            found.append(source.read(index))
        except NvmlUnavailable as exc:
            if not skip:
                raise
            log.warning("gpus.gpu_skipped", index=index, reason=str(exc))
    return found


def select_gpus(source: GpuSource) -> list[GpuInfo]:
    """The GPUs a pool of this process may lease: those CUDA_VISIBLE_DEVICES allows, readable."""
    indices = visible_indices(source)
    gpus = read_usable(source, range(source.count()) if indices is None else indices)
    if not gpus:
        raise NoSuchGpu(f"no GPU of {source.note} could be read; `simbridge gpus -v` says why")
    return gpus


def visible_indices(source: GpuSource) -> list[int] | None:
    """The pool indices this process may use: all (None), or those its CUDA_VISIBLE_DEVICES names.

    Under Slurm (or any parent that already chose GPUs for us) the pool must stay inside that
    set. NVML entries are matched by index or UUID prefix (a whole GPU stands for its MIG
    instances); configured slots by slot number, as a slot lease's child is given them.
    Only identities are looked at, so a GPU that is not named may be unreadable.
    """
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is None or source.kind not in ("nvml", "slots"):
        return None
    wanted = [part.strip() for part in named.split(",") if part.strip()]
    if not wanted:
        raise NoSuchGpu("CUDA_VISIBLE_DEVICES is set but empty: this process may use no GPU")
    if isinstance(source, NvmlSource):
        devices = source.devices()
    else:
        devices = [NvmlDevice(nvml_index=index) for index in range(source.count())]
    indices: set[int] = set()
    for part in wanted:
        matches = _matching(devices, part)
        if not matches:
            raise NoSuchGpu(
                f"CUDA_VISIBLE_DEVICES={named!r}: {part!r} names no single GPU "
                f"(this process sees {_seen(devices)})"
            )
        indices.update(matches)
    return sorted(indices)


def _matching(devices: Sequence[NvmlDevice], part: str) -> list[int]:
    """Positions of the devices that ``part`` names (all MIG instances of a named board)."""
    if part.isdigit() and part.isascii():
        board = int(part)
        return [n for n, d in enumerate(devices) if d.nvml_index == board]
    exact = [n for n, d in enumerate(devices) if d.uuid is not None and d.uuid.startswith(part)]
    boards = {d.parent_uuid for d in devices if d.parent_uuid is not None and d.parent_uuid.startswith(part)}
    if len(exact) == 1 and not boards:
        return exact
    if len(boards) == 1 and not exact:
        (board_uuid,) = boards
        return [n for n, d in enumerate(devices) if d.parent_uuid == board_uuid and d.uuid is not None]
    return []  # none, or a prefix shared by several: CUDA would refuse it too


def _seen(devices: Sequence[NvmlDevice]) -> str:
    return ", ".join(d.uuid or f"{d.nvml_index} (unreadable)" for d in devices) or "nothing"
