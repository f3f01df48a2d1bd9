"""Outside names (case and beam folders) map to safe keys: never a path escape, never shell text."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given

from simbridge.jobs.errors import BadNameError
from simbridge.jobs.names import child_path, safe_key

HOSTILE = [
    "../etc",
    "a/b",
    "x; rm -rf /",
    "$(touch pwned)",
    "`id`",
    'it\'s "quoted"',
    "with space",
    "ünïcødé-ß",
    "-rf",
    ".hidden",
    "a" * 300,
    "..x..",
    "tab\there",
    "new\nline",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_map_to_safe_keys(name: str) -> None:
    key = safe_key(name)
    assert key == safe_key(key)
    assert len(key) <= 64
    assert "/" not in key and ".." not in key
    assert key[0].isalnum()
    assert all(c.isalnum() or c in "._-" for c in key)


@pytest.mark.parametrize("name", ["", ".", "..", "nul\x00byte"])
def test_unusable_names_are_rejected(name: str) -> None:
    with pytest.raises(BadNameError):
        safe_key(name)


def test_plain_names_are_kept() -> None:
    assert safe_key("beam_1") == "beam_1"
    assert safe_key("Case-2024.01") == "Case-2024.01"


def test_different_names_get_different_keys() -> None:
    assert safe_key("a b") != safe_key("a_b") != safe_key("a;b")


@given(st.text(min_size=1, max_size=300))
def test_any_text_is_safe_or_rejected(name: str) -> None:
    try:
        key = safe_key(name)
    except BadNameError:
        return
    assert key == safe_key(key)
    assert "/" not in key and key not in {".", ".."} and not key.startswith(("-", "."))


def test_child_path_refuses_unsafe(tmp_path: Path) -> None:
    assert child_path(tmp_path, "ok") == tmp_path / "ok"
    with pytest.raises(BadNameError):
        child_path(tmp_path, "../x")
