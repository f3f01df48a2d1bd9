"""The local transport: the executor's host is this machine, so files are copied between folders.

Each file is copied to a temporary name and renamed, so a crash never leaves a torn file in place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from simbridge.jobs.errors import TransferError
from simbridge.jobs.names import child_path
from simbridge.jobs.transport.base import Transport


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy one file via ``dst.partial`` + rename (idempotent, never torn)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class LocalTransport(Transport):
    """Copies beam folders under ``root`` on this machine."""

    name = "local"

    def __init__(self, *, root: Path) -> None:
        self.root = root.resolve()

    def beam_dir(self, case_key: str, beam_key: str) -> PurePosixPath:
        """``root/CASE/BEAM`` (keys are already safe path components)."""
        return PurePosixPath(child_path(child_path(self.root, case_key), beam_key))

    def upload(self, local_dir: Path, remote_dir: PurePosixPath) -> int:
        """Copy the staged files of a beam into its per-beam folder."""
        count = 0
        try:
            for src in sorted(local_dir.rglob("*")):
                if src.is_file():
                    copy_atomic(src, Path(remote_dir) / src.relative_to(local_dir))
                    count += 1
        except OSError as exc:
            raise TransferError(f"upload {local_dir} -> {remote_dir} failed: {exc}") from exc
        return count

    def download(self, remote_dir: PurePosixPath, patterns: Sequence[str], local_dir: Path) -> list[Path]:
        """Copy the outputs into ``local_dir``; a pattern matching nothing is an error."""
        got: list[Path] = []
        base = Path(remote_dir)
        try:
            for pattern in patterns:
                matches = sorted(p for p in base.glob(pattern) if p.is_file())
                if not matches:
                    raise TransferError(
                        f"output {pattern!r} not found in {remote_dir}; the simulation wrote no "
                        "such file (see its .err log), or fix jobs.steps.outputs"
                    )
                for src in matches:
                    dst = local_dir / src.relative_to(base)
                    copy_atomic(src, dst)
                    got.append(dst)
        except TransferError:
            raise
        except OSError as exc:
            raise TransferError(f"download {remote_dir} -> {local_dir} failed: {exc}") from exc
        return got
