"""The EKI demo's errors; each is also a builtin (and the shm error it refines) so callers catch either."""

from __future__ import annotations

from simbridge.errors import SimbridgeError
from simbridge.shm.errors import LayoutMismatch, PeerGone


class EkiError(SimbridgeError):
    """Base of every error raised by simbridge.demos.eki."""


class BuildFailed(EkiError, RuntimeError):
    """Raised when the C forward model cannot be compiled (no compiler, no shm.h, a compile error)."""


class ForwardModelDied(EkiError, PeerGone):
    """Raised when the forward model process exits or is killed before the driver is done with it."""

    def __init__(self, message: str, *, name: str, pid: int, returncode: int | None, log_path: str) -> None:
        super().__init__(message, name=name, pid=pid)
        self.returncode = returncode
        self.log_path = log_path


class ModelLayoutMismatch(EkiError, LayoutMismatch):
    """Raised when the forward model was built with other sizes than the driver asks for."""
