"""The order book's numbers: exact decimals (never a float), level replace/delete, OBI, Bitget's checksum."""

from __future__ import annotations

import zlib
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simbridge.demos.orderbook.bitget import parse_message
from simbridge.demos.orderbook.book import L2Book
from simbridge.demos.orderbook.errors import (
    DecimalOverflow,
    FeedProtocolError,
    InvalidDecimal,
    NonFiniteDecimal,
    TooManyDecimals,
)
from simbridge.demos.orderbook.fixed import format_fixed, parse_fixed
from simbridge.errors import SimbridgeError


def test_the_issue_price_round_trips_exactly() -> None:
    value, digits = parse_fixed("30000.96", 8)
    assert value == 3_000_096_000_000
    assert format_fixed(value, 8, digits) == "30000.96"
    assert Decimal(float("30000.96")) != Decimal("30000.96")  # the float route: 30000.959999...


canonical = st.builds(
    lambda whole, fraction: whole + (f".{fraction}" if fraction else ""),
    st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,9}", fullmatch=True)),
    st.from_regex(r"[0-9]{0,8}", fullmatch=True),
)


@given(canonical)
def test_any_decimal_string_round_trips_exactly(text: str) -> None:
    value, digits = parse_fixed(text, 8)
    assert value == int(Decimal(text) * 10**8)  # the exact value, computed without floats
    assert format_fixed(value, 8, digits) == text  # byte for byte, trailing zeros included


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("NaN", NonFiniteDecimal),
        ("inf", NonFiniteDecimal),
        ("-Infinity", NonFiniteDecimal),
        ("1.123456789", TooManyDecimals),
        ("99999999999.5", DecimalOverflow),
        ("9" * 5000, DecimalOverflow),
        ("1e5", InvalidDecimal),
        ("-1.5", InvalidDecimal),
        ("01.5", InvalidDecimal),
        ("1.", InvalidDecimal),
        ("", InvalidDecimal),
        (" 1.5", InvalidDecimal),
    ],
)
def test_bad_decimals_are_typed_errors(text: str, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        parse_fixed(text, 8)
    assert isinstance(caught.value, SimbridgeError) and isinstance(caught.value, ValueError)


def test_an_update_replaces_its_level_and_size_zero_deletes_it() -> None:
    book = L2Book()
    lv = book.parse_level
    book.apply_snapshot([lv("30000.96", "1.5"), lv("30000.95", "2")], [lv("30000.97", "3")])
    book.apply_update([lv("30000.96", "0.25")], [])
    assert [(x.price, x.size) for x in book.bids.top(5)] == [
        (3_000_096_000_000, 25_000_000),
        (3_000_095_000_000, 200_000_000),
    ]
    book.apply_update([lv("30000.96", "0")], [lv("30000.98", "0"), lv("30000.97", "0.0")])
    assert len(book.bids) == 1 and len(book.asks) == 0  # deleting a level that is not there is a no-op
    assert book.best_bid() == lv("30000.95", "2")


def test_imbalance_over_the_top_levels() -> None:
    book = L2Book()
    lv = book.parse_level
    book.apply_snapshot([lv("10", "3"), lv("9", "100")], [lv("11", "1"), lv("12", "100")])
    assert book.imbalance(1) == pytest.approx(0.5)
    assert book.imbalance(2) == pytest.approx((103 - 101) / 204)
    assert book.mid() == 10.5


def _crc32_bitwise(data: bytes) -> int:
    """IEEE CRC-32 without zlib, so the checksum is checked against an independent computation."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_checksum_as_bitget_documents_it() -> None:
    # The two examples of Bitget's depth-channel page: interleaved bid/ask, and a short side skipped.
    book = L2Book()
    lv = book.parse_level
    book.apply_snapshot([lv("43231.1", "4"), lv("43231", "6")], [lv("43232.8", "9"), lv("43232.9", "8")])
    assert book.checksum_text() == "43231.1:4:43232.8:9:43231:6:43232.9:8"
    assert book.checksum() == -1504501796  # signed 32-bit, as the exchange sends it
    assert _crc32_bitwise(book.checksum_text().encode()) - 2**32 == -1504501796
    book.apply_snapshot([lv("3366.1", "7")], [lv("3366.8", "9"), lv("3368", "8"), lv("3372", "8")])
    assert book.checksum_text() == "3366.1:7:3366.8:9:3368:8:3372:8"
    assert book.checksum() == 831078360 == _crc32_bitwise(b"3366.1:7:3366.8:9:3368:8:3372:8")


def test_checksum_uses_the_original_text_and_only_the_top_25_levels() -> None:
    book = L2Book()
    lv = book.parse_level
    # "0.5000" must stay "0.5000" (the documented trap), so each level keeps its text's digits.
    book.apply_snapshot(
        [lv(f"{100 - i}.00", "0.5000") for i in range(30)], [lv(f"{101 + i}.00", "1.0") for i in range(30)]
    )
    text = book.checksum_text()
    assert text.startswith("100.00:0.5000:101.00:1.0:99.00:0.5000:")
    assert text.count(":") == 25 * 4 - 1
    assert book.checksum() == zlib.crc32(text.encode()) - (2**32 if zlib.crc32(text.encode()) >= 2**31 else 0)


def test_a_float_in_a_push_is_refused() -> None:
    push = (
        '{"action":"update","arg":{},"data":'
        '[{"bids":[[30000.96,"1"]],"asks":[],"checksum":1,"seq":2,"ts":"1"}]}'
    )
    with pytest.raises(FeedProtocolError, match=r"JSON number 30000\.96"):
        parse_message(push, L2Book())


_price = st.integers(1, 400).map(lambda cents: f"{cents // 100}.{cents % 100:02d}")
_size = st.one_of(
    st.just("0"), st.integers(1, 10**6).map(lambda units: f"{units // 10**4}.{units % 10**4:04d}")
)


@given(st.lists(st.tuples(st.booleans(), _price, _size), max_size=60))
def test_the_book_matches_a_decimal_model_after_any_updates(updates: list[tuple[bool, str, str]]) -> None:
    book = L2Book()
    model: dict[bool, dict[Decimal, Decimal]] = {True: {}, False: {}}
    for is_bid, price, size in updates:
        level = book.parse_level(price, size)
        book.apply_update([level] if is_bid else [], [] if is_bid else [level])
        if Decimal(size) == 0:
            model[is_bid].pop(Decimal(price), None)
        else:
            model[is_bid][Decimal(price)] = Decimal(size)
    for is_bid, side in ((True, book.bids), (False, book.asks)):
        expected = sorted(model[is_bid].items(), reverse=is_bid)
        got = [(Decimal(lv.price) / 10**8, Decimal(lv.size) / 10**8) for lv in side.top(1000)]
        assert got == expected
