"""Errors of the model manager (loading, access, batching).

Each derives from :class:`ModelError` (and so from :class:`simbridge.errors.SimbridgeError`) and
from the nearest builtin, so callers may catch either.
"""

from __future__ import annotations

from simbridge.errors import SimbridgeError


class ModelError(SimbridgeError):
    """Base class of every error raised by ``simbridge.models``."""


class UnknownModel(ModelError, LookupError):
    """Raised when a name has no registered loader."""


class ModelAlreadyRegistered(ModelError, ValueError):
    """Raised when a second loader is registered under a name already taken."""


class InvalidModelOption(ModelError, ValueError):
    """Raised when a registration or update gives a bad option (a device name, a negative limit)."""


class ModelLoadError(ModelError, RuntimeError):
    """Raised (to every waiter of the load) when a loader fails; the loader's error is the cause."""


class ModelOutOfMemory(ModelLoadError, MemoryError):
    """Raised when a load runs out of GPU memory and no CPU fallback is allowed (CUDA was asked)."""


class ModelUseOutOfMemory(ModelError, MemoryError):
    """Raised from a ``use()`` block or a batch whose model call ran out of accelerator memory; the
    model stays loaded where it is (no fallback while callers share it); the original is the cause."""


class ModelLoadCancelled(ModelError, RuntimeError):
    """Raised to the waiters of a load that ``cancel_loading`` (or shutdown) cancelled."""


class ModelTimeout(ModelError, TimeoutError):
    """Raised (as one of its subclasses) when a load, a wait for a load or a wait for a slot times out."""


class ModelLoadTimeout(ModelTimeout):
    """Raised when a load takes longer than its load timeout; the load is abandoned."""


class ModelLoaderStillRunning(ModelLoadTimeout):
    """Raised when a load cannot start within its load timeout because an abandoned earlier loader
    of the same model has not returned yet (two copies of a model are never built at once)."""


class ModelWaitTimeout(ModelTimeout):
    """Raised when a caller waits longer than its wait timeout for a model that is loading."""


class ModelAccessTimeout(ModelTimeout):
    """Raised when every slot (max_concurrent) stays busy for longer than the access timeout."""


class ModelBusy(ModelError, RuntimeError):
    """Raised at once when a model's waiting line is full (max_waiting callers already queued)."""


class ModelManagerClosed(ModelError, RuntimeError):
    """Raised when a manager (or a batcher) is used after ``shutdown()``/``close()``."""


class BatchError(ModelError, RuntimeError):
    """Raised to each caller of a batch whose function returned the wrong number of results."""
