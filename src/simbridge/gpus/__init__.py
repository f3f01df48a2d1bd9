"""The GPU plane: find the GPUs (NVML, or configured slots) and lease them across processes.

``GpuPool.lease`` is the one way to hold GPUs in simbridge; the job pipeline uses it too.
"""

from simbridge.gpus.discovery import (
    GpuInfo,
    GpuSource,
    NvmlSource,
    SlotSource,
    discover_gpus,
    open_source,
)
from simbridge.gpus.errors import (
    GpuError,
    InvalidLeaseRequest,
    LeaseReleased,
    LeaseTimeout,
    LockDirError,
    LockDirRemoved,
    LockIOError,
    NoSuchGpu,
    NvmlUnavailable,
)
from simbridge.gpus.pool import GpuHolder, GpuLease, GpuPool, default_lock_dir

__all__ = [
    "GpuError",
    "GpuHolder",
    "GpuInfo",
    "GpuLease",
    "GpuPool",
    "GpuSource",
    "InvalidLeaseRequest",
    "LeaseReleased",
    "LeaseTimeout",
    "LockDirError",
    "LockDirRemoved",
    "LockIOError",
    "NoSuchGpu",
    "NvmlSource",
    "NvmlUnavailable",
    "SlotSource",
    "default_lock_dir",
    "discover_gpus",
    "open_source",
]
