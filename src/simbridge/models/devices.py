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
# Older torch raised a plain RuntimeError whose text starts with one of these; only a message of
# that exact class counts (a wrapper quoting an OOM in its own message is not an OOM).
_OOM_TEXT = re.compile(
    r"^(CUDA out of memory|CUDA error: out of memory|CUDA error: CUBLAS_STATUS_ALLOC_FAILED)"
)


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """A device as registered: 'auto' (GPU if any, CPU fallback), 'cpu', 'cuda', 'cuda:N'."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _DEVICE.match(self.name):
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


def is_out_of_memory(exc: BaseException, extra: tuple[type[BaseException], ...] = ()) -> bool:
    """True when ``exc`` itself is an accelerator out-of-memory error.

    Recognised: torch's (and cupy's) ``OutOfMemoryError``, an old torch's plain ``RuntimeError``
    whose message starts with "CUDA out of memory", and any class in ``extra`` (a model's
    ``oom_errors``). Only the exception itself is looked at, never what it was raised from or
    while handling: an unrelated error raised inside an OOM handler is not an OOM.
    """
    if extra and isinstance(exc, extra):
        return True
    for cls in type(exc).__mro__:
        top = cls.__module__.partition(".")[0]
        if any(top == module and cls.__name__ == name for module, name in _OOM_CLASSES):
            return True
    return type(exc) is RuntimeError and _OOM_TEXT.search(str(exc)) is not None


def release_accelerator_memory() -> None:
    """Collect garbage and return cached GPU memory to the driver (if torch is loaded)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
