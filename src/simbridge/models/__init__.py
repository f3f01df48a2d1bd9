"""The model manager: named loaders, each model loaded once per process and shared safely.

``ModelManager`` bounds and times out access, cancels and falls back, unloads idle models, and
batches concurrent single requests (``manager.batched``).
"""

from simbridge.models._entry import LoadContext
from simbridge.models.batching import Batcher
from simbridge.models.devices import is_out_of_memory
from simbridge.models.errors import (
    BatchError,
    InvalidModelOption,
    ModelAccessTimeout,
    ModelAlreadyRegistered,
    ModelBusy,
    ModelError,
    ModelLoadCancelled,
    ModelLoadError,
    ModelLoaderStillRunning,
    ModelLoadTimeout,
    ModelManagerClosed,
    ModelOutOfMemory,
    ModelTimeout,
    ModelUseOutOfMemory,
    ModelWaitTimeout,
    UnknownModel,
)
from simbridge.models.manager import ModelManager, default_manager
from simbridge.models.metrics import ModelState, ModelStats

__all__ = [
    "BatchError",
    "Batcher",
    "InvalidModelOption",
    "LoadContext",
    "ModelAccessTimeout",
    "ModelAlreadyRegistered",
    "ModelBusy",
    "ModelError",
    "ModelLoadCancelled",
    "ModelLoadError",
    "ModelLoadTimeout",
    "ModelLoaderStillRunning",
    "ModelManager",
    "ModelManagerClosed",
    "ModelOutOfMemory",
    "ModelState",
    "ModelStats",
    "ModelTimeout",
    "ModelUseOutOfMemory",
    "ModelWaitTimeout",
    "UnknownModel",
    "default_manager",
    "is_out_of_memory",
]
