"""Pure helpers of the SSH transport: confinement, patterns, listing scripts and their parsing."""

from __future__ import annotations

import hashlib
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
    names_stdin,
    needs_escaping,
    parse_hashes,
)

ROOT = PurePosixPath("/scratch/sim")


@pytest.mark.parametrize("path", ["/scratch/sim/c/b", "c/b", "/scratch/sim/c", "/scratch/sim/a b/$(x)"])
def test_confine_accepts_below_root(path: str) -> None:
    got = confine(ROOT, path, host="h")
    assert got.parts[:3] == ROOT.parts and len(got.parts) > 3


@pytest.mark.parametrize(
    "path",
    [
        "/scratch/sim",
        "/scratch",
        "/scratch/sim/../x",
        "../x",
        "/scratch/sim/c/../../x",
        "/etc/passwd",
        "/scratch/simx/y",
        "/scratch/sim/a\x00b",
        "//scratch/sim/x",
    ],
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


def test_hash_script_on_this_machine(tmp_path: Path) -> None:
    """The generated script, run by a real sh here on hostile names, hashes exactly the names given."""
    root = tmp_path / "r o'ot $(x)"
    names = ["-lead", "a b", "q'x", "new\nline", "back\\slash", "ü", "sub/f"]
    (root / "sub").mkdir(parents=True)
    for name in names:
        (root / name).write_bytes(name.encode())
    (root / ".sb-part.1").write_bytes(b"partial")
    d = PurePosixPath(root)
    assert [n for n in names if needs_escaping(n)] == ["new\nline", "back\\slash"]
    out = subprocess.run(
        ["sh", "-c", hash_script(d, clean_partials=True, openssl=False)],
        input=names_stdin(names),
        capture_output=True,
        check=True,
    )
    got = parse_hashes(out.stdout)
    assert got == {name: hashlib.sha256(name.encode()).hexdigest() for name in names}
    assert not (root / ".sb-part.1").exists()
    plain = [n for n in names if not needs_escaping(n)]
    fast = subprocess.run(
        ["sh", "-c", hash_script(d)], input=names_stdin(plain), capture_output=True, check=True
    )
    assert parse_hashes(fast.stdout) == {n: got[n] for n in plain}
    missing = subprocess.run(
        ["sh", "-c", hash_script(d)], input=names_stdin(["nope", "a b"]), capture_output=True, check=False
    )
    assert missing.returncode != 0 and list(parse_hashes(missing.stdout)) == ["a b"]
    assert shlex.quote(str(d)) in hash_script(d)


def test_parse_jump() -> None:
    assert parse_jump("gw") == (None, "gw", 22)
    assert parse_jump("me@gw:2222") == ("me", "gw", 2222)
    assert parse_jump("me@[::1]:22") == ("me", "::1", 22)
    with pytest.raises(ValueError):
        parse_jump("me@:22")
