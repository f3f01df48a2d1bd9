"""The transport base: how a beam's files reach the executor's host and its outputs come back.

Both directions are idempotent (a re-run after a crash copies again, atomically per file).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path, PurePosixPath


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
