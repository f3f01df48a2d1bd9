"""The SSH transport: a beam's files to ``{remote_root}/{case}/{beam}/`` and its outputs back.

Upload is resumable and verified. The remote folder is listed by SFTP (sizes; no remote shell);
the files whose size matches a local one are hashed remotely by ONE command for the whole beam,
and a file whose sha256 matches too is skipped. Every other file is written under a temporary
name and renamed, several at once (``parallel``), each with pipelined SFTP requests, or, from
``Tuning.stream_min`` bytes on, as raw streams over exec channels (ssh_stream.py). After the
upload ONE more hash command verifies every SFTP-sent file of the beam (a mismatch is sent once
more, then ChecksumError; streamed files are verified segment by segment as they land); it also
removes partial files a killed upload left. Download lists the matches of each output pattern
by SFTP, fetches them to temporary names while ONE hash command hashes them remotely, compares,
re-fetches once on a mismatch and renames into place. Every remote operation goes through one
retry/error-translation helper (:meth:`SshTransport._retrying`).

Every remote path is confined to ``remote_root``; names reach the remote shell quoted, or
NUL-separated on stdin. A dropped link is survived: the connection reconnects with backoff and
the interrupted file is sent again. Remote commands pay the login shell's start-up on the host,
which is why there are so few of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TypeVar

import asyncssh

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import (
    ChecksumError,
    HostUnreachableError,
    JobsError,
    RemoteDiskFullError,
    RemoteError,
    RemotePathError,
    RemotePermissionError,
    TransferError,
)
from simbridge.jobs.files import HARD_MAX_DEPTH, open_regular
from simbridge.jobs.transport.base import CommandResult, Transport
from simbridge.jobs.transport.ssh_connection import LINK_ERRORS, SshConnection, close_all, connect
from simbridge.jobs.transport.ssh_files import (
    TransferReport,
    Tuning,
    ensure_dir,
    get_file,
    hash_local,
    local_files,
    open_local_parent,
    partial_name,
    put_file,
    remote_bytes,
    walk_remote,
)
from simbridge.jobs.transport.ssh_paths import (
    beam_path,
    check_pattern,
    check_result,
    confine,
    glob_filter,
    hash_script,
    names_stdin,
    needs_escaping,
    parse_hashes,
    probe_script,
    refused,
    remove_script,
)
from simbridge.jobs.transport.ssh_stream import STREAMS, encodable, fetch, send_verified
from simbridge.logs import get_logger

__all__ = ["SshConnection", "SshTransport", "TransferReport", "close_all", "connect"]

log = get_logger(__name__)
T = TypeVar("T")


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
        # Test seam: called with (relative name, attempt) after the remote hash is known and before
        # each fetch, so a test can corrupt a remote file between the hash and the transfer.
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
        try:
            files = local_files(local_dir)
            total = sum(size for _, size in files)
            return self.connection.call(
                lambda: self._upload(local_dir, target, files), timeout_s=self._budget(total, len(files))
            )
        except JobsError:
            raise
        except OSError as exc:  # the local side: an unreadable file or folder
            raise TransferError(f"upload {local_dir} -> {self.host}:{target} failed: {exc}") from exc

    def download(self, remote_dir: PurePosixPath, patterns: Sequence[str], local_dir: Path) -> list[Path]:
        """Fetch the files matching ``patterns`` (globs relative to ``remote_dir``), verified."""
        source = confine(self.remote_root, remote_dir, host=self.host)
        for pattern in patterns:
            check_pattern(pattern)
        c = self.connection
        # Two waits: the plan (an SFTP listing), then the fetch, whose limit grows with its bytes.
        plan = c.call(lambda: self._plan(source, list(patterns)), timeout_s=self._budget(0, 0))
        total = sum(plan.values())
        try:
            return c.call(
                lambda: self._fetch_all(source, plan, local_dir), timeout_s=self._budget(total, len(plan))
            )
        except JobsError:
            raise
        except OSError as exc:  # the local side: a folder that cannot be created or written
            raise TransferError(f"download {self.host}:{source} -> {local_dir} failed: {exc}") from exc

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
        check_result(result, what, host=self.host, remote_root=self.remote_root)

    async def _command(
        self, script: str, what: str, stdin: bytes | None = None, *, partial_ok: bool = False
    ) -> bytes:
        """Run an idempotent script (retried over reconnects); typed errors from its stderr.

        ``partial_ok``: a failure that is neither a full disk nor a refusal (a file that vanished
        from a hash list) still returns what was printed; the caller compares it.
        """
        c = self.connection

        async def run() -> CommandResult:
            result = await c.arun(script, timeout_s=c.command_timeout_s * 4, stdin=stdin)
            if result.exit_status is None:  # killed by a signal: its output is no partial answer
                raise HostUnreachableError(f"{self.host}: {what}: the command was killed; trying again")
            return result

        result = await self._retrying(what, run, fix="")
        if partial_ok and not result.ok and not refused(result.stderr):
            log.info("jobs.ssh_command_partial", host=self.host, what=what, stderr=result.stderr[-300:])
            return result.stdout
        self._check(result, what)
        return result.stdout

    async def _remote_hashes(
        self, remote: PurePosixPath, names: list[str], *, clean: bool = False
    ) -> dict[str, str]:
        """sha256 of ``names`` below ``remote``: ONE remote command (names on stdin), however many."""
        out = await self._command(
            hash_script(remote, clean_partials=clean, openssl=not any(map(needs_escaping, names))),
            f"hash files in {remote}",
            stdin=names_stdin(names),
            partial_ok=True,
        )
        return parse_hashes(out)

    async def _retrying(
        self,
        what: str,
        op: Callable[[], Awaitable[T]],
        *,
        fix: str,
        failure: Callable[[asyncssh.SFTPError], Awaitable[Exception]] | None = None,
    ) -> T:
        """Run an idempotent remote operation, again after a dropped link (with backoff), with
        typed errors: a lost link is HostUnreachableError, an SFTP refusal RemotePermissionError
        (``fix`` says what to do), any other SFTP failure ``failure(exc)`` or TransferError."""
        c = self.connection
        async for attempt in c.retrying():
            with attempt:
                conn = await c.connection()
                try:
                    return await op()
                except HostUnreachableError:
                    raise  # typed already (a timeout, a refused channel): retried as it is
                except LINK_ERRORS as exc:
                    await c.link_down(conn)
                    raise HostUnreachableError(f"{self.host}: link lost {what}: {exc}") from exc
                except asyncssh.SFTPPermissionDenied as exc:
                    raise RemotePermissionError(f"{self.host}: permission denied {what}; {fix}") from exc
                except asyncssh.SFTPError as exc:
                    if failure is None:
                        raise TransferError(f"{self.host}: {what} failed: {exc}") from exc
                    raise await failure(exc) from exc
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _walk(
        self, remote: PurePosixPath, *, max_depth: int, partials: list[str] | None = None
    ) -> dict[str, int] | None:
        async def op() -> dict[str, int] | None:
            _, sftp = await self.connection.sftp()
            return await walk_remote(sftp, remote, max_depth=max_depth, partials=partials)

        fix = f"make {self.remote_root} readable for the SSH user"
        return await self._retrying(f"listing {remote}", op, fix=fix)

    async def _mkdirs(self, remote: PurePosixPath, subdirs: list[str]) -> None:
        async def op() -> None:
            _, sftp = await self.connection.sftp()
            await ensure_dir(sftp, remote, floor=self.remote_root)
            for sub in subdirs:
                await ensure_dir(sftp, remote / sub, floor=remote)

        async def failure(exc: asyncssh.SFTPError) -> Exception:
            # Find the deepest folder that exists, and ask it why writes fail there.
            where = remote
            while where != self.remote_root and len(where.parts) > len(self.remote_root.parts):
                where = where.parent
                if await self._exists(where):
                    break
            return await self._write_failure(where, 0, exc)

        await self._retrying(f"creating {remote}", op, fix=self._writable, failure=failure)

    @property
    def _writable(self) -> str:
        return f"make {self.remote_root} writable for the SSH user or choose another clusters.*.remote_root"

    async def _exists(self, path: PurePosixPath) -> bool:
        _, sftp = await self.connection.sftp()
        try:
            await sftp.stat(remote_bytes(path))
        except asyncssh.SFTPError:
            return False
        return True

    async def _check_room(self, remote: PurePosixPath, need: int) -> None:
        """Refuse an upload that cannot fit before a byte of it is written: its partial files
        would fill the host's disk for a while, and other beams' jobs there would fail meanwhile
        (their run.sh cannot write its marker). A host without statvfs@openssh.com is not asked."""
        if need <= 0:
            return
        try:
            _, sftp = await self.connection.sftp()
            vfs = await sftp.statvfs(remote_bytes(remote))
        except Exception:  # no answer: the writes themselves will tell (and are typed there)
            return
        free = vfs.bavail * vfs.frsize
        if free < need:
            raise RemoteDiskFullError(
                f"{self.host}: not enough room for the upload (disk full): {remote} has {free} bytes "
                f"free, {need} needed; free space under {self.remote_root} or raise the quota"
            )

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
        # What is there already: sizes by SFTP (no shell), then ONE sha256sum call for the files
        # whose size matches (none on a fresh upload: no command at all).
        leftovers: list[str] = []
        there = await self._walk(remote, max_depth=HARD_MAX_DEPTH, partials=leftovers) or {}
        same_size = [(p, s) for p, s in files if there.get("/".join(p)) == s]
        # None: a streamed file, already verified segment by segment (ssh_stream.send).
        local_hash: dict[str, str | None] = {}
        skip: set[str] = set()
        if same_size:
            remote_hash = await self._remote_hashes(remote, ["/".join(p) for p, _ in same_size])
            loop = asyncio.get_running_loop()
            for parts, _ in same_size:
                rel = "/".join(parts)
                local_hash[rel] = await loop.run_in_executor(None, hash_local, local_dir, parts)
                if remote_hash.get(rel) == local_hash[rel]:
                    skip.add(rel)
        todo = [(p, s) for p, s in files if "/".join(p) not in skip]
        dirs = sorted(
            {"/".join(p[:i]) for p, _ in todo for i in range(1, len(p))}, key=lambda d: d.count("/")
        )
        await self._mkdirs(remote, dirs)
        await self._check_room(remote, sum(size for _, size in todo))
        sent_bytes = await self._send_all(local_dir, remote, todo, local_hash, leftovers)
        # Verify every other file with ONE hash call (it also removes partials a killed upload left).
        check = [(p, s) for p, s in files if local_hash["/".join(p)] is not None]
        if not check and not leftovers:
            return TransferReport(files=len(files), sent=len(todo), skipped=len(skip), bytes=sent_bytes)
        after = await self._remote_hashes(remote, ["/".join(p) for p, _ in check], clean=True)
        bad = [(p, s) for p, s in check if after.get("/".join(p)) != local_hash["/".join(p)]]
        if bad:
            log.warning("jobs.ssh_upload_mismatch", host=self.host, files=len(bad), first="/".join(bad[0][0]))
            await self._mkdirs(remote, dirs)
            sent_bytes += await self._send_all(local_dir, remote, bad, local_hash, leftovers)
            again = [p for p, _ in bad if local_hash["/".join(p)] is not None]  # streamed: verified
            after = await self._remote_hashes(remote, ["/".join(p) for p in again]) if again else {}
            still = [p for p in again if after.get("/".join(p)) != local_hash["/".join(p)]]
            if still:
                raise ChecksumError(
                    f"{self.host}: {len(still)} uploaded file(s) differ from the local ones after a "
                    f"second try (first: {'/'.join(still[0])} in {remote}); check the host's disk"
                )
        return TransferReport(files=len(files), sent=len(todo), skipped=len(skip), bytes=sent_bytes)

    async def _send_all(
        self,
        local_dir: Path,
        remote: PurePosixPath,
        todo: list[tuple[tuple[str, ...], int]],
        local_hash: dict[str, str | None],
        leftovers: list[str],
    ) -> int:
        gate = asyncio.Semaphore(self.parallel)
        # What must fit on the host at once: the files go in parallel, and one that failed for
        # lack of space may be judged after the others' partials are gone (then its own size fits).
        total = sum(size for _, size in todo)

        async def one(parts: tuple[str, ...], size: int) -> int:
            async with gate:
                local_hash["/".join(parts)] = await self._send(
                    local_dir, remote, parts, size, leftovers, need=total
                )
                return size

        tasks = [asyncio.ensure_future(one(p, s)) for p, s in todo]
        try:
            return sum(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def _send(
        self,
        local_dir: Path,
        remote: PurePosixPath,
        parts: tuple[str, ...],
        size: int,
        leftovers: list[str],
        *,
        need: int,
    ) -> str | None:
        """Send one file; its sha256 (verified later), or None when streamed and verified already.
        A streamed attempt that failed stays noted in ``leftovers`` (the final command cleans up).
        ``need``: the bytes the whole upload puts on the host (judges a write that failed)."""
        c = self.connection
        final_path = remote.joinpath(*parts)
        stream = size >= max(1, self.tuning.stream_min) and encodable(final_path)

        async def op() -> str | None:
            tmp = final_path.parent / partial_name()
            fd = open_regular(local_dir, parts, where=f"(in {local_dir})")
            try:
                if stream:
                    # Noted until it succeeds: a dropped link may leave its partial file behind.
                    leftovers.append(str(tmp))
                    streams = max(1, min(STREAMS, size // max(1, self.tuning.stream_min)))
                    await send_verified(c, fd, size, final_path, streams=streams, check=self._check)
                    leftovers.remove(str(tmp))
                    return None
                _, sftp = await c.sftp()
                return await put_file(
                    sftp, fd, size, remote_bytes(tmp), remote_bytes(final_path), tuning=self.tuning
                )
            finally:
                os.close(fd)

        async def failure(exc: asyncssh.SFTPError) -> Exception:
            return await self._write_failure(final_path.parent, need, exc)

        return await self._retrying(f"writing {final_path}", op, fix=self._writable, failure=failure)

    # ---- download ----------------------------------------------------------------------------

    async def _plan(self, remote: PurePosixPath, patterns: list[str]) -> dict[str, int]:
        """{relative name: size} of the files the patterns match, in pattern order (SFTP only)."""
        split = [check_pattern(p) for p in patterns]
        depth = HARD_MAX_DEPTH if any("**" in parts for parts in split) else max(map(len, split))
        listing = await self._walk(remote, max_depth=depth)
        if listing is None:
            raise TransferError(
                f"{self.host}: the beam folder {remote} does not exist (removed, or the job never ran there)"
            )
        chosen: list[str] = []
        for pattern in patterns:
            matches = glob_filter(listing, pattern)
            if not matches:
                raise TransferError(
                    f"output {pattern!r} not found in {self.host}:{remote}; the simulation wrote no "
                    "such file (see its .err log), or fix jobs.steps.outputs"
                )
            chosen.extend(m for m in matches if m not in chosen)
        return {name: listing[name] for name in chosen}

    async def _fetch_all(self, remote: PurePosixPath, plan: dict[str, int], local_dir: Path) -> list[Path]:
        # The ONE hash command runs while the files stream in: its cost (a remote shell and a
        # read of every file) hides behind the transfer instead of adding to it.
        hashing = asyncio.ensure_future(self._remote_hashes(remote, list(plan)))

        async def want_of(name: str) -> str:
            hashes = await asyncio.shield(hashing)
            if name not in hashes:
                raise TransferError(f"{self.host}: output {name!r} in {remote} vanished before it was hashed")
            return hashes[name]

        gate = asyncio.Semaphore(self.parallel)

        async def one(name: str, size: int) -> Path:
            async with gate:
                return await self._fetch(remote, name, size, want_of, local_dir)

        tasks = [asyncio.ensure_future(one(name, size)) for name, size in plan.items()]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in [*tasks, hashing]:
                task.cancel()
            await asyncio.gather(*tasks, hashing, return_exceptions=True)

    async def _fetch(
        self,
        remote: PurePosixPath,
        name: str,
        size: int,
        want_of: Callable[[str], Awaitable[str]],
        local_dir: Path,
    ) -> Path:
        parts = tuple(name.split("/"))
        parent = await asyncio.get_running_loop().run_in_executor(None, open_local_parent, local_dir, parts)
        try:
            for attempt in range(2):
                if self.before_fetch is not None:
                    await want_of(name)  # the seam acts between the hash and the transfer
                    self.before_fetch(name, attempt)
                tmp = partial_name()
                try:
                    got = await self._get(remote.joinpath(*parts), size, parent, tmp)
                    want = await want_of(name)
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

    async def _get(self, src: PurePosixPath, size: int, parent: int, tmp: str) -> str:
        c = self.connection
        stream = size >= max(1, self.tuning.stream_min) and encodable(src)

        async def op() -> str:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent)
            if not stream:
                _, sftp = await c.sftp()
                return await get_file(sftp, remote_bytes(src), size, parent, tmp, tuning=self.tuning)
            digest, result = await fetch(c, src, parent, tmp)
            self._check(result, f"fetching {src}")
            return digest

        fix = "check the file's mode on the host"
        return await self._retrying(f"fetching {src}", op, fix=fix)
