"""The cluster factory: from the ``clusters`` section, one connection, transport and executor per
cluster, built on first use and closed together (a context manager owned by `serve` or a command).

``local`` is not a cluster: it keeps the local executor and transport the dispatcher always had.
The attempts table records the cluster's name as the attempt's executor, so every later command
(status, cancel, a restarted serve) finds the same cluster again by that name.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePath, PurePosixPath
from types import TracebackType
from typing import TYPE_CHECKING, Any

from simbridge.config import ClusterSettings, Settings
from simbridge.jobs.errors import (
    AuthError,
    HostKeyError,
    JobsConfigError,
    RemoteError,
)
from simbridge.jobs.executors import Executor
from simbridge.jobs.executors.runscript import AttemptFiles, attempt_files, confined
from simbridge.jobs.executors.slurm import SlurmExecutor
from simbridge.jobs.executors.ssh import SshExecutor
from simbridge.jobs.store.hostgpus import HostGpuStore
from simbridge.jobs.transport import CommandRunner, Transport
from simbridge.logs import get_logger

if TYPE_CHECKING:
    from simbridge.jobs.transport.ssh_connection import SshConnection

log = get_logger(__name__)

LOCAL = "local"
TAIL_BYTES = 8192
# Errors no retry can cure: the host refuses who we are, or is not the host we know.
FATAL_REMOTE: tuple[type[RemoteError], ...] = (AuthError, HostKeyError)
# How long a cluster that dropped is left alone at most between two tries (it doubles up to this).
BACKOFF_MAX_S = 30.0
BACKOFF_FIRST_S = 0.5


def is_fatal(exc: BaseException) -> bool:
    """True for a remote error that stops `serve` (wrong key or user), never for a dropped link."""
    return isinstance(exc, FATAL_REMOTE)


@dataclass
class Backoff:
    """When a cluster that failed with a passing error may be tried again (doubling, capped)."""

    delay_s: float = 0.0
    until: float = 0.0
    last_error: str = ""

    def failed(self, exc: BaseException) -> float:
        """Note one more failure; returns the delay before the next try."""
        self.delay_s = min(BACKOFF_MAX_S, max(BACKOFF_FIRST_S, self.delay_s * 2))
        self.until = time.monotonic() + self.delay_s
        self.last_error = str(exc)
        return self.delay_s

    def ok(self) -> None:
        """The cluster answered: no more waiting."""
        self.delay_s = 0.0
        self.until = 0.0
        self.last_error = ""

    def waiting(self) -> bool:
        """True while a try would come too soon after the last failure."""
        return time.monotonic() < self.until


@dataclass
class Cluster:
    """One configured cluster: its command runner (the shared connection), transport and executor."""

    name: str
    settings: ClusterSettings
    runner: CommandRunner
    transport: Transport
    executor: Executor
    closers: list[Callable[[], None]] = field(default_factory=list)
    backoff: Backoff = field(default_factory=Backoff)
    # A plain host's GPUs are recorded in the store once, on first use (under ``lock``).
    gpus_registered: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def slurm(self) -> bool:
        """True when the cluster's scheduler is Slurm (GPUs assigned by the scheduler)."""
        return self.settings.scheduler == "slurm"

    @property
    def root(self) -> PurePosixPath:
        """The cluster's remote_root (every remote path lies below it)."""
        return self.settings.remote_root

    def files(self, log_prefix: PurePath) -> AttemptFiles:
        """An attempt's remote files (script, logs, exit marker), from its local log prefix."""
        return attempt_files(self.root, log_prefix)

    def run(self, command: str) -> bytes:
        """Run one command on the cluster's host; its stdout, or RemoteError with its stderr."""
        result = self.runner.run(command, timeout_s=self.settings.command_timeout_s)
        if not result.ok:
            text = result.stderr.decode("utf-8", "replace").strip().splitlines()
            raise RemoteError(
                f"{self.name}: `{command[:120]}` ended {result.exit_status}: {text[-1] if text else ''}"
            )
        return result.stdout

    def tail(self, path: PurePosixPath | str, lines: int = 20) -> str:
        """The last ``lines`` of a remote log ('' if it is missing or the host cannot say)."""
        try:
            p = confined(self.root, path)
            cmd = f"tail -c {TAIL_BYTES} -- {shlex.quote(str(p))} 2>/dev/null || true"
            out = self.runner.run(cmd, timeout_s=self.settings.command_timeout_s).stdout
        except RemoteError as exc:
            log.info("jobs.remote_tail_failed", cluster=self.name, path=str(path), error=str(exc))
            return ""
        text = out.decode("utf-8", "replace")
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def exists(self, path: PurePosixPath | str) -> bool:
        """Whether a remote file exists (raises RemoteError if the host cannot be asked)."""
        p = confined(self.root, path)
        result = self.runner.run(f"test -e {shlex.quote(str(p))}", timeout_s=self.settings.command_timeout_s)
        return result.exit_status == 0

    def remove_tree(self, path: PurePosixPath | str) -> None:
        """Remove a beam's remote folder (only ever one below remote_root)."""
        p = confined(self.root, path)
        self.run(f"rm -rf -- {shlex.quote(str(p))}")

    def close(self) -> None:
        """Close the executor (its watcher) before the connection it uses; never raises."""
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # closing must go on for the others
                log.warning("jobs.cluster_close_failed", cluster=self.name, error=repr(exc))


Builder = Callable[[str, ClusterSettings, Any], Cluster]


def _closer(obj: object) -> Callable[[], None] | None:
    close: Callable[[], None] | None = getattr(obj, "close", None)
    if callable(close):
        return close
    exit_ = getattr(obj, "__exit__", None)
    if callable(exit_):
        return lambda: exit_(None, None, None)
    return None


def open_connection(name: str, settings: ClusterSettings) -> SshConnection:
    """The one SSH connection of a cluster (a CommandRunner and a context manager; it connects on
    first use and reconnects with backoff). Ours alone: closing it never affects another user."""
    from simbridge.jobs.transport.ssh_connection import SshConnection

    return SshConnection.from_settings(settings, name=name)


def build_cluster(name: str, settings: ClusterSettings, store: Any = None) -> Cluster:
    """Connect to ``name`` and build its transport and executor (the SSH and scheduler modules are
    imported here, so a local-only install never loads asyncssh)."""
    # Imported late: these modules pull in asyncssh, which `local` never needs.
    from simbridge.jobs.transport.ssh import SshTransport

    closers: list[Callable[[], None]] = []
    conn = open_connection(name, settings)
    c = _closer(conn)
    if c is not None:
        closers.append(c)
    try:
        transport = SshTransport(
            connection=conn, remote_root=settings.remote_root, parallel=settings.transfer_parallel
        )
        executor = make_remote_executor(name, settings, conn, store)
    except BaseException:
        for close in reversed(closers):
            close()
        raise
    for part in (transport, executor):
        c = _closer(part)
        if c is not None:
            closers.append(c)
    return Cluster(
        name=name, settings=settings, runner=conn, transport=transport, executor=executor, closers=closers
    )


def make_remote_executor(
    name: str, settings: ClusterSettings, runner: CommandRunner, store: HostGpuStore | None = None
) -> Executor:
    """The executor of a cluster: SlurmExecutor (scheduler: slurm) or SshExecutor (none)."""
    if settings.scheduler == "slurm":
        return SlurmExecutor(name=name, settings=settings, runner=runner)
    return SshExecutor(name=name, settings=settings, runner=runner, store=store)


class Clusters:
    """Every cluster of the configuration, each connected on first use and closed on exit.

    Thread-safe: step threads and the watcher share one :class:`Cluster` (one connection) per name.
    """

    def __init__(self, *, settings: Settings, store: Any = None, builder: Builder | None = None) -> None:
        self.settings = settings
        self.store = store
        self._builder = builder or build_cluster
        self._built: dict[str, Cluster] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Clusters:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def names(self) -> list[str]:
        """The configured cluster names, sorted."""
        return sorted(self.settings.clusters)

    def known(self, name: str) -> bool:
        """Whether ``name`` is a configured cluster."""
        return name in self.settings.clusters

    def get(self, name: str) -> Cluster:
        """The cluster called ``name``, connecting on first use (JobsConfigError if unknown)."""
        with self._lock:
            if self._closed:
                raise JobsConfigError(f"cluster {name!r} asked for after the clusters were closed")
            found = self._built.get(name)
            if found is not None:
                return found
            cfg = self.settings.clusters.get(name)
            if cfg is None:
                known = ", ".join(sorted(self.settings.clusters)) or "none configured"
                raise JobsConfigError(
                    f"cluster {name!r} is not in the clusters section ({known}); add it to the config"
                )
            # Built under the lock: two threads never open two connections to one host.
            cluster = self._built[name] = self._builder(name, cfg, self.store)
            log.info("jobs.cluster_connected", cluster=name, host=cfg.host, scheduler=cfg.scheduler)
            return cluster

    def built(self) -> list[Cluster]:
        """The clusters connected so far."""
        with self._lock:
            return list(self._built.values())

    def close(self) -> None:
        """Close every connected cluster (executor watchers first, then the connection)."""
        with self._lock:
            self._closed = True
            built, self._built = list(self._built.values()), {}
        for cluster in built:
            cluster.close()
