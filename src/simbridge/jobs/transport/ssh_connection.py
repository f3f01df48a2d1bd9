"""One shared, self-healing SSH connection per host, with a synchronous face.

Why a sync facade over a background event loop: the pipeline (dispatcher, executors, steps) is
threaded and calls transports from worker threads; asyncssh is asyncio-only. Running one event
loop in one daemon thread per connection and handing it coroutines
(``run_coroutine_threadsafe``) lets every thread share ONE authenticated connection, whose
channels (commands, the one SFTP session) are multiplexed by asyncssh, without making the
pipeline async. All asyncssh state lives on that loop's thread only, so the object is
thread-safe by construction; each blocking call waits with a timeout.

The connection is opened lazily and re-opened after the link drops (keepalive notices a dead
peer); a refused or reset attempt (sshd's MaxStartups, a restarting sshd) is retried with
jittered exponential backoff (tenacity) within ``connect_timeout_s``. Commands are NOT re-sent
after a drop (a command may not be idempotent); callers whose work is idempotent retry through
:meth:`SshConnection.retrying`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import asyncssh
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import AuthError, HostKeyError, HostUnreachableError
from simbridge.jobs.transport.base import CommandResult, CommandRunner
from simbridge.jobs.transport.ssh_hostkeys import HostKeyPolicy
from simbridge.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

# AES-GCM first: with AES-NI it is several times cheaper per byte than chacha20 in asyncssh.
CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
WINDOW = 16 << 20
MAX_PACKET = 256 << 10
# What a dropped link looks like to an operation in flight; such an operation may be retried.
LINK_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    asyncssh.ChannelOpenError,
    ConnectionError,
    EOFError,
)

_SFTP_START_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *LINK_ERRORS)


class _LoopThread:
    """One asyncio event loop running forever in one daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError(f"{name}: the SSH event loop thread did not start within 10 s")

    @staticmethod
    def _on_orphan_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncssh's own helper tasks fail with ConnectionLost when a link drops; the operation
        # that owned them already raised a typed error, so these are not worth an ERROR line.
        log.debug("jobs.ssh_loop_error", message=context.get("message"), error=repr(context.get("exception")))

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(self._on_orphan_error)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()

    def stop(self, timeout_s: float) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)


class _Client(asyncssh.SSHClient):
    """Checks host keys through the policy and notes when the link is lost."""

    def __init__(self, policy: HostKeyPolicy) -> None:
        self.policy = policy
        self.lost = False

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        return self.policy.validate(host, addr, port, key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


def parse_jump(spec: str) -> tuple[str | None, str, int]:
    """``[user@]host[:port]`` -> (user, host, port)."""
    user, _, rest = spec.rpartition("@")
    host, port = rest, 22
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        if tail.startswith(":"):
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(f"proxy_jump {spec!r}: expected [user@]host[:port]")
    return user or None, host, port


class SshConnection(CommandRunner):
    """The shared connection to one host: commands (:meth:`run`) and the SFTP session.

    Thread-safe; a context manager; :meth:`close` ends it for every user. Get the shared one
    per cluster with :func:`connect`.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 22,
        user: str | None = None,
        identity_file: Path | None = None,
        known_hosts: Path | None = None,
        accept_new_host_keys: bool = False,
        proxy_jump: str | None = None,
        connect_timeout_s: float = 15.0,
        keepalive_s: float = 15.0,
        command_timeout_s: float = 60.0,
        max_channels: int = 8,
        reconnect_s: float = 120.0,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.identity_file = identity_file
        self.known_hosts = known_hosts or Path("~/.ssh/known_hosts").expanduser()
        self.accept_new_host_keys = accept_new_host_keys
        self.proxy_jump = proxy_jump
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.command_timeout_s = command_timeout_s
        self.reconnect_s = reconnect_s
        self.label = f"{name + ' ' if name else ''}({user + '@' if user else ''}{host}:{port})"
        # How many connections were opened (the first and every reconnect): tests and `clusters check`.
        self.connects = 0
        self.closed = False
        self._channels = asyncio.Semaphore(max_channels)
        self._lock = asyncio.Lock()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._jump: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._sftp_conn: asyncssh.SSHClientConnection | None = None
        self._thread = _LoopThread(f"ssh-{host}:{port}")

    @classmethod
    def from_settings(cls, settings: ClusterSettings, *, name: str | None = None) -> SshConnection:
        """A connection configured by one ``clusters.NAME`` entry (not opened yet)."""
        return cls(
            host=settings.host,
            port=settings.port,
            user=settings.user,
            identity_file=settings.identity_file,
            known_hosts=settings.known_hosts,
            accept_new_host_keys=settings.accept_new_host_keys,
            proxy_jump=settings.proxy_jump,
            connect_timeout_s=settings.connect_timeout_s,
            keepalive_s=settings.keepalive_s,
            command_timeout_s=settings.command_timeout_s,
            max_channels=8,
            reconnect_s=max(60.0, 4 * settings.connect_timeout_s),
            name=name,
        )

    # ---- the sync facade -------------------------------------------------------------------

    def call(self, factory: Callable[[], Coroutine[Any, Any, T]], *, timeout_s: float) -> T:
        """Run ``factory()`` on the connection's loop and wait for it at most ``timeout_s``."""
        if self.closed:
            raise HostUnreachableError(f"{self.label}: this connection was closed; open a new one")
        if threading.current_thread() is self._thread.thread:
            raise RuntimeError("SshConnection.call from its own event loop would deadlock; await instead")
        future = asyncio.run_coroutine_threadsafe(factory(), self._thread.loop)
        try:
            return future.result(timeout_s)
        except TimeoutError:
            if future.done():
                raise
            future.cancel()
            raise HostUnreachableError(
                f"{self.label}: no answer within {timeout_s:g} s; check the host and the network"
            ) from None

    def open(self) -> SshConnection:
        """Connect now (instead of at first use); raises the typed errors of a failed connect."""
        self.call(self.connection, timeout_s=self.connect_timeout_s * 3 + 10)
        return self

    def run(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        """Run ``command`` (already quoted) on the host; HostUnreachableError on drop or timeout."""
        return self.call(
            lambda: self.arun(command, timeout_s=timeout_s, stdin=stdin),
            timeout_s=timeout_s + self.connect_timeout_s * 3 + 10,
        )

    def close(self) -> None:
        """Close the connection and its loop thread (for every thread sharing it)."""
        if self.closed:
            return
        self.closed = True
        _forget(self)
        future = asyncio.run_coroutine_threadsafe(self._drop(), self._thread.loop)
        try:
            future.result(10.0)
        except Exception as exc:  # closing must not fail the caller; the link may be gone already
            log.debug("jobs.ssh_close_failed", host=self.label, error=repr(exc))
        self._thread.stop(10.0)

    def __enter__(self) -> SshConnection:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---- async side (runs on the loop thread) ------------------------------------------------

    async def arun(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        """The coroutine behind :meth:`run`."""
        conn = await self.connection()
        async with self._channels:
            try:
                # Without input asyncssh sends no EOF: a command reading stdin would wait forever.
                feed: dict[str, Any] = {"input": stdin} if stdin else {"stdin": asyncssh.DEVNULL}
                result = await conn.run(command, encoding=None, check=False, timeout=timeout_s, **feed)
            except asyncssh.TimeoutError as exc:
                raise HostUnreachableError(
                    f"{self.label}: command did not finish within {timeout_s:g} s (killed); "
                    "raise clusters.*.command_timeout_s or check the host's load"
                ) from exc
            except LINK_ERRORS as exc:
                await self.link_down(conn)
                raise HostUnreachableError(f"{self.label}: connection lost during a command: {exc}") from exc
        status = None if result.exit_signal else result.exit_status
        out, err = result.stdout, result.stderr
        return CommandResult(
            exit_status=status,
            stdout=out if isinstance(out, bytes) else b"",
            stderr=err if isinstance(err, bytes) else b"",
        )

    @contextlib.asynccontextmanager
    async def process(
        self, command: str
    ) -> AsyncIterator[tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess[bytes]]]:
        """A running ``command`` with byte streams, holding one of the channel slots; closed on exit."""
        conn = await self.connection()
        async with self._channels:
            try:
                proc = await conn.create_process(command, encoding=None)
            except LINK_ERRORS as exc:
                await self.link_down(conn)
                raise HostUnreachableError(f"{self.label}: cannot open a channel: {exc}") from exc
            try:
                yield conn, proc
            finally:
                proc.close()

    async def connection(self) -> asyncssh.SSHClientConnection:
        """The live connection, opened (again) if there is none."""
        async with self._lock:
            if self._conn is not None and self._client is not None and not self._client.lost:
                return self._conn
            await self._drop_locked()
            self._conn, self._client = await self._connect_retrying()
            self.connects += 1
            log.info("jobs.ssh_connected", host=self.label, connects=self.connects)
            return self._conn

    async def sftp(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        """The connection and its one SFTP session (bytes paths), started if needed."""
        conn = await self.connection()
        async with self._lock:
            if self._sftp is None or self._sftp_conn is not conn:
                try:
                    self._sftp = await asyncio.wait_for(
                        conn.start_sftp_client(path_encoding=None), self.connect_timeout_s
                    )
                except _SFTP_START_ERRORS as exc:
                    raise HostUnreachableError(f"{self.label}: cannot start SFTP: {exc}") from exc
                except asyncssh.Error as exc:
                    raise HostUnreachableError(
                        f"{self.label}: the host refused SFTP ({exc}); enable the sftp subsystem in "
                        "sshd_config"
                    ) from exc
                self._sftp_conn = conn
            return conn, self._sftp

    async def link_down(self, conn: asyncssh.SSHClientConnection) -> None:
        """An operation on ``conn`` saw the link drop: the next use reconnects."""
        async with self._lock:
            if self._conn is conn:
                await self._drop_locked()

    def retrying(self) -> AsyncRetrying:
        """Retries for idempotent work: on HostUnreachableError, with backoff, for ``reconnect_s``."""
        return AsyncRetrying(
            retry=retry_if_exception_type(HostUnreachableError),
            stop=stop_after_delay(self.reconnect_s),
            wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
            reraise=True,
        )

    async def _drop(self) -> None:
        async with self._lock:
            await self._drop_locked()

    async def _drop_locked(self) -> None:
        conns = [c for c in (self._conn, self._jump) if c is not None]
        self._conn = self._client = self._jump = self._sftp = self._sftp_conn = None
        for c in conns:
            c.abort()

    async def _connect_retrying(self) -> tuple[asyncssh.SSHClientConnection, _Client]:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(HostUnreachableError),
            stop=stop_after_delay(self.connect_timeout_s),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            reraise=True,
        ):
            with attempt:
                return await self._connect_once()
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _hop(
        self, host: str, port: int, user: str | None, tunnel: asyncssh.SSHClientConnection | None
    ) -> tuple[asyncssh.SSHClientConnection, _Client]:
        policy = HostKeyPolicy(known_hosts=self.known_hosts, accept_new=self.accept_new_host_keys)
        client = _Client(policy)
        where = f"{user + '@' if user else ''}{host}:{port}"
        options: dict[str, Any] = {
            "port": port,
            "known_hosts": asyncssh.import_known_hosts(""),
            "server_host_key_algs": policy.host_key_algs(host, port) or (),
            "encryption_algs": list(CIPHERS),
            "compression_algs": ["none"],
            # A larger window and packet for what the host sends us: fewer packets through
            # asyncssh's Python per-packet path on downloads, and a 20 ms link is not window-bound.
            "window": WINDOW,
            "max_pktsize": MAX_PACKET,
            "keepalive_interval": self.keepalive_s,
            "keepalive_count_max": 3,
            "connect_timeout": self.connect_timeout_s,
            "login_timeout": self.connect_timeout_s,
            "config": None,
        }
        if user:
            options["username"] = user
        if self.identity_file is not None:
            options["client_keys"] = [str(self.identity_file)]
        if tunnel is not None:
            options["tunnel"] = tunnel
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(host, client_factory=lambda: client, **options), self.connect_timeout_s
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            raise policy.refusal or HostKeyError(f"{where}: host key not trusted: {exc}") from exc
        except asyncssh.PermissionDenied as exc:
            key = f"key {self.identity_file}" if self.identity_file else "the agent's and ~/.ssh's keys"
            raise AuthError(
                f"{where}: the host refused user {user or '(local user)'} with {key}; check "
                "clusters.*.user and identity_file, and that the public key is in that user's "
                "~/.ssh/authorized_keys on the host"
            ) from exc
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise HostUnreachableError(
                f"{where}: cannot connect ({type(exc).__name__}: {exc}); check host and port, that "
                "sshd runs there, the network/VPN and clusters.*.proxy_jump"
            ) from exc
        return conn, client

    async def _connect_once(self) -> tuple[asyncssh.SSHClientConnection, _Client]:
        jump: asyncssh.SSHClientConnection | None = None
        if self.proxy_jump:
            try:
                juser, jhost, jport = parse_jump(self.proxy_jump)
            except ValueError as exc:
                raise HostUnreachableError(f"{self.label}: {exc}; fix clusters.*.proxy_jump") from exc
            jump, _ = await self._hop(jhost, jport, juser, None)
        try:
            conn, client = await self._hop(self.host, self.port, self.user, jump)
        except BaseException:
            if jump is not None:
                jump.abort()
            raise
        self._jump = jump
        return conn, client


_REGISTRY: dict[tuple[Any, ...], SshConnection] = {}
_REGISTRY_LOCK = threading.Lock()


def _key(settings: ClusterSettings) -> tuple[Any, ...]:
    return (settings.host, settings.port, settings.user, settings.identity_file, settings.proxy_jump)


def connect(settings: ClusterSettings, *, name: str | None = None) -> SshConnection:
    """The one shared connection of this cluster's host (created on first use, opened lazily)."""
    key = _key(settings)
    with _REGISTRY_LOCK:
        conn = _REGISTRY.get(key)
        if conn is None or conn.closed:
            conn = SshConnection.from_settings(settings, name=name)
            _REGISTRY[key] = conn
        return conn


def _forget(conn: SshConnection) -> None:
    with _REGISTRY_LOCK:
        for key, value in list(_REGISTRY.items()):
            if value is conn:
                del _REGISTRY[key]


def close_all() -> None:
    """Close every shared connection (end of a serve, or of a test)."""
    with _REGISTRY_LOCK:
        conns = list(_REGISTRY.values())
    for conn in conns:
        conn.close()
