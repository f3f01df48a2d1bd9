"""The data plane: named, versioned arrays (Block) and SPSC record streams (Ring) in POSIX shared
memory, shared with C/C++ peers.

The layouts and protocols are defined once, in ``include/simbridge/shm.h``; see :class:`Block`, :class:`Ring`.
"""

from simbridge.shm.block import Block
from simbridge.shm.errors import (
    AccessDenied,
    BlockClosed,
    BlockExists,
    BlockNotFound,
    ChecksumRequired,
    ConcurrentUse,
    Corrupted,
    Full,
    HeaderNotFound,
    InvalidName,
    IterationOrder,
    LayoutMismatch,
    NonFinite,
    NoSpace,
    NotConsumer,
    NotWriter,
    OutOfRange,
    PeerGone,
    RecordTooLarge,
    RingBusy,
    ShmError,
    ShmOSError,
    Timeout,
    WriterClosed,
)
from simbridge.shm.headers import get_include
from simbridge.shm.layout import validate_name
from simbridge.shm.parquet import ParquetRecorder, RecordingSummary
from simbridge.shm.parquet_files import Recovered
from simbridge.shm.parquet_files import recover as recover_parquet
from simbridge.shm.recorder import Recorder, diff, load_index
from simbridge.shm.registry import BlockInfo, block_info, cleanup_stale, list_blocks, remove
from simbridge.shm.ring import Ring
from simbridge.shm.snapshot import Snapshot

__all__ = [
    "AccessDenied",
    "Block",
    "BlockClosed",
    "BlockExists",
    "BlockInfo",
    "BlockNotFound",
    "ChecksumRequired",
    "ConcurrentUse",
    "Corrupted",
    "Full",
    "HeaderNotFound",
    "InvalidName",
    "IterationOrder",
    "LayoutMismatch",
    "NoSpace",
    "NonFinite",
    "NotConsumer",
    "NotWriter",
    "OutOfRange",
    "ParquetRecorder",
    "PeerGone",
    "RecordTooLarge",
    "Recorder",
    "RecordingSummary",
    "Recovered",
    "Ring",
    "RingBusy",
    "ShmError",
    "ShmOSError",
    "Snapshot",
    "Timeout",
    "WriterClosed",
    "block_info",
    "cleanup_stale",
    "diff",
    "get_include",
    "list_blocks",
    "load_index",
    "recover_parquet",
    "remove",
    "validate_name",
]
