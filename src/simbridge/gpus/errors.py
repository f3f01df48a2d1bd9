"""Errors of the GPU plane (discovery and cross-process leases).

Each derives from :class:`GpuError` (and so from :class:`simbridge.errors.SimbridgeError`) and
from the nearest builtin, so callers may catch either.
"""

from __future__ import annotations

from simbridge.errors import SimbridgeError


class GpuError(SimbridgeError):
    """Base class of every error raised by ``simbridge.gpus``."""


class LeaseTimeout(GpuError, TimeoutError):
    """Raised when a lease's timeout passes before the GPUs it waits for become free."""


class InvalidLeaseRequest(GpuError, ValueError):
    """Raised for a bad count (below 1, more GPUs than the pool has), timeout or pool option."""


class NoSuchGpu(GpuError, LookupError):
    """Raised when an index names no GPU of the pool, or no GPU could ever meet a memory floor."""


class NvmlUnavailable(GpuError, RuntimeError):
    """Raised when NVML is asked for (discovery='nvml') but the library, driver or GPU is absent."""


class LockDirError(GpuError, OSError):
    """Raised when the lock folder cannot be created or is unsafe (a symlink, or another user's)."""


class LeaseReleased(GpuError, RuntimeError):
    """Raised when a released lease is used again (its GPUs may already belong to someone else)."""


class LockIOError(GpuError, OSError):
    """Raised when the OS refuses a lock, ticket or holder-record file call (a failed lease holds nothing)."""


class LockDirRemoved(LockDirError):
    """Raised when the lock folder or a lock file was removed or replaced while this pool used it."""
