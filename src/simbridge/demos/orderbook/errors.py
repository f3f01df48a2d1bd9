"""The order-book demo's errors; each is also the builtin it is nearest to, so callers catch either."""

from __future__ import annotations

from simbridge.errors import SimbridgeError


class OrderBookError(SimbridgeError):
    """Base of every error raised by simbridge.demos.orderbook."""


class InvalidDecimal(OrderBookError, ValueError):
    """Raised when a price or size string is not a plain non-negative decimal (``"30000.96"``)."""

    def __init__(self, message: str, *, text: str) -> None:
        super().__init__(message)
        self.text = text


class NonFiniteDecimal(InvalidDecimal):
    """Raised when a price or size reads NaN or infinity."""


class TooManyDecimals(InvalidDecimal):
    """Raised when a decimal has more fraction digits than the book's fixed-point scale keeps."""


class DecimalOverflow(InvalidDecimal, OverflowError):
    """Raised when a decimal scaled to the book's fixed point does not fit in an int64."""


class ResyncNeeded(OrderBookError, RuntimeError):
    """Raised inside the feed when its book must be rebuilt from a fresh snapshot (gap, error reply)."""


class ChecksumMismatch(ResyncNeeded, ValueError):
    """Raised when the book's CRC32 over its top 25 levels differs from the exchange's checksum."""

    def __init__(self, message: str, *, expected: int, computed: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.computed = computed


class FeedProtocolError(OrderBookError, ValueError):
    """Raised when a feed message is not what the channel documents (bad JSON, missing field, a gap)."""


class EventSinkFailed(OrderBookError, RuntimeError):
    """Raised by the feed when its ``on_event`` callback fails (e.g. its ring's consumer died): not a
    connection problem, so no reconnect hides it."""


class IllegalTransition(OrderBookError, RuntimeError):
    """Raised when the feed's state machine is asked for a transition its table does not allow."""


class PipelineFailed(OrderBookError, RuntimeError):
    """Raised by the demo when one of its processes fails or exits before the run is over."""
