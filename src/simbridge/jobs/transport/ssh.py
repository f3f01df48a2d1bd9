"""The SSH transport: a beam's files to ``{remote_root}/{case}/{beam}/`` and its outputs back.

Upload is resumable and verified: ONE remote listing (``find`` for sizes, ``sha256sum`` for
hashes, one command per beam) says what is there already; a file whose size and sha256 match is
skipped, every other one is written under a temporary name and renamed, several at once; a
second listing of the same kind verifies every file after the upload (a mismatch is sent once
more, then ChecksumError). Download lists the matches of each output pattern remotely, hashes
them in one command, fetches each to a temporary name, checks its sha256, re-fetches once on a
mismatch and renames it into place. Every remote path is confined to ``remote_root``; names
reach the remote shell quoted, or NUL-separated on stdin. A dropped link is survived: the
connection reconnects with backoff and the interrupted file is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import asyncssh

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import (
    ChecksumError,
    HostUnreachableError,
    RemoteDiskFullError,
    RemoteError,
    RemotePathError,
    RemotePermissionError,
    TransferError,
)
from simbridge.jobs.files import open_regular
from simbridge.jobs.transport.base import CommandResult, Transport
from simbridge.jobs.transport.ssh_connection import LINK_ERRORS, SshConnection, close_all, connect
from simbridge.jobs.transport.ssh_files import (
    Tuning,
    get_file,
    local_files,
    open_local_parent,
    partial_name,
    put_file,
    sha256_fd,
)
from simbridge.jobs.transport.ssh_paths import (
    RemoteFile,
    beam_path,
    check_pattern,
    clean_partials_script,
    confine,
    glob_filter,
    hash_script,
    listing_script,
    mkdirs_script,
    names_stdin,
    parse_hashes,
    parse_listing,
    probe_script,
    remove_script,
)
from simbridge.logs import get_logger

__all__ = ["SshConnection", "SshTransport", "TransferReport", "close_all", "connect"]

log = get_logger(__name__)
_FULL = re.compile(rb"No space left on device|Disk quota exceeded")
_DENIED = re.compile(rb"Permission denied|Read-only file system|Operation not permitted")


@dataclass(frozen=True)
class TransferReport:
    """What one upload or download did: files in all, files sent/fetched, skipped, bytes moved."""

    files: int
    sent: int
    skipped: int
    bytes: int


class SshTransport(Transport):
    """Moves beam folders to and from one host over a shared :class:`SshConnection`."""

    name = "ssh"

    def __init__(
        self,
        *,
        connection: SshConnection,
        remote_root: PurePosixPath,
        parallel: int = 8,
        tuning: Tuning | None = None,
    ) -> None:
        self.connection = connection
        self.remote_root = remote_root
        self.parallel = parallel
        self.tuning = tuning or Tuning()
        self.host = connection.label
        # Test seam: called with (relative name, attempt) before each download fetch, so a test can
        # corrupt a remote file between the hash listing and the transfer.
        self.before_fetch: Callable[[str, int], None] | None = None

    @classmethod
    def from_settings(cls, settings: ClusterSettings, *, name: str | None = None) -> SshTransport:
        """The transport of one ``clusters.NAME`` entry, over that cluster's shared connection."""
        return cls(
            connection=connect(settings, name=name),
            remote_root=settings.remote_root,
            parallel=settings.transfer_parallel,
        )

    def beam_dir(self, case_key: str, beam_key: str) -> PurePosixPath:
        """``{remote_root}/{case}/{beam}``; keys must be safe components (RemotePathError otherwise)."""
        return beam_path(self.remote_root, case_key, beam_key, host=self.host)

    # ---- sync API ----------------------------------------------------------------------------

    def upload(self, local_dir: Path, remote_dir: PurePosixPath) -> int:
        """Copy every file under ``local_dir`` into ``remote_dir`` (resumable, verified); the count."""
        return self.upload_tree(local_dir, remote_dir).files

    def upload_tree(self, local_dir: Path, remote_dir: PurePosixPath) -> TransferReport:
        """:meth:`upload` with the details: how many files were sent and how many skipped."""
        target = confine(self.remote_root, remote_dir, host=self.host)
        files = local_files(local_dir)
        total = sum(size for _, size in files)
        return self.connection.call(
            lambda: self._upload(local_dir, target, files), timeout_s=self._budget(total, len(files))
        )

    def download(self, remote_dir: PurePosixPath, patterns: Sequence[str], local_dir: Path) -> list[Path]:
        """Fetch the files matching ``patterns`` (globs relative to ``remote_dir``), verified."""
        source = confine(self.remote_root, remote_dir, host=self.host)
        for pattern in patterns:
            check_pattern(pattern)
        return self.connection.call(
            lambda: self._download(source, list(patterns), local_dir), timeout_s=self._budget(1 << 40, 10_000)
        )

    def remove(self, remote_dir: PurePosixPath) -> None:
        """Remove a beam's remote folder (cleanup after success); never ``remote_root`` itself."""
        target = confine(self.remote_root, remote_dir, host=self.host)
        if len(target.parts) < len(self.remote_root.parts) + 1:
            raise RemotePathError(f"{self.host}: refusing to remove {target} (not below remote_root)")
        result = self.connection.run(remove_script(target), timeout_s=self.connection.command_timeout_s)
        self._check(result, f"remove {target}")

    # ---- helpers -----------------------------------------------------------------------------

    def _budget(self, nbytes: int, nfiles: int) -> float:
        # The outer wait of a whole transfer: generous (1 MB/s floor) but finite; the inner
        # operations have their own limits.
        c = self.connection
        return c.reconnect_s * 2 + c.command_timeout_s * 4 + nbytes / 1e6 + nfiles * 0.5

    def _check(self, result: CommandResult, what: str) -> None:
        if result.ok:
            return
        err = result.stderr.strip()
        tail = err[-500:].decode("utf-8", "backslashreplace")
        if _FULL.search(err):
            raise RemoteDiskFullError(
                f"{self.host}: {what}: the remote disk is full ({tail}); free space under "
                f"{self.remote_root} or raise the quota"
            )
        if _DENIED.search(err):
            raise RemotePermissionError(
                f"{self.host}: {what}: permission denied ({tail}); make {self.remote_root} writable "
                "for the SSH user or choose another clusters.*.remote_root"
            )
        raise TransferError(f"{self.host}: {what} failed (exit {result.exit_status}): {tail}")

    async def _command(self, script: str, what: str, stdin: bytes | None = None) -> bytes:
        c = self.connection
        async for attempt in c.retrying():
            with attempt:
                result = await c.arun(script, timeout_s=c.command_timeout_s * 4, stdin=stdin)
        self._check(result, what)
        return result.stdout

    async def _listing(self, remote: PurePosixPath, *, hashes: bool) -> dict[str, RemoteFile]:
        out = await self._command(listing_script(remote, hashes=hashes), f"list {remote}")
        return parse_listing(out, hashes=hashes)

    async def _write_failure(self, remote: PurePosixPath, need: int, exc: Exception) -> RemoteError:
        """Why an SFTP write failed: SFTP v3 says only 'Failure', so ask the shell and statvfs."""
        c = self.connection
        result = await c.arun(probe_script(remote, 65536), timeout_s=c.command_timeout_s)
        try:
            self._check(result, f"write in {remote}")
        except RemoteError as typed:
            return typed
        except TransferError:
            pass
        with contextlib.suppress(Exception):
            _, sftp = await c.sftp()
            vfs = await sftp.statvfs(str(remote).encode("utf-8", "surrogateescape"))
            if vfs.bavail * vfs.frsize < need:
                return RemoteDiskFullError(
                    f"{self.host}: {remote} has {vfs.bavail * vfs.frsize} bytes free, {need} needed; "
                    f"free space under {self.remote_root} or raise the quota"
                )
        return RemoteError(f"{self.host}: writing in {remote} failed: {exc}")

    # ---- upload ------------------------------------------------------------------------------

    async def _upload(
        self, local_dir: Path, remote: PurePosixPath, files: list[tuple[tuple[str, ...], int]]
    ) -> TransferReport:
        before = await self._listing(remote, hashes=True)
        local_hash: dict[str, str] = {}
        todo: list[tuple[tuple[str, ...], int]] = []
        loop = asyncio.get_running_loop()
        for parts, size in files:
            rel = "/".join(parts)
            there = before.get(rel)
            if there is not None and there.size == size and there.sha256 is not None:
                local_hash[rel] = await loop.run_in_executor(None, self._hash_local, local_dir, parts)
                if local_hash[rel] == there.sha256:
                    continue
            todo.append((parts, size))
        dirs = sorted({"/".join(p[:i]) for p, _ in todo for i in range(1, len(p))})
        await self._command(mkdirs_script(remote), f"create folders in {remote}", stdin=names_stdin(dirs))
        sent_bytes = await self._send_all(local_dir, remote, todo, local_hash)
        after = await self._listing(remote, hashes=True)
        bad = [(p, s) for p, s in files if _differs(after.get("/".join(p)), s, local_hash["/".join(p)])]
        if bad:
            log.warning("jobs.ssh_upload_mismatch", host=self.host, files=len(bad), first="/".join(bad[0][0]))
            sent_bytes += await self._send_all(local_dir, remote, bad, local_hash)
            after = await self._listing(remote, hashes=True)
            still = [p for p, s in bad if _differs(after.get("/".join(p)), s, local_hash["/".join(p)])]
            if still:
                raise ChecksumError(
                    f"{self.host}: {len(still)} uploaded file(s) differ from the local ones after a "
                    f"second try (first: {'/'.join(still[0])} in {remote}); check the host's disk"
                )
        await self._command(clean_partials_script(remote), f"clean partial files in {remote}")
        return TransferReport(
            files=len(files), sent=len(todo), skipped=len(files) - len(todo), bytes=sent_bytes
        )

    @staticmethod
    def _hash_local(local_dir: Path, parts: tuple[str, ...]) -> str:
        fd = open_regular(local_dir, parts, where=f"(in {local_dir})")
        try:
            return sha256_fd(fd)
        finally:
            os.close(fd)

    async def _send_all(
        self,
        local_dir: Path,
        remote: PurePosixPath,
        todo: list[tuple[tuple[str, ...], int]],
        local_hash: dict[str, str],
    ) -> int:
        gate = asyncio.Semaphore(self.parallel)

        async def one(parts: tuple[str, ...], size: int) -> int:
            async with gate:
                local_hash["/".join(parts)] = await self._send(local_dir, remote, parts, size)
                return size

        tasks = [asyncio.ensure_future(one(p, s)) for p, s in todo]
        try:
            return sum(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _send(self, local_dir: Path, remote: PurePosixPath, parts: tuple[str, ...], size: int) -> str:
        c = self.connection
        final_path = remote.joinpath(*parts)
        final = str(final_path).encode("utf-8", "surrogateescape")
        tmp = str(final_path.parent / partial_name()).encode("utf-8", "surrogateescape")
        async for attempt in c.retrying():
            with attempt:
                conn, sftp = await c.sftp()
                fd = open_regular(local_dir, parts, where=f"(in {local_dir})")
                try:
                    return await put_file(sftp, fd, size, tmp, final, tuning=self.tuning)
                except LINK_ERRORS as exc:
                    await c.link_down(conn)
                    raise HostUnreachableError(f"{self.host}: link lost sending {final_path}: {exc}") from exc
                except asyncssh.SFTPPermissionDenied as exc:
                    raise RemotePermissionError(
                        f"{self.host}: permission denied writing {final_path}; make {self.remote_root} "
                        "writable for the SSH user or choose another clusters.*.remote_root"
                    ) from exc
                except asyncssh.SFTPError as exc:
                    raise await self._write_failure(final_path.parent, size, exc) from exc
                finally:
                    os.close(fd)
        raise AssertionError("unreachable: tenacity re-raises the last error")

    # ---- download ----------------------------------------------------------------------------

    async def _download(self, remote: PurePosixPath, patterns: list[str], local_dir: Path) -> list[Path]:
        listing = await self._listing(remote, hashes=False)
        chosen: list[str] = []
        for pattern in patterns:
            matches = glob_filter(listing, pattern)
            if not matches:
                raise TransferError(
                    f"output {pattern!r} not found in {self.host}:{remote}; the simulation wrote no "
                    "such file (see its .err log), or fix jobs.steps.outputs"
                )
            chosen.extend(m for m in matches if m not in chosen)
        hashes = parse_hashes(
            await self._command(hash_script(remote), f"hash outputs in {remote}", stdin=names_stdin(chosen))
        )
        missing = [name for name in chosen if name not in hashes]
        if missing:
            raise TransferError(
                f"{self.host}: output {missing[0]!r} in {remote} vanished before it was hashed"
            )
        gate = asyncio.Semaphore(self.parallel)

        async def one(name: str) -> Path:
            async with gate:
                return await self._fetch(remote, name, listing[name].size, hashes[name], local_dir)

        tasks = [asyncio.ensure_future(one(name)) for name in chosen]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _fetch(self, remote: PurePosixPath, name: str, size: int, want: str, local_dir: Path) -> Path:
        parts = tuple(name.split("/"))
        src = str(remote.joinpath(*parts)).encode("utf-8", "surrogateescape")
        parent = await asyncio.get_running_loop().run_in_executor(None, open_local_parent, local_dir, parts)
        try:
            for attempt in range(2):
                if self.before_fetch is not None:
                    self.before_fetch(name, attempt)
                tmp = partial_name()
                try:
                    got = await self._get_retrying(src, size, parent, tmp, f"{remote}/{name}")
                    if got == want:
                        os.replace(tmp, parts[-1], src_dir_fd=parent, dst_dir_fd=parent)
                        return local_dir.joinpath(*parts)
                    log.warning("jobs.ssh_checksum_mismatch", host=self.host, file=name, attempt=attempt)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp, dir_fd=parent)
            raise ChecksumError(
                f"{self.host}: {remote}/{name} arrived twice with a sha256 other than the host's "
                f"({want[:16]}...); the remote file is changing or the link corrupts data"
            )
        finally:
            os.close(parent)

    async def _get_retrying(self, src: bytes, size: int, parent: int, tmp: str, shown: str) -> str:
        c = self.connection
        async for attempt in c.retrying():
            with attempt:
                conn, sftp = await c.sftp()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                try:
                    return await get_file(sftp, src, size, parent, tmp, tuning=self.tuning)
                except LINK_ERRORS as exc:
                    await c.link_down(conn)
                    raise HostUnreachableError(f"{self.host}: link lost fetching {shown}: {exc}") from exc
                except asyncssh.SFTPPermissionDenied as exc:
                    raise RemotePermissionError(
                        f"{self.host}: permission denied reading {shown}; check the file's mode on the host"
                    ) from exc
                except asyncssh.SFTPError as exc:
                    raise TransferError(f"{self.host}: fetching {shown} failed: {exc}") from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")


def _differs(there: RemoteFile | None, size: int, digest: str) -> bool:
    return there is None or there.size != size or there.sha256 != digest
