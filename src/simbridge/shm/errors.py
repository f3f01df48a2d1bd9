"""The data plane's errors: every failure of a Block is one of these, each also a builtin error."""

from __future__ import annotations

from simbridge.errors import SimbridgeError


class ShmError(SimbridgeError):
    """Base of every error raised by simbridge.shm."""


class InvalidName(ShmError, ValueError):
    """Raised when a block name is empty, too long, or has characters other than [A-Za-z0-9._-]."""


class Timeout(ShmError, TimeoutError):
    """Raised when a wait (for a segment to appear, or for a new iteration) exceeds its timeout."""

    def __init__(self, message: str, *, name: str, waited_for: str, timeout: float) -> None:
        super().__init__(message)
        self.name = name
        self.waited_for = waited_for
        self.timeout = timeout


class PeerGone(ShmError, ConnectionError):
    """Raised when the block's writer process died (or the machine rebooted) while a reader waited."""

    def __init__(self, message: str, *, name: str, pid: int) -> None:
        super().__init__(message)
        self.name = name
        self.pid = pid


class WriterClosed(PeerGone):
    """Raised when the writer closed the block cleanly and no newer iteration will come."""


class Corrupted(ShmError, ValueError):
    """Raised when a consistent copy of a payload does not match its CRC32C."""


class LayoutMismatch(ShmError, ValueError):
    """Raised when magic, ABI version, dtype, shape or size of a segment or array disagree."""


class NonFinite(ShmError, ValueError):
    """Raised by ``check_finite=True`` when an array holds NaN or Inf; says how many and where first."""

    def __init__(self, message: str, *, count: int, first_index: tuple[int, ...]) -> None:
        super().__init__(message)
        self.count = count
        self.first_index = first_index


class InvalidArgument(ShmError, ValueError):
    """Raised when an argument of create (shape, dtype, slots, mode, a flag) breaks its rule; says it."""


class InvalidLayout(InvalidArgument, LayoutMismatch):
    """Raised when a shape or dtype given to create cannot describe a block (also a LayoutMismatch)."""


class LockTimeout(Timeout):
    """Raised when another process holds a block name's lifecycle lock longer than the lock timeout."""


class RecordingError(ShmError, OSError):
    """Raised when the recorder cannot create or write its folder, NPZ files or index."""


class RecordingInvalid(ShmError, ValueError):
    """Raised when a recording's metadata.json is not what the recorder writes (edited, truncated)."""


class DemoFailed(ShmError, RuntimeError):
    """Raised by the blocks demo when its model process fails or exits with an error."""


class BlockExists(ShmError, FileExistsError):
    """Raised when creating a block whose name is held by a live owner."""


class NoSpace(ShmError, OSError):
    """Raised when /dev/shm has no room left for a new block's memory."""


class BlockNotFound(ShmError, FileNotFoundError):
    """Raised when a block does not exist (and, for ``open``, did not appear in time)."""


class HeaderNotFound(ShmError, FileNotFoundError):
    """Raised when simbridge/shm.h is neither installed with the package nor next to the sources."""


class BlockClosed(ShmError, ValueError):
    """Raised when a closed Block is used, or when close() ran while this call was in flight."""


class NotWriter(ShmError, PermissionError):
    """Raised when a handle that is not the writer (a reader, or a forked child of it) publishes."""


class IterationOrder(ShmError, ValueError):
    """Raised when a publish's iteration id is not greater than the previous publish's."""


class OutOfRange(ShmError, ValueError):
    """Raised when an argument (iteration id, ``after``, a timeout) is outside the range its message gives."""


class ChecksumRequired(LayoutMismatch):
    """Raised by ``Block.open(require_checksum=True)`` when the writer publishes without CRC32C."""


class AccessDenied(ShmError, PermissionError):
    """Raised when the segment's owner or mode does not let this process open or remove it."""


class ShmOSError(ShmError, OSError):
    """Raised when a system call on a segment fails for another reason (errno and filename kept)."""


class Full(ShmError, BufferError):
    """Raised by a ring created with ``overflow="fail"`` when a push finds no room; ``pushed`` says how
    many records of the call went in before it."""

    def __init__(self, message: str, *, name: str, pushed: int) -> None:
        super().__init__(message)
        self.name = name
        self.pushed = pushed


class RingBusy(ShmError, BlockingIOError):
    """Raised when a ring already has a live consumer (a ring has exactly one) and another opens it."""


class NotConsumer(ShmError, PermissionError):
    """Raised when a ring's producer handle pops, peeks or waits for data (only the consumer does)."""


class RecordTooLarge(ShmError, ValueError):
    """Raised when a record is larger than the ring allows (variable mode: capacity/2 - 8 bytes)."""
