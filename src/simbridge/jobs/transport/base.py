"""The transport base: how a beam's files reach the executor's host and its outputs come back,
and how a command runs there.

Both directions are idempotent (a re-run after a crash copies again, atomically per file).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


@dataclass(frozen=True)
class CommandResult:
    """How one command on the host ended: its exit status (None if killed by a signal) and output."""

    exit_status: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """True when the command exited 0."""
        return self.exit_status == 0


class CommandRunner(abc.ABC):
    """Runs shell commands on one host (this machine, or one reached over SSH).

    ``command`` is parsed by the host's shell: every name interpolated into it must be quoted
    with ``shlex.quote`` by the caller.
    """

    host: str

    @abc.abstractmethod
    def run(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        """Run ``command`` to its end (or raise the transport's timeout/connection error)."""


class Transport(abc.ABC):
    """Moves files between this machine and one executor host."""

    name: str

    @abc.abstractmethod
    def beam_dir(self, case_key: str, beam_key: str) -> PurePosixPath:
        """The per-beam folder on the executor's host."""

    @abc.abstractmethod
    def upload(self, local_dir: Path, remote_dir: PurePosixPath) -> int:
        """Copy every file under ``local_dir`` into ``remote_dir``; returns the count."""

    @abc.abstractmethod
    def download(self, remote_dir: PurePosixPath, patterns: Sequence[str], local_dir: Path) -> list[Path]:
        """Copy files matching ``patterns`` into ``local_dir``; raise if a pattern matches none."""
