"""Range checks of Block's arguments (iteration ids, ``after``, timeouts); each refusal states the rule.

Shared-memory iteration ids are uint64 with 2**64-1 reserved (shm.h's SB_NEXT_ITERATION), so Python ints
outside 0..2**64-2 must be refused here rather than wrapped by the C core.
"""

from __future__ import annotations

import math
import operator
from typing import Final

from simbridge.shm import _core
from simbridge.shm.errors import OutOfRange

MAX_ITERATION: Final = _core.MAX_ITERATION
PLAIN_NUMBERS: Final = (int, float)


def seconds(value: object, what: str) -> float:
    """A timeout in seconds: a number >= 0, ``math.inf`` for "wait forever"; NaN and negatives refused."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if not number >= 0:  # also false for NaN
        raise OutOfRange(f"{what} must be a number of seconds >= 0 (math.inf waits forever), got {value!r}")
    return number


def iteration_id(value: object) -> int:
    """An iteration id for publish or loan: an integer 0..2**64-2."""
    try:
        it = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        it = -1
    if not 0 <= it <= _core.MAX_ITERATION:
        raise OutOfRange(f"iteration ids are integers 0..2**64-2, got {value!r}")
    return it


def after_id(value: object) -> int:
    """``read(after=...)``: an integer -1..2**64-3, so that a later id can exist."""
    try:
        after = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        after = -2
    # An iteration after 2**64-2 cannot exist (2**64-1 is reserved), so waiting for one is refused.
    if not -1 <= after < _core.MAX_ITERATION:
        raise OutOfRange(f"after must be None or an integer -1..2**64-3, got {value!r}")
    return after
