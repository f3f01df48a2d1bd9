"""Pure helpers of the SSH transport: remote path confinement, output patterns, the few remote
scripts (hashing, probing, removal), the parsing of sha256sum's output and the typed error a
failed command's stderr points to.

Nothing here touches the network, so every rule that keeps a name from escaping ``remote_root``
or from being read by the remote shell as code is tested without a host. Names travel to the
remote side only in two ways: quoted with ``shlex.quote`` inside a script, or NUL-separated on
the command's stdin (read by ``xargs -0``, never by the shell).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from collections.abc import Iterable, Sequence
from pathlib import PurePosixPath

from simbridge.jobs.errors import (
    BadNameError,
    RemoteDiskFullError,
    RemotePathError,
    RemotePermissionError,
    TransferError,
)
from simbridge.jobs.names import safe_key
from simbridge.jobs.transport.base import CommandResult

# Prefix of the temporary names files are written under before the rename; listings skip them.
PARTIAL_PREFIX = ".sb-part."
_HEX64 = re.compile(rb"^[0-9a-f]{64}$")
# Every script runs with the C locale so error texts (matched below) are the same everywhere.
PRELUDE = "LC_ALL=C; export LC_ALL; "
_FULL = re.compile(rb"No space left on device|Disk quota exceeded")
_DENIED = re.compile(rb"Permission denied|Read-only file system|Operation not permitted")


def confine(root: PurePosixPath, path: PurePosixPath | str, *, host: str) -> PurePosixPath:
    """``path`` if it lies strictly below ``root`` (lexically, no '..', no NUL); else RemotePathError."""
    text = str(path)
    fix = "only folders below remote_root are used; check the case/beam keys and clusters.*.remote_root"
    if "\x00" in text:
        raise RemotePathError(f"{host}: remote path {text!r} contains a NUL byte; {fix}")
    candidate = PurePosixPath(text)
    if not candidate.is_absolute():
        candidate = root / candidate
    if ".." in candidate.parts or text.startswith("//"):
        raise RemotePathError(f"{host}: remote path {text!r} contains '..'; {fix}")
    n = len(root.parts)
    if candidate.parts[:n] != root.parts or len(candidate.parts) <= n:
        raise RemotePathError(f"{host}: remote path {text!r} is not below remote_root {str(root)!r}; {fix}")
    return candidate


def beam_path(root: PurePosixPath, case_key: str, beam_key: str, *, host: str) -> PurePosixPath:
    """``root/case/beam`` for keys that are already safe components (anything else refused)."""
    for key in (case_key, beam_key):
        try:
            ok = key == safe_key(key)
        except BadNameError:
            ok = False
        if not ok:
            raise RemotePathError(
                f"{host}: {key!r} is not a safe case/beam key (map names with safe_key first)"
            )
    return confine(root, root / case_key / beam_key, host=host)


def check_pattern(pattern: str) -> tuple[str, ...]:
    """Split an output glob (relative to the beam folder) into components; refuse any escape."""
    if not pattern or "\x00" in pattern:
        raise TransferError(
            f"output pattern {pattern!r} is empty or holds a NUL byte; fix jobs.steps.outputs"
        )
    if pattern.startswith("/"):
        raise TransferError(f"output pattern {pattern!r} is absolute; make it relative to the beam folder")
    parts = tuple(p for p in pattern.split("/") if p not in ("", "."))
    if not parts or ".." in parts:
        raise TransferError(
            f"output pattern {pattern!r} leaves the beam folder ('..'); fix jobs.steps.outputs"
        )
    return parts


def _match_parts(name: Sequence[str], pattern: Sequence[str]) -> bool:
    if not pattern:
        return not name
    head = pattern[0]
    if head == "**":
        # '**' takes zero or more whole folders, as in pathlib's glob.
        return any(_match_parts(name[i:], pattern[1:]) for i in range(len(name) + 1))
    return bool(name) and fnmatch.fnmatchcase(name[0], head) and _match_parts(name[1:], pattern[1:])


def glob_filter(names: Iterable[str], pattern: str) -> list[str]:
    """The relative file names (``a/b.csv``) that ``pattern`` matches, sorted; partials never match."""
    parts = check_pattern(pattern)
    out = []
    for name in names:
        split = name.split("/")
        if split[-1].startswith(PARTIAL_PREFIX):
            continue
        if _match_parts(split, parts):
            out.append(name)
    return sorted(out)


def hash_script(remote_dir: PurePosixPath, *, clean_partials: bool = False, openssl: bool = True) -> str:
    """A script printing sha256sum-format lines for the NUL-separated ``./NAME`` list on its stdin.

    With ``openssl`` it hashes with ``openssl dgst -sha256 -r`` where the host has it (several
    times faster than coreutils' sha256sum: it uses the CPU's SHA instructions), else with
    sha256sum. openssl does not escape names, so callers pass ``openssl=False`` for names holding
    a newline, carriage return or backslash. With ``clean_partials`` it first removes the
    temporary files a killed upload left behind.
    """
    d = shlex.quote(str(remote_dir))
    clean = ""
    if clean_partials:
        clean = f"find . -type f -name {shlex.quote(PARTIAL_PREFIX + '*')} -delete; "
    slow = "xargs -0 -r sha256sum --"
    hasher = slow
    if openssl:
        fast = "xargs -0 -r openssl dgst -sha256 -r"
        hasher = f"if command -v openssl >/dev/null 2>&1; then {fast}; else {slow}; fi"
    return f"{PRELUDE}cd -- {d} && {{ {clean}{hasher}; }}"


def needs_escaping(name: str) -> bool:
    """True for a name sha256sum escapes in its output (openssl would print it raw)."""
    return any(c in name for c in "\n\r\\")


def probe_script(remote_dir: PurePosixPath, nbytes: int) -> str:
    """A script writing (then removing) ``nbytes`` in ``remote_dir``: its error text says why writes fail."""
    d = shlex.quote(str(remote_dir))
    probe = shlex.quote(PARTIAL_PREFIX + "probe")
    return (
        f"{PRELUDE}cd -- {d} || exit 3; head -c {int(nbytes)} /dev/zero > {probe}; rc=$?; "
        f"rm -f -- {probe}; exit $rc"
    )


def remove_script(remote_dir: PurePosixPath) -> str:
    """A script removing one (already confined) beam folder."""
    return f"{PRELUDE}rm -rf -- {shlex.quote(str(remote_dir))}"


def names_stdin(names: Iterable[str]) -> bytes:
    """NUL-separated ``./NAME`` records for ``xargs -0`` ('./': a leading '-' is never an option)."""
    return b"".join(b"./" + name.encode("utf-8", "surrogateescape") + b"\0" for name in names)


def _rel(raw: bytes) -> str:
    name = raw.decode("utf-8", "surrogateescape")
    return name[2:] if name.startswith("./") else name


def _unescape(raw: bytes) -> bytes:
    # sha256sum escapes '\\', '\n' (and '\r' in newer coreutils) in names and marks the line with '\'.
    out = bytearray()
    i = 0
    while i < len(raw):
        c = raw[i : i + 1]
        if c == b"\\" and i + 1 < len(raw):
            nxt = raw[i + 1 : i + 2]
            out += {b"n": b"\n", b"r": b"\r", b"\\": b"\\"}.get(nxt, b"\\" + nxt)
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def parse_hashes(data: bytes) -> dict[str, str]:
    """sha256sum's output -> {relative name: hex digest}; malformed lines are refused."""
    out: dict[str, str] = {}
    for line in data.split(b"\n"):
        if not line:
            continue
        escaped = line.startswith(b"\\")
        body = line[1:] if escaped else line
        digest, sep, name = body[:64], body[64:66], body[66:]
        if not _HEX64.match(digest) or sep not in (b"  ", b" *") or not name:
            raise TransferError(f"unexpected sha256sum output line {line[:200]!r}")
        out[_rel(_unescape(name) if escaped else name)] = digest.decode()
    return out


def refused(stderr: bytes) -> bool:
    """True when a command's error text says the disk is full or the write was refused."""
    return bool(_FULL.search(stderr) or _DENIED.search(stderr))


def check_result(result: CommandResult, what: str, *, host: str, remote_root: PurePosixPath) -> None:
    """Nothing for a command that exited 0; else the typed error its stderr points to."""
    if result.ok:
        return
    err = result.stderr.strip()
    tail = err[-500:].decode("utf-8", "backslashreplace")
    if _FULL.search(err):
        raise RemoteDiskFullError(
            f"{host}: {what}: the remote disk is full ({tail}); free space under "
            f"{remote_root} or raise the quota"
        )
    if _DENIED.search(err):
        raise RemotePermissionError(
            f"{host}: {what}: permission denied ({tail}); make {remote_root} writable "
            "for the SSH user or choose another clusters.*.remote_root"
        )
    raise TransferError(f"{host}: {what} failed (exit {result.exit_status}): {tail}")
