"""Devices for model loading: what 'auto' means, what counts as a real out-of-memory error, and
handing GPU memory back after a failed or unloaded model. No framework is imported unless in use.
"""

from __future__ import annotations

import gc
import importlib.util
import re
import sys
from dataclasses import dataclass

from simbridge.models.errors import InvalidModelOption

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Exception classes that mean "the accelerator ran out of memory", by (module prefix, class name).
_OOM_CLASSES = (
    ("torch", "OutOfMemoryError"),  # torch.OutOfMemoryError == torch.cuda.OutOfMemoryError
    ("cupy", "OutOfMemoryError"),
)
# Older torch raised a plain RuntimeError; its text is the only signal there.
_OOM_TEXT = re.compile(r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED")


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """A device as registered: 'auto' (GPU if any, CPU fallback), 'cpu', 'cuda', 'cuda:N'."""

    name: str

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.name):
            raise InvalidModelOption(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.name!r}")

    @property
    def explicit_cuda(self) -> bool:
        """True when the caller named CUDA: then an OOM is an error, never a CPU fallback."""
        return self.name.startswith("cuda")


def torch_cuda_available() -> bool:
    """True when PyTorch is installed and sees a CUDA device (imports torch only if installed)."""
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def is_out_of_memory(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) is an accelerator out-of-memory error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for cls in type(current).__mro__:
            if any(
                cls.__module__.startswith(module) and cls.__name__ == name for module, name in _OOM_CLASSES
            ):
                return True
        if isinstance(current, RuntimeError) and _OOM_TEXT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


def release_accelerator_memory() -> None:
    """Collect garbage and return cached GPU memory to the driver (if torch is loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
