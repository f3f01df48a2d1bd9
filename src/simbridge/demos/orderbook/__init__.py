"""A market-data pipeline over shared-memory rings: Bitget order-book feed -> book/OBI -> Parquet.

``book`` and ``fixed`` keep prices exact (int64 fixed point); ``bitget``, ``states`` and ``feed`` speak
the exchange's ``books`` channel; ``replay`` stands in for the exchange; ``processes`` and
``pipeline`` run it all; ``plot`` and ``cli`` show it.
"""

from simbridge.demos.orderbook.book import L2Book, Level
from simbridge.demos.orderbook.errors import (
    ChecksumMismatch,
    DecimalOverflow,
    EventSinkFailed,
    FeedProtocolError,
    IllegalTransition,
    InvalidDecimal,
    NonFiniteDecimal,
    OrderBookError,
    PipelineFailed,
    ResyncNeeded,
    TooManyDecimals,
)
from simbridge.demos.orderbook.fixed import format_fixed, parse_fixed
from simbridge.demos.orderbook.states import FeedState, FeedStateMachine

__all__ = [
    "ChecksumMismatch",
    "DecimalOverflow",
    "EventSinkFailed",
    "FeedProtocolError",
    "FeedState",
    "FeedStateMachine",
    "IllegalTransition",
    "InvalidDecimal",
    "L2Book",
    "Level",
    "NonFiniteDecimal",
    "OrderBookError",
    "PipelineFailed",
    "ResyncNeeded",
    "TooManyDecimals",
    "format_fixed",
    "parse_fixed",
]
