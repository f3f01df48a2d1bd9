"""Pure helpers of the SSH transport: confinement, patterns, listing scripts and their parsing."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path, PurePosixPath

import pytest

from simbridge.jobs.errors import RemotePathError, TransferError
from simbridge.jobs.transport.ssh_connection import parse_jump
from simbridge.jobs.transport.ssh_paths import (
    beam_path,
    check_pattern,
    confine,
    glob_filter,
    hash_script,
    listing_script,
    names_stdin,
    parse_hashes,
    parse_listing,
)

ROOT = PurePosixPath("/scratch/sim")


@pytest.mark.parametrize(
    "path", ["/scratch/sim/c/b", "c/b", "/scratch/sim/c", "/scratch/sim/a b/$(x)"]
)
def test_confine_accepts_below_root(path: str) -> None:
    got = confine(ROOT, path, host="h")
    assert got.parts[:3] == ROOT.parts and len(got.parts) > 3


@pytest.mark.parametrize(
    "path",
    ["/scratch/sim", "/scratch", "/scratch/sim/../x", "../x", "/scratch/sim/c/../../x", "/etc/passwd",
     "/scratch/simx/y", "/scratch/sim/a\x00b", "//scratch/sim/x"],
)
def test_confine_refuses_escapes(path: str) -> None:
    with pytest.raises(RemotePathError, match="h:"):
        confine(ROOT, path, host="h")


def test_beam_path_needs_safe_keys() -> None:
    assert beam_path(ROOT, "case-1", "beam.2", host="h") == ROOT / "case-1" / "beam.2"
    for case, beam in [("..", "b"), ("c", "a/b"), ("-x", "b"), ("c", "a b"), ("", "b")]:
        with pytest.raises(RemotePathError):
            beam_path(ROOT, case, beam, host="h")


def test_patterns() -> None:
    names = ["raw", "a.csv", "sub/b.csv", "sub/deep/c.csv", ".sb-part.123", "sub/.sb-part.9"]
    assert glob_filter(names, "*.csv") == ["a.csv"]
    assert glob_filter(names, "sub/*.csv") == ["sub/b.csv"]
    assert glob_filter(names, "**/*.csv") == ["a.csv", "sub/b.csv", "sub/deep/c.csv"]
    assert glob_filter(names, "*") == ["a.csv", "raw"]
    assert glob_filter(names, "./raw") == ["raw"]
    for bad in ["", "/etc/*", "../*", "a/../../b", "x\x00"]:
        with pytest.raises(TransferError):
            check_pattern(bad)


def test_parse_hashes_unescapes_names() -> None:
    h = "a" * 64
    out = parse_hashes(
        f"{h}  ./plain\n\\{h}  ./new\\nline\n\\{h}  ./back\\\\slash\n{h} *./bin ary\n".encode()
    )
    assert out == {"plain": h, "new\nline": h, "back\\slash": h, "bin ary": h}
    with pytest.raises(TransferError):
        parse_hashes(b"nothex  ./x\n")


def test_parse_listing() -> None:
    h = "b" * 64
    data = b"3 ./a b\x0010 ./sub/c\x00\x00" + f"{h}  ./a b\n{h}  ./sub/c\n".encode()
    got = parse_listing(data, hashes=True)
    assert got["a b"].size == 3 and got["a b"].sha256 == h and got["sub/c"].size == 10
    assert parse_listing(b"\x00", hashes=True) == {}
    assert parse_listing(b"", hashes=True) == {}
    assert parse_listing(b"5 ./x\x00", hashes=False)["x"].size == 5
    with pytest.raises(TransferError):
        parse_listing(b"notasize ./x\x00", hashes=False)


def test_scripts_on_this_machine(tmp_path: Path) -> None:
    """The generated scripts, run by a real sh here on hostile names, list and hash correctly."""
    root = tmp_path / "r o'ot $(x)"
    names = ["-lead", "a b", "q'x", "new\nline", "back\\slash", "ü"]
    root.mkdir()
    (root / "sub").mkdir()
    for name in names:
        (root / name).write_bytes(name.encode())
    (root / "sub" / "f").write_bytes(b"f")
    (root / ".sb-part.1").write_bytes(b"partial")
    (root / "link").symlink_to("/etc/passwd")
    d = PurePosixPath(root)
    out = subprocess.run(["sh", "-c", listing_script(d, hashes=True)], capture_output=True, check=True)
    listing = parse_listing(out.stdout, hashes=True)
    assert sorted(listing) == sorted([*names, "sub/f"])
    import hashlib

    for name in names:
        assert listing[name].sha256 == hashlib.sha256(name.encode()).hexdigest()
        assert listing[name].size == len(name.encode())
    out = subprocess.run(
        ["sh", "-c", hash_script(d)], input=names_stdin(["-lead", "new\nline"]), capture_output=True,
        check=True,
    )
    assert sorted(parse_hashes(out.stdout)) == ["-lead", "new\nline"]
    missing = subprocess.run(["sh", "-c", listing_script(d / "nope", hashes=True)], capture_output=True)
    assert missing.returncode == 0 and missing.stdout == b""
    assert shlex.quote(str(d)) in listing_script(d, hashes=False)


def test_parse_jump() -> None:
    assert parse_jump("gw") == (None, "gw", 22)
    assert parse_jump("me@gw:2222") == ("me", "gw", 2222)
    assert parse_jump("me@[::1]:22") == ("me", "::1", 22)
    with pytest.raises(ValueError):
        parse_jump("me@:22")
