"""CRC32C: known vectors, a bitwise reference, and the hardware path against the software path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from simbridge.shm import _core


def reference_crc32c(data: bytes, crc: int = 0) -> int:
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_known_vectors() -> None:
    assert _core.crc32c(b"123456789") == 0xE3069283
    assert _core.crc32c(b"") == 0
    assert _core.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros
    assert _core.crc32c(bytes([0xFF] * 32)) == 0x62A8AB43  # RFC 3720 B.4: 32 bytes of 0xff


@given(st.binary(max_size=600), st.integers(0, 7))
@settings(max_examples=300)
def test_matches_bitwise_reference_at_any_alignment(data: bytes, skip: int) -> None:
    view = memoryview(bytes(skip) + data)[skip:]
    assert _core.crc32c(view) == reference_crc32c(data)


@given(st.binary(min_size=256, max_size=4000), st.integers(0, 31))
@settings(max_examples=60, deadline=None)
def test_folding_sizes_match_the_reference(data: bytes, skip: int) -> None:
    view = memoryview(bytes(skip) + data)[skip:]
    assert _core.crc32c(view) == reference_crc32c(data)


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_can_be_continued(a: bytes, b: bytes) -> None:
    assert _core.crc32c(b, _core.crc32c(a)) == _core.crc32c(a + b)


SIZES = [0, 1, 7, 8, 15, 16, 17, 31, 32, 33, 255, 256, 257, 271, 272, 383, 384, 385, 400, 767, 768]
SIZES += [769, 24575, 24576, 24577, 49152 + 771, 65536, 199_000]


def test_every_path_agrees_on_large_buffers(not_run_here: Callable[[str], None]) -> None:
    # Lengths around the folding path's 256/128/32/16-byte steps and the instruction path's
    # 3 x 8 KiB and 3 x 256 B interleaving boundaries, at odd offsets, whole and continued in pieces.
    script = (
        "import json\n"
        "from simbridge.shm import _core\n"
        "blob = bytes((i * 7919 + 13) % 251 for i in range(200_003))\n"
        f"sizes = {SIZES}\n"
        "whole = [_core.crc32c(memoryview(blob)[o:o + n]) for n in sizes for o in (0, 1, 3)]\n"
        "pieces = _core.crc32c(memoryview(blob)[65536:], _core.crc32c(memoryview(blob)[:65536]))\n"
        "print(json.dumps([whole, pieces, _core.crc32c(blob)]))\n"
        "print(_core.crc32c_path())\n"
    )
    runs = {}
    for force in ("", "instruction", "software"):
        env = {**os.environ, "SIMBRIDGE_CRC32C": force}
        out = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split("\n")
        runs[force] = out
    assert runs["software"][1] == "software"
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    if {"avx2", "pclmulqdq", "vpclmulqdq", "sse4_2"} <= flags:
        assert runs[""][1] == "fold"
    else:
        not_run_here("the default path chooses the folding kernel: this CPU lacks AVX2/VPCLMULQDQ")
    assert runs["instruction"][1] in ("instruction", "software")  # no CRC instruction on this CPU
    assert runs[""][0] == runs["instruction"][0] == runs["software"][0]
    whole, pieces, full = json.loads(runs["software"][0])
    assert pieces == full
    blob = bytes((i * 7919 + 13) % 251 for i in range(200_003))
    assert whole[SIZES.index(400) * 3 + 1] == reference_crc32c(blob[1:401])
    assert _core.crc32c(blob[1:24578]) == reference_crc32c(blob[1:24578])
