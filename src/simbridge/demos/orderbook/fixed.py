"""Exact fixed-point decimals: ``"30000.96"`` is the int64 ``3000096000000`` at scale 10**8, never a float.

A value remembers how many fraction digits its text had, so :func:`format_fixed` gives back the very
string the exchange sent (``"0.0500"`` stays ``"0.0500"``) — the exchange's checksum is over that text.
"""

from __future__ import annotations

import re

from simbridge.demos.orderbook.errors import (
    DecimalOverflow,
    InvalidDecimal,
    NonFiniteDecimal,
    TooManyDecimals,
)

INT64_MAX = 2**63 - 1
MAX_SCALE = 18
# Canonical decimals only: no sign, exponent, spaces or redundant leading zeros. Anything else could
# not be written back byte for byte, and the checksum would fail on a correct book.
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)(?:\.([0-9]+))?")
_NON_FINITE = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"})


def parse_fixed(text: str, scale: int) -> tuple[int, int]:
    """``text`` as ``(value * 10**scale, fraction digits of text)``; typed errors for anything else."""
    if not 0 <= scale <= MAX_SCALE:
        raise ValueError(f"scale {scale} is outside 0..{MAX_SCALE}")
    match = _DECIMAL.fullmatch(text)
    if match is None:
        if text.strip().lower() in _NON_FINITE:
            raise NonFiniteDecimal(f"{text!r} is not a finite number; prices and sizes must be", text=text)
        raise InvalidDecimal(
            f"{text!r} is not a plain decimal like '30000.96' (digits, one optional point, no sign, "
            "exponent or leading zeros)",
            text=text[:64],
        )
    whole, fraction = match.group(1), match.group(2) or ""
    if len(fraction) > scale:
        raise TooManyDecimals(
            f"{text!r} has {len(fraction)} decimals; this book keeps {scale} — raise its scale",
            text=text,
        )
    # Bounded before int(): a 10,000-digit string must not cost a big-integer conversion.
    if len(whole) + scale > 19:
        raise DecimalOverflow(f"{text!r} does not fit an int64 at scale {scale}", text=text[:64])
    value = int(whole + fraction.ljust(scale, "0"))
    if value > INT64_MAX:
        raise DecimalOverflow(f"{text!r} does not fit an int64 at scale {scale}", text=text)
    return value, len(fraction)


def format_fixed(value: int, scale: int, digits: int) -> str:
    """The decimal text of ``value / 10**scale`` with exactly ``digits`` fraction digits."""
    if value < 0:
        raise ValueError(f"fixed-point value {value} is negative")
    if not 0 <= digits <= scale:
        raise ValueError(f"{digits} fraction digits is outside 0..{scale}")
    whole, fraction = divmod(value, 10**scale)
    if digits == 0:
        return str(whole)
    return f"{whole}.{str(fraction).rjust(scale, '0')[:digits]}"
