"""Moving one file over SFTP, fast and verifiably, and the local side of it.

Throughput comes from pipelining: a file is cut into chunks, each written or read by asyncssh
as ``max_requests`` parallel SFTP requests of ``block_size`` bytes, and a few chunks are in
flight at once, so a 20 ms round trip costs one round trip per window, not per block. Local
reads, writes and hashing run in the loop's thread pool (hashlib releases the GIL), keeping the
event loop free to move bytes. The sha256 is computed over the bytes as they stream, in order.

Local files are opened through files.py (no link or special file is followed at any component);
downloads are written to an ``O_EXCL | O_NOFOLLOW`` temporary name beside the target and renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import stat
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import asyncssh

from simbridge.jobs.errors import TransferError, UnsafeFileError
from simbridge.jobs.files import check_tree, open_dir, open_parent, open_regular, show
from simbridge.jobs.transport.ssh_paths import PARTIAL_PREFIX

CHUNK = 4 << 20
# Upload: 2 chunks x 16 requests x ~255 KB, ~8 MB in flight (400 MB/s at a 20 ms round trip);
# more outstanding writes only queued up in sftp-server here. Download: 3 chunks ahead.
CHUNKS_IN_FLIGHT = 2
READ_CHUNKS = 3


@dataclass(frozen=True)
class Tuning:
    """SFTP request size and requests in flight per chunk; the size from which a file streams
    over an exec channel (ssh_stream.py) instead of SFTP: below it the remote shell's start-up
    (0.1-0.8 s here) costs more than the faster stream saves."""

    block_size: int = 256 * 1024 - 1024
    max_requests: int = 16
    stream_min: int = 64 << 20


@dataclass(frozen=True)
class TransferReport:
    """What one upload or download did: files in all, files sent/fetched, skipped, bytes moved."""

    files: int
    sent: int
    skipped: int
    bytes: int


def hash_local(local_dir: Path, parts: tuple[str, ...]) -> str:
    """sha256 of the local file ``local_dir/parts`` (opened without following links)."""
    fd = open_regular(local_dir, parts, where=f"(in {local_dir})")
    try:
        return sha256_fd(fd)
    finally:
        os.close(fd)


def local_files(root: Path) -> list[tuple[tuple[str, ...], int]]:
    """Every regular file below ``root`` as (relative parts, size); links and special files refused."""
    check_tree(root, where=f"(in {root})")
    out: list[tuple[tuple[str, ...], int]] = []

    def walk(fd: int, parts: tuple[str, ...]) -> None:
        for name in sorted(os.listdir(fd)):
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            rel = (*parts, name)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                try:
                    walk(sub, rel)
                finally:
                    os.close(sub)
            elif stat.S_ISREG(st.st_mode):
                out.append((rel, st.st_size))
            else:
                raise UnsafeFileError(f"{show(rel)} (in {root}) is not a regular file or folder")

    top = open_dir(root)
    try:
        walk(top, ())
    finally:
        os.close(top)
    return out


def partial_name() -> str:
    """A fresh temporary file name (listings and patterns skip this prefix)."""
    return f"{PARTIAL_PREFIX}{secrets.token_hex(8)}"


def read_hash(fd: int, offset: int, size: int, digest: hashlib._Hash) -> bytes:
    """Read ``size`` bytes of ``fd`` at ``offset`` and feed them to ``digest`` (thread-pool work)."""
    data = os.pread(fd, size, offset)
    digest.update(data)
    return data


def sha256_fd(fd: int) -> str:
    """sha256 of an open file from its start."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


async def _drain(pending: set[asyncio.Future[int]], keep: int) -> set[asyncio.Future[int]]:
    while len(pending) > keep:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    return pending


async def _settle(future: asyncio.Future[Any] | None) -> None:
    """Wait for a thread-pool job to end (it may use a descriptor the caller is about to close)."""
    if future is not None:
        await asyncio.wait([future])


async def put_file(
    sftp: asyncssh.SFTPClient, fd: int, size: int, tmp: bytes, final: bytes, *, tuning: Tuning
) -> str:
    """Write ``size`` bytes of ``fd`` to ``tmp`` on the host, rename to ``final``; the sha256 sent.

    The next chunk is read (and hashed, in order) in the thread pool while the current ones are
    on the wire, so the disk, the hash and the link work at the same time.
    """
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    pending: set[asyncio.Future[int]] = set()
    reading: asyncio.Future[bytes] | None = None
    try:
        async with sftp.open(tmp, "wb", block_size=tuning.block_size, max_requests=tuning.max_requests) as f:
            offset = 0
            if size:
                reading = loop.run_in_executor(None, read_hash, fd, 0, min(CHUNK, size), digest)
            while reading is not None:
                data = await reading
                n = min(CHUNK, size - offset)
                if len(data) != n:
                    raise TransferError(f"the local file shrank while it was uploaded (at byte {offset})")
                nxt = offset + n
                reading = None
                if nxt < size:
                    reading = loop.run_in_executor(None, read_hash, fd, nxt, min(CHUNK, size - nxt), digest)
                pending.add(asyncio.ensure_future(f.write(data, offset)))
                pending = await _drain(pending, CHUNKS_IN_FLIGHT - 1)
                offset = nxt
            await _drain(pending, 0)
            if os.fstat(fd).st_size != size:
                raise TransferError("the local file changed size while it was uploaded")
        await sftp.posix_rename(tmp, final)
    except BaseException:
        for task in pending:
            task.cancel()
        await _settle(reading)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sftp.remove(tmp), 5.0)
        raise
    return digest.hexdigest()


def open_local_parent(root: Path, parts: Sequence[str]) -> int:
    """Open (creating) the folder of ``root/parts`` without following a link anywhere below root."""
    return open_parent(root, parts, where=f"(in {root})", why="is a link or a file, not a folder")


def open_tmp(parent_fd: int, tmp: str) -> int:
    """Create the temporary file ``tmp`` in ``parent_fd`` for writing: exclusively, no link followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(tmp, flags, 0o644, dir_fd=parent_fd)


def write_hash(out: int, pieces: Sequence[bytes], digest: hashlib._Hash) -> None:
    """Append ``pieces`` to ``out`` and feed them to ``digest``, in order (thread-pool work)."""
    for piece in pieces:
        digest.update(piece)
        view = memoryview(piece)
        while view:
            view = view[os.write(out, view) :]


async def get_file(
    sftp: asyncssh.SFTPClient, remote: bytes, size: int, parent_fd: int, tmp: str, *, tuning: Tuning
) -> str:
    """Read ``remote`` into ``tmp`` (in ``parent_fd``, created exclusively); the sha256 received.

    Up to READ_CHUNKS chunks are requested ahead while the thread pool writes and hashes the
    previous one, in order. Reading goes past the listed size while chunks come back full: a file
    that grew must fail the hash, not be cut short.
    """
    loop = asyncio.get_running_loop()
    digest = hashlib.sha256()
    out = open_tmp(parent_fd, tmp)
    reads: deque[asyncio.Future[bytes]] = deque()
    writing: asyncio.Future[None] | None = None
    try:
        async with sftp.open(
            remote, "rb", block_size=tuning.block_size, max_requests=tuning.max_requests
        ) as f:
            offset = 0

            def refill(*, grown: bool) -> None:
                nonlocal offset
                while len(reads) < READ_CHUNKS and (offset <= size or grown):
                    reads.append(asyncio.ensure_future(f.read(CHUNK, offset)))
                    offset += CHUNK
                    grown = False

            refill(grown=False)
            while reads:
                data = await reads.popleft()
                done = len(data) < CHUNK
                if not done:
                    refill(grown=not reads)
                await _settle(writing)
                if writing is not None:
                    writing.result()
                writing = loop.run_in_executor(None, write_hash, out, [data], digest) if data else None
                if done:
                    break
            await _settle(writing)
            if writing is not None:
                writing.result()
    finally:
        for task in reads:
            task.cancel()
        await _settle(writing)
        os.close(out)
    return digest.hexdigest()


def remote_bytes(path: PurePosixPath) -> bytes:
    """A remote path as SFTP bytes (undecodable local names travel as they were)."""
    return str(path).encode("utf-8", "surrogateescape")


async def walk_remote(
    sftp: asyncssh.SFTPClient, root: PurePosixPath, *, max_depth: int, partials: list[str] | None = None
) -> dict[str, int] | None:
    """Regular files below ``root`` as {relative name: size}, by SFTP (no remote shell);
    None when ``root`` does not exist. Entries are lstat'ed by the server: a link is no file
    and no folder here, so nothing is followed. Folders are listed in parallel. Temporary
    (``.sb-part.*``) files are left out, and appended to ``partials`` when it is given."""
    found: dict[str, int] = {}

    async def walk(path: PurePosixPath, rel: tuple[str, ...]) -> None:
        subs: list[str] = []
        for entry in await sftp.readdir(remote_bytes(path)):
            raw = entry.filename
            name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            if name in (".", ".."):
                continue
            kind = entry.attrs.type
            if kind == asyncssh.FILEXFER_TYPE_REGULAR and name.startswith(PARTIAL_PREFIX):
                if partials is not None:
                    partials.append("/".join((*rel, name)))
            elif kind == asyncssh.FILEXFER_TYPE_REGULAR:
                found["/".join((*rel, name))] = entry.attrs.size or 0
            elif kind == asyncssh.FILEXFER_TYPE_DIRECTORY and len(rel) + 1 < max_depth:
                subs.append(name)
        await asyncio.gather(*(walk(path / name, (*rel, name)) for name in subs))

    try:
        await walk(root, ())
    except asyncssh.SFTPNoSuchFile:
        if not found:
            return None
        raise
    return found


async def ensure_dir(sftp: asyncssh.SFTPClient, path: PurePosixPath, *, floor: PurePosixPath) -> None:
    """``mkdir -p`` by SFTP, deepest first (one round trip when the parent exists), never above ``floor``."""
    try:
        await sftp.mkdir(remote_bytes(path))
    except asyncssh.SFTPNoSuchFile:
        if path.parent == path or len(path.parent.parts) < len(floor.parts):
            raise
        await ensure_dir(sftp, path.parent, floor=floor)
        await sftp.mkdir(remote_bytes(path))
    except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists) as exc:
        # SFTP v3 reports EEXIST as a plain failure: it is fine if a folder is there now.
        try:
            attrs = await sftp.lstat(remote_bytes(path))
        except asyncssh.SFTPError:
            raise exc from None
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            raise
